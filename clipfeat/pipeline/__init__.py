"""The extraction run: sources -> plan -> decode workers -> tower -> shard writer.

Stages run at once so the device never waits: decode worker processes (fed by a feeder
thread, `feed`) turn files into uint8 arrays in plan order; the calling thread normalises
batches on the device and runs the tower (`device`, driven by `loop`); a writer thread
appends rows to the open shard of each chunk and a committer thread commits each shard
(checksum, fsync, rename) as soon as its chunk is complete (`sink`). `extract` runs the
steps in order (`extract`), from one frozen record of the settings (`settings`).
"""

from clipfeat.pipeline.extract import extract
from clipfeat.pipeline.summary import Progress, Summary

__all__ = ["Progress", "Summary", "extract"]
