/* Exact re-implementation of Pillow's two-pass resampling of 8-bit RGB images, for the
 * pixels that a crop keeps only.
 *
 * Pillow (src/libImaging/Resample.c) resizes in two separable passes, each computing
 * clip8((1 << 21 + sum_t pixel[t] * coeff[t]) >> 22) in 32-bit integers with coefficients
 * fixed-point rounded to 22 bits, and rounds to uint8 between the passes. The coefficients
 * and their windows are computed in Python (clipfeat/fastresize.py) with the same double
 * arithmetic as Pillow; this file only does the integer sums, so its results are Pillow's
 * bit for bit, in whichever pass order Pillow uses (the caller says which). What it saves:
 * only the kept rows/columns are computed, both passes run as vectorisable row sums (the
 * horizontal pass on a transposed copy), and the result is written planar (3, h, w).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <stddef.h>
#include <string.h>

#define PB 22 /* Pillow's PRECISION_BITS for 8-bit images */
#define BLOCK 64 /* rows per transposed block of the horizontal pass */

#if defined(__has_attribute)
#if __has_attribute(target_clones) && defined(__x86_64__)
#define HOT __attribute__((target_clones("avx2", "default")))
#endif
#endif
#ifndef HOT
#define HOT
#endif

/* line[v] = clip8(bias + sum_t rows(first + t)[v] * k[t]) for v < len */
HOT static void filter_line(const uint8_t *base, ptrdiff_t stride, int first, int n,
                            const int32_t *k, int len, int32_t *acc, uint8_t *line) {
    for (int v = 0; v < len; v++) acc[v] = 1 << (PB - 1);
    for (int t = 0; t < n; t++) {
        const uint8_t *row = base + (ptrdiff_t)(first + t) * stride;
        int32_t kt = k[t];
        for (int v = 0; v < len; v++) acc[v] += (int32_t)row[v] * kt;
    }
    for (int v = 0; v < len; v++) {
        int32_t x = acc[v] >> PB;
        line[v] = x < 0 ? 0 : (x > 255 ? 255 : (uint8_t)x);
    }
}

/* Filter `nout` outputs. Output o sums rows bounds[2o] - shift .. + bounds[2o + 1] of `base`;
 * its len / 3 pixels go to dst + o * os + p * ps + c * cs (pixel p, channel c). */
static void filter_pass(const uint8_t *base, ptrdiff_t stride, int shift, int nout,
                        const int32_t *bounds, const int32_t *kk, int ks, int len,
                        int32_t *acc, uint8_t *line,
                        uint8_t *dst, ptrdiff_t os, ptrdiff_t ps, ptrdiff_t cs) {
    for (int o = 0; o < nout; o++) {
        filter_line(base, stride, bounds[2 * o] - shift, bounds[2 * o + 1],
                    kk + (ptrdiff_t)o * ks, len, acc, line);
        uint8_t *d = dst + o * os;
        if (ps == 3 && cs == 1) {
            memcpy(d, line, (size_t)len);
            continue;
        }
        for (int p = 0; p < len / 3; p++) {
            d[p * ps] = line[3 * p];
            d[p * ps + cs] = line[3 * p + 1];
            d[p * ps + 2 * cs] = line[3 * p + 2];
        }
    }
}

/* The source rows (or columns) an axis' outputs read: [*first, *last). */
static void span(const int32_t *bounds, int n, int *first, int *last) {
    *first = bounds[0];
    *last = 0;
    for (int i = 0; i < n; i++) {
        if (bounds[2 * i] < *first) *first = bounds[2 * i];
        if (bounds[2 * i] + bounds[2 * i + 1] > *last) *last = bounds[2 * i] + bounds[2 * i + 1];
    }
}

/* src: interleaved RGB rows (stride srs). out: planar 3 x ny x nx. hb/hk: window (first, count)
 * and coefficients of the nx kept output columns; vb/vk: the same for the ny kept rows.
 * Returns 0, or -1 when out of memory. */
static int resample_region(const uint8_t *src, ptrdiff_t srs,
                           int nx, const int32_t *hb, const int32_t *hk, int hks,
                           int ny, const int32_t *vb, const int32_t *vk, int vks,
                           int hfirst, uint8_t *out) {
    ptrdiff_t plane = (ptrdiff_t)ny * nx;
    int r0, r1, c0, c1;
    span(vb, ny, &r0, &r1);
    span(hb, nx, &c0, &c1);
    int R = r1 - r0, C = c1 - c0;
    int maxlen = 3 * (R > C ? R : C);
    if (3 * nx > maxlen) maxlen = 3 * nx;
    if (3 * ny > maxlen) maxlen = 3 * ny;
    int32_t *acc = malloc(sizeof(int32_t) * (size_t)maxlen);
    uint8_t *line = malloc((size_t)maxlen);
    uint8_t *t1 = NULL, *t2 = NULL;
    int rc = -1;
    if (!acc || !line) goto done;
    if (hfirst) {
        /* The horizontal pass over the rows the vertical pass reads, BLOCK rows at a time:
         * each block is transposed (t1[c][i][3]) so that every output column is a sum of
         * contiguous runs, and written back row-major (t2[r][j][3]). Then the vertical pass
         * over t2, written planar. */
        int block = R < BLOCK ? R : BLOCK;
        t1 = malloc((size_t)C * block * 3);
        t2 = malloc((size_t)R * nx * 3);
        if (!t1 || !t2) goto done;
        for (int rb = 0; rb < R; rb += block) {
            int nr = R - rb < block ? R - rb : block;
            for (int i = 0; i < nr; i++) {
                const uint8_t *s = src + (ptrdiff_t)(r0 + rb + i) * srs + (ptrdiff_t)c0 * 3;
                uint8_t *d = t1 + (ptrdiff_t)i * 3;
                for (int c = 0; c < C; c++) {
                    uint8_t *dc = d + (ptrdiff_t)c * nr * 3;
                    dc[0] = s[3 * c];
                    dc[1] = s[3 * c + 1];
                    dc[2] = s[3 * c + 2];
                }
            }
            filter_pass(t1, (ptrdiff_t)nr * 3, c0, nx, hb, hk, hks, nr * 3, acc, line,
                        t2 + (ptrdiff_t)rb * nx * 3, 3, (ptrdiff_t)nx * 3, 1);
        }
        filter_pass(t2, (ptrdiff_t)nx * 3, r0, ny, vb, vk, vks, nx * 3, acc, line,
                    out, nx, 1, plane);
    } else {
        /* Vertical pass over the columns the horizontal pass reads, stored transposed
         * (t1[c][i][3]); then the horizontal pass, written planar. */
        t1 = malloc((size_t)C * ny * 3);
        if (!t1) goto done;
        filter_pass(src + (ptrdiff_t)c0 * 3, srs, 0, ny, vb, vk, vks, C * 3, acc, line,
                    t1, 3, (ptrdiff_t)ny * 3, 1);
        filter_pass(t1, (ptrdiff_t)ny * 3, c0, nx, hb, hk, hks, ny * 3, acc, line,
                    out, 1, nx, plane);
    }
    rc = 0;
done:
    free(acc);
    free(line);
    free(t1);
    free(t2);
    return rc;
}

static int
check_bounds(const Py_buffer *b, const Py_buffer *k, int ks, int insize, int *nout,
             const char *axis) {
    if (ks < 1 || b->len % (2 * (Py_ssize_t)sizeof(int32_t)) != 0) {
        PyErr_Format(PyExc_ValueError, "%s bounds: bad length", axis);
        return -1;
    }
    Py_ssize_t n = b->len / (2 * (Py_ssize_t)sizeof(int32_t));
    if (n < 1 || n > INT_MAX / 4 || k->len != n * ks * (Py_ssize_t)sizeof(int32_t)) {
        PyErr_Format(PyExc_ValueError, "%s coefficients: bad length", axis);
        return -1;
    }
    const int32_t *v = (const int32_t *)b->buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t first = v[2 * i], len = v[2 * i + 1];
        if (first < 0 || len < 1 || len > ks || first > insize - len) {
            PyErr_Format(PyExc_ValueError, "%s bounds out of range", axis);
            return -1;
        }
    }
    *nout = (int)n;
    return 0;
}

static PyObject *
py_resample(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer src, hb, hk, vb, vk, out;
    int width, height, hks, vks, hfirst;
    Py_ssize_t stride;
    if (!PyArg_ParseTuple(args, "y*iiny*y*iy*y*ipw*", &src, &width, &height, &stride, &hb, &hk,
                          &hks, &vb, &vk, &vks, &hfirst, &out)) {
        return NULL;
    }
    PyObject *result = NULL;
    int nx = 0, ny = 0, rc;
    if (width < 1 || height < 1 || width > INT_MAX / 4 || height > INT_MAX / 4 ||
        stride < (Py_ssize_t)width * 3 ||
        src.len < (Py_ssize_t)(height - 1) * stride + (Py_ssize_t)width * 3) {
        PyErr_SetString(PyExc_ValueError, "source buffer does not match its size");
        goto done;
    }
    if (check_bounds(&hb, &hk, hks, width, &nx, "horizontal") ||
        check_bounds(&vb, &vk, vks, height, &ny, "vertical")) {
        goto done;
    }
    if (out.len != (Py_ssize_t)3 * nx * ny) {
        PyErr_SetString(PyExc_ValueError, "output buffer must hold 3 x rows x columns bytes");
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    rc = resample_region((const uint8_t *)src.buf, (ptrdiff_t)stride, nx,
                         (const int32_t *)hb.buf, (const int32_t *)hk.buf, hks, ny,
                         (const int32_t *)vb.buf, (const int32_t *)vk.buf, vks, hfirst,
                         (uint8_t *)out.buf);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&hb);
    PyBuffer_Release(&hk);
    PyBuffer_Release(&vb);
    PyBuffer_Release(&vk);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"resample", py_resample, METH_VARARGS,
     "resample(src, width, height, row_stride, hbounds, hcoeffs, hksize, vbounds, vcoeffs, "
     "vksize, horizontal_first, out)\n\n"
     "Two-pass fixed-point resampling of the interleaved RGB uint8 image `src` into the "
     "planar uint8 buffer `out` (3 x rows x columns). Bounds are int32 (first, count) pairs "
     "per output column/row, coefficients int32 (count x ksize), as Pillow computes them."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "clipfeat._resample",
    "Exact two-pass resampling of RGB uint8 images (Pillow's arithmetic), crop region only.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__resample(void) {
    return PyModule_Create(&module);
}
