"""resolve_model: local folders, the HF cache, weights policy, unsupported models."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from clipfeat.errors import ConfigError, ModelError
from clipfeat.modelref import ModelRef, resolve_model


def _copy(src: Path, dst: Path, *names: str) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.mark.parametrize(
    "fixture, model_type, family, config_cls",
    [
        ("clip_full_dir", "clip", "clip", "CLIPVisionConfig"),
        ("clip_vision_dir", "clip_vision_model", "clip", "CLIPVisionConfig"),
        ("siglip_dir", "siglip_vision_model", "siglip", "SiglipVisionConfig"),
        ("config_only_vitl336", "clip", "clip", "CLIPVisionConfig"),
    ],
)
def test_local_folder_matches_transformers_config(request, fixture, model_type, family,
                                                  config_cls):
    import transformers

    path = request.getfixturevalue(fixture)
    ref = resolve_model(str(path))
    expected = getattr(transformers, config_cls).from_pretrained(path)

    assert isinstance(ref, ModelRef)
    assert ref.local_dir == path.resolve()
    assert ref.revision is None
    assert ref.model_type == model_type
    assert ref.family == family
    assert ref.has_cls_token is (family == "clip")
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(ref, key) == getattr(expected, key), key
    assert type(ref.vision_config) is type(expected)
    assert ref.vision_config.to_dict() == expected.to_dict()
    assert ref.num_patches == (expected.image_size // expected.patch_size) ** 2
    assert ref.preprocessor_config == json.loads((path / "preprocessor_config.json").read_text())


def test_weights_file_found_or_none(clip_full_dir, config_only_vitl336):
    assert resolve_model(str(clip_full_dir), need_weights=True).weights_file == (
        clip_full_dir.resolve() / "model.safetensors"
    )
    assert resolve_model(str(config_only_vitl336)).weights_file is None


def test_config_only_folder_refused_when_weights_needed(config_only_vitl336):
    with pytest.raises(ModelError, match="has no weights"):
        resolve_model(str(config_only_vitl336), need_weights=True)


def test_pickle_only_refused_unless_allowed(tmp_path, clip_vision_dir):
    import torch
    from safetensors.torch import load_file

    folder = _copy(clip_vision_dir, tmp_path / "pickle", "config.json")
    torch.save(load_file(clip_vision_dir / "model.safetensors"), folder / "pytorch_model.bin")

    with pytest.raises(ModelError, match="--allow-pickle") as err:
        resolve_model(str(folder), need_weights=True)
    assert "\n" not in str(err.value)
    ref = resolve_model(str(folder), need_weights=True, allow_pickle=True)
    assert ref.weights_file == folder.resolve() / "pytorch_model.bin"


def test_sharded_index_with_missing_shard(tmp_path, clip_vision_dir):
    from safetensors.torch import load_file, save_file

    folder = _copy(clip_vision_dir, tmp_path / "sharded", "config.json")
    tensors = load_file(clip_vision_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    first, second = shards
    save_file({k: tensors[k] for k in shards[first]}, folder / first)
    with pytest.raises(ModelError, match=r"model-00002-of-00002\.safetensors"):
        resolve_model(str(folder), need_weights=True)

    save_file({k: tensors[k] for k in shards[second]}, folder / second)
    ref = resolve_model(str(folder), need_weights=True)
    assert ref.weights_file.name == "model.safetensors.index.json"


def test_non_vision_model_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
               intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        resolve_model(str(tmp_path))
    msg = str(err.value)
    assert "'bert'" in msg and "clip_vision_model" in msg and "siglip" in msg


def test_llava_checkpoint_points_to_its_tower(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llava_llama", "mm_vision_tower": "openai/clip-vit-large-patch14-336"}))
    with pytest.raises(ModelError, match="--model openai/clip-vit-large-patch14-336"):
        resolve_model(str(tmp_path))


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_malformed_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"config\.json"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no-such-clipfeat-dir",
                                  "a/b/c"])
def test_missing_path_is_not_a_hub_name(name):
    with pytest.raises(ModelError, match="no such model folder"):
        resolve_model(name)


def test_model_error_is_config_error():
    with pytest.raises(ConfigError):
        resolve_model("/no/such/dir")


def test_unknown_hub_name_offline():
    with pytest.raises(ModelError) as err:
        resolve_model("clipfeat-test/does-not-exist")
    msg = str(err.value)
    assert "clipfeat-test/does-not-exist" in msg
    assert "--model" in msg and "HF_HUB_OFFLINE" in msg
    assert "\n" not in msg


def test_invalid_hub_name():
    with pytest.raises(ModelError, match="valid hub name"):
        resolve_model("bad name!!")


def test_hub_name_resolved_from_cache(tmp_path, monkeypatch, clip_vision_dir):
    """A repo already in the HF cache resolves offline to its snapshot and commit."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-clip"
    snapshot = _copy(clip_vision_dir, repo / "snapshots" / commit, "config.json",
                     "preprocessor_config.json", "model.safetensors")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    ref = resolve_model("acme/tiny-clip", need_weights=True)
    assert ref.local_dir == snapshot.resolve()
    assert ref.revision == commit
    assert ref.model_type == "clip_vision_model"
    assert ref.weights_file == snapshot.resolve() / "model.safetensors"


def test_revision_ignored_for_local_folder(clip_vision_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="clipfeat.modelref"):
        ref = resolve_model(str(clip_vision_dir), revision="v1")
    assert ref.revision is None
    assert "revision 'v1' ignored" in caplog.text


def test_geometry_agrees_with_transformers_on_old_openai_config(tmp_path):
    """Old openai/* configs also carry vision_config_dict; we read what the vision model loads."""
    from transformers import CLIPVisionConfig

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "clip",
        "vision_config": {"hidden_size": 1024, "image_size": 336, "patch_size": 14,
                          "num_hidden_layers": 24, "num_attention_heads": 16},
        "vision_config_dict": {"hidden_size": 1024, "image_size": 336, "patch_size": 14,
                               "num_hidden_layers": 24, "num_attention_heads": 16},
    }))
    ref = resolve_model(str(tmp_path))
    expected = CLIPVisionConfig.from_pretrained(tmp_path)
    got = (ref.hidden_size, ref.image_size, ref.patch_size, ref.num_hidden_layers)
    assert got == (expected.hidden_size, expected.image_size, expected.patch_size,
                   expected.num_hidden_layers) == (1024, 336, 14, 24)
    assert ref.num_patches == 576


@pytest.mark.parametrize("raw, config_cls", [
    ({"model_type": "clip", "vision_config": {}}, "CLIPVisionConfig"),
    ({"model_type": "clip_vision_model"}, "CLIPVisionConfig"),
    ({"model_type": "siglip", "vision_config": {}}, "SiglipVisionConfig"),
    ({"model_type": "siglip_vision_model"}, "SiglipVisionConfig"),
])
def test_defaults_when_config_omits_fields(tmp_path, raw, config_cls):
    """Fields missing from config.json take transformers' own defaults."""
    import transformers

    (tmp_path / "config.json").write_text(json.dumps(raw))
    ref = resolve_model(str(tmp_path))
    expected = getattr(transformers, config_cls).from_pretrained(tmp_path)
    for key in ("hidden_size", "num_hidden_layers", "image_size", "patch_size"):
        assert getattr(ref, key) == getattr(expected, key), key


# -- pickle-only hub repos: the SFconvertbot safetensors conversion PR ------------------------

REPO = "acme/pickle-clip"
MAIN_SHA = "a" * 40
PR_SHA = "b" * 40
PR_TITLE = "Adding `safetensors` variant of this model"


class FakeHub:
    """A hub repo with revisions (ref -> commit, files) and discussions, no network.

    ``snapshot_download`` writes into the HF cache as huggingface_hub does (blobs aside):
    ``snapshots/<commit>/<file>`` and ``refs/<revision>`` (so ``refs/refs/pr/N`` for a PR);
    offline it defers to the real function, so the offline tests read what huggingface_hub
    itself would find.
    """

    def __init__(self, monkeypatch, cache: Path):
        import huggingface_hub
        from huggingface_hub import HfApi, constants

        self.cache = cache
        self.revisions: dict[str, tuple[str, dict[str, bytes]]] = {}
        self.discussions: list = []
        self.downloads: list[tuple[str | None, list[str]]] = []
        self.api_calls: list[str] = []
        self.real_snapshot_download = huggingface_hub.snapshot_download
        self.lookup_error: Exception | None = None
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)
        real_model_info = HfApi.model_info

        def model_info(api, *args, **kwargs):
            # Offline, the real snapshot_download asks the real one (which then fails).
            if constants.HF_HUB_OFFLINE:
                if kwargs.get("files_metadata"):  # not the real snapshot_download's call
                    self.api_calls.append("model_info while offline")
                return real_model_info(api, *args, **kwargs)
            return self.model_info(*args, **kwargs)

        monkeypatch.setattr(HfApi, "model_info", model_info)
        monkeypatch.setattr(HfApi, "get_repo_discussions",
                            lambda _api, *args, **kw: self.get_repo_discussions(*args, **kw))

    @property
    def repo_dir(self) -> Path:
        return self.cache / ("models--" + REPO.replace("/", "--"))

    def add(self, ref: str, commit: str, files: dict[str, bytes]) -> None:
        self.revisions[ref] = (commit, files)

    def add_pr(self, num: int, *, author: str = "SFconvertbot", title: str = PR_TITLE,
               status: str = "open", is_pull_request: bool = True) -> None:
        from datetime import datetime, timezone

        from huggingface_hub.community import Discussion

        self.discussions.append(Discussion(
            title=title, status=status, num=num, repo_id=REPO, repo_type="model",
            author=author, is_pull_request=is_pull_request,
            created_at=datetime.now(timezone.utc), endpoint="https://huggingface.co"))

    def _resolve(self, revision: str | None) -> tuple[str, dict[str, bytes]]:
        from huggingface_hub.utils import RevisionNotFoundError

        revision = revision or "main"
        for ref, (commit, files) in self.revisions.items():
            if revision in (ref, commit):
                return commit, files
        raise RevisionNotFoundError(f"no revision {revision}", response=None)

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, **kwargs):
        import fnmatch

        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return self.real_snapshot_download(repo_id, revision=revision,
                                               allow_patterns=allow_patterns, **kwargs)
        assert repo_id == REPO
        self.downloads.append((revision, list(allow_patterns)))
        commit, files = self._resolve(revision)
        folder = self.repo_dir / "snapshots" / commit
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            if any(fnmatch.fnmatchcase(name, p) for p in allow_patterns):
                (folder / name).write_bytes(data)
        ref = revision or "main"
        if ref != commit:
            (self.repo_dir / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
            (self.repo_dir / "refs" / ref).write_text(commit)
        return str(folder)

    def model_info(self, repo_id, *, revision=None, files_metadata=False, **kwargs):
        import hashlib
        from types import SimpleNamespace

        from huggingface_hub.hf_api import RepoSibling

        self.api_calls.append(f"model_info {revision}")
        if self.lookup_error is not None:
            raise self.lookup_error
        assert repo_id == REPO and files_metadata
        commit, files = self._resolve(revision)
        siblings = [RepoSibling(rfilename=name, size=len(data),
                                blob_id=hashlib.sha1(data).hexdigest())
                    for name, data in files.items()]
        return SimpleNamespace(sha=commit, siblings=siblings)

    def get_repo_discussions(self, repo_id, **filters):
        self.api_calls.append(f"discussions {filters}")
        assert repo_id == REPO
        return iter(self.discussions)  # the server-side filters are ignored on purpose


@pytest.fixture
def pickle_repo(monkeypatch, tmp_path, clip_vision_dir):
    """main: configs + pytorch_model.bin only; refs/pr/3: the same + model.safetensors."""
    hub = FakeHub(monkeypatch, tmp_path / "hub")
    main = {name: (clip_vision_dir / name).read_bytes()
            for name in ("config.json", "preprocessor_config.json")}
    # Stands in for the pickle (never unpickled here); as large as the weights it replaces.
    weights = (clip_vision_dir / "model.safetensors").read_bytes()
    main["pytorch_model.bin"] = b"pickle weights" + bytes(len(weights))
    main["README.md"] = b"readme"
    hub.add("main", MAIN_SHA, main)
    hub.add("refs/pr/3", PR_SHA, dict(main, **{"model.safetensors": weights}))
    return hub


def _pickle_downloaded(hub: FakeHub) -> bool:
    return any(p.name.endswith(".bin") for p in hub.repo_dir.rglob("*"))


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_only_repo_uses_bot_conversion_pr(pickle_repo, clip_vision_dir, allow_pickle):
    """As transformers' use_safetensors=True: main's configs, weights from SFconvertbot's PR."""
    hub = pickle_repo
    hub.add_pr(1, title="Update README.md")                 # not the bot's title
    hub.add_pr(2, status="closed")                          # closed
    hub.add_pr(3)

    ref = resolve_model(REPO, need_weights=True, allow_pickle=allow_pickle)

    pr_dir = (hub.repo_dir / "snapshots" / PR_SHA).resolve()
    assert ref.local_dir.resolve() == pr_dir
    assert ref.weights_file.resolve() == pr_dir / "model.safetensors"
    assert ref.revision == MAIN_SHA
    assert ref.weights_revision == f"refs/pr/3@{PR_SHA}"
    assert (hub.repo_dir / "refs" / "refs" / "pr" / "3").read_text() == PR_SHA
    # Prefer safetensors even when pickle is allowed: the pickle is never downloaded.
    assert not _pickle_downloaded(hub)
    assert all(not any(p.endswith(".bin") for p in pats) for _, pats in hub.downloads)
    assert ref.model_type == "clip_vision_model" and ref.hidden_size == 32


def test_conversion_pr_folder_loads_in_transformers(pickle_repo, clip_vision_dir):
    """local_dir holds config + weights, as tower.load_model's from_pretrained needs."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionModel

    pickle_repo.add_pr(3)
    ref = resolve_model(REPO, need_weights=True)
    model = CLIPVisionModel.from_pretrained(str(ref.local_dir), local_files_only=True,
                                            use_safetensors=True)
    expected = load_file(clip_vision_dir / "model.safetensors")
    state = model.state_dict()
    key = next(k for k in expected if k.endswith("patch_embedding.weight"))
    assert torch.equal(state[key], expected[key])


@pytest.mark.parametrize("author", ["mallory", "sfconvertbot", "SFconvertbot2"])
def test_conversion_pr_by_someone_else_is_ignored(pickle_repo, author):
    pickle_repo.add_pr(3, author=author)
    with pytest.raises(ModelError, match="--allow-pickle") as err:
        resolve_model(REPO, need_weights=True)
    assert "\n" not in str(err.value)
    assert not (pickle_repo.repo_dir / "snapshots" / PR_SHA).exists()  # never downloaded

    ref = resolve_model(REPO, need_weights=True, allow_pickle=True)
    assert ref.weights_file.name == "pytorch_model.bin"
    assert ref.local_dir.name == MAIN_SHA and ref.weights_revision is None


def test_no_conversion_pr(pickle_repo):
    with pytest.raises(ModelError, match="--allow-pickle"):
        resolve_model(REPO, need_weights=True)
    assert any(c.startswith("discussions") for c in pickle_repo.api_calls)
    assert not _pickle_downloaded(pickle_repo)


@pytest.mark.parametrize("changed", ["pytorch_model.bin", "config.json"])
def test_bot_pr_of_other_weights_or_configs_is_ignored(pickle_repo, changed):
    """Main changed after the conversion: the PR no longer holds main's model."""
    commit, files = pickle_repo.revisions["refs/pr/3"]
    pickle_repo.add("refs/pr/3", commit, dict(files, **{changed: files[changed] + b" "}))
    pickle_repo.add_pr(3)
    with pytest.raises(ModelError, match="--allow-pickle"):
        resolve_model(REPO, need_weights=True)
    assert not (pickle_repo.repo_dir / "snapshots" / PR_SHA).exists()


def test_no_lookup_when_main_has_safetensors_or_for_other_revisions(pickle_repo, clip_vision_dir):
    pickle_repo.add_pr(3)
    pickle_repo.add("v1.0", "c" * 40, pickle_repo.revisions["main"][1])
    with pytest.raises(ModelError, match="--allow-pickle"):
        resolve_model(REPO, revision="v1.0", need_weights=True)
    assert pickle_repo.api_calls == []

    safe = dict(pickle_repo.revisions["refs/pr/3"][1])
    pickle_repo.add("main", "d" * 40, safe)
    ref = resolve_model(REPO, need_weights=True)
    assert ref.local_dir.name == "d" * 40 and ref.weights_revision is None
    assert pickle_repo.api_calls == []

    ref = resolve_model(REPO, revision="v1.0")  # configs only: no weights, no lookup
    assert ref.weights_file is None and ref.weights_revision is None
    assert pickle_repo.api_calls == []


def test_offline_uses_conversion_pr_cached_by_an_earlier_run(pickle_repo, monkeypatch):
    from huggingface_hub import constants

    pickle_repo.add_pr(3)
    online = resolve_model(REPO, need_weights=True)
    calls = len(pickle_repo.api_calls)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    ref = resolve_model(REPO, need_weights=True)
    assert len(pickle_repo.api_calls) == calls  # no hub call offline
    assert ref.local_dir == online.local_dir
    assert ref.weights_file == online.weights_file
    assert ref.revision == MAIN_SHA
    assert ref.weights_revision == f"refs/pr/3@{PR_SHA}"
    # huggingface_hub itself resolves the cached PR ref to the same folder.
    real = pickle_repo.real_snapshot_download(REPO, revision="refs/pr/3")
    assert Path(real).resolve() == ref.local_dir.resolve()


def test_offline_cached_pr_must_match_main_configs(pickle_repo, monkeypatch):
    from huggingface_hub import constants

    pickle_repo.add_pr(3)
    resolve_model(REPO, need_weights=True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (pickle_repo.repo_dir / "snapshots" / PR_SHA / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="--allow-pickle"):
        resolve_model(REPO, need_weights=True)


def test_offline_several_cached_prs_is_ambiguous(pickle_repo, monkeypatch):
    from huggingface_hub import constants

    pickle_repo.add_pr(3)
    resolve_model(REPO, need_weights=True)
    shutil.copytree(pickle_repo.repo_dir / "snapshots" / PR_SHA,
                    pickle_repo.repo_dir / "snapshots" / ("e" * 40))
    (pickle_repo.repo_dir / "refs" / "refs" / "pr" / "7").write_text("e" * 40)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"refs/pr/3, refs/pr/7.*--revision"):
        resolve_model(REPO, need_weights=True)


def test_hub_unreachable_falls_back_to_cached_pr(pickle_repo, caplog):
    pickle_repo.add_pr(3)
    first = resolve_model(REPO, need_weights=True)
    pickle_repo.lookup_error = ConnectionError("no route to host")
    with caplog.at_level(logging.WARNING, logger="clipfeat.modelref"):
        ref = resolve_model(REPO, need_weights=True)
    assert ref.weights_file == first.weights_file
    assert ref.weights_revision == f"refs/pr/3@{PR_SHA}"
    assert "no route to host" in caplog.text


def test_offline_without_cached_pr(pickle_repo, monkeypatch):
    from huggingface_hub import constants

    pickle_repo.add_pr(3)
    resolve_model(REPO)  # caches main's configs only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="--allow-pickle"):
        resolve_model(REPO, need_weights=True)
    assert pickle_repo.api_calls == []


def test_tower_loads_conversion_pr_weights(pickle_repo, clip_vision_dir):
    """CLIPVisionTower (delay_load, then load_model) ends up on the PR's safetensors."""
    from types import SimpleNamespace

    import torch
    from safetensors.torch import load_file

    from clipfeat.tower import CLIPVisionTower

    pickle_repo.add_pr(3)
    tower = CLIPVisionTower(REPO, SimpleNamespace(mm_vision_select_layer=-2), delay_load=True)
    tower.load_model()
    assert tower.model_ref.weights_revision == f"refs/pr/3@{PR_SHA}"
    expected = load_file(clip_vision_dir / "model.safetensors")
    key = next(k for k in expected if k.endswith("patch_embedding.weight"))
    got = dict(tower.vision_tower.named_parameters())[key]
    assert torch.equal(got, expected[key])
    assert not _pickle_downloaded(pickle_repo)


def _hub_offline_error(kind: str) -> Exception:
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return {"local": LocalEntryNotFoundError("cannot find the requested files in the cache"),
            "offline": OfflineModeIsEnabled("offline mode is enabled"),
            "connection": ConnectionError("[Errno 101] Network is unreachable")}[kind]


@pytest.mark.parametrize("kind", ["local", "offline", "connection"])
def test_default_model_offline_hint_and_no_raw_hub_lines(monkeypatch, capfd, kind):
    """The default model, not cached, hub unreachable: one ModelError line leading to weights
    clipfeat accepts; huggingface_hub's retry warnings, bars and warnings never print."""
    import warnings

    import huggingface_hub
    from huggingface_hub.utils import logging as hf_logging
    from huggingface_hub.utils import tqdm as hf_tqdm

    def snapshot_download(repo_id, **kwargs):
        hf_logging.get_logger("huggingface_hub.utils._http").warning(
            "Retrying in 1s [Retry 1/5].")
        warnings.warn("huggingface_hub chatter", UserWarning, stacklevel=1)
        for _ in hf_tqdm(range(3), desc="Fetching 2 files"):
            pass
        raise _hub_offline_error(kind)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    name = "openai/clip-vit-large-patch14-336"
    with pytest.raises(ModelError) as err:
        resolve_model(name, need_weights=True)
    out, errout = capfd.readouterr()
    assert out == "" and errout == ""
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"no such folder or cached model: {name} ")
    assert f"python -m clipfeat.hub {name}" in msg
    assert "safetensors conversion by SFconvertbot" in msg
    assert "--allow-pickle" in msg and "can run arbitrary code" in msg
    assert "hf download" not in msg  # main's pytorch_model.bin: weights clipfeat refuses


def test_offline_pickle_only_main_hint(pickle_repo, monkeypatch, capfd):
    """Configs cached, no safetensors conversion cached, offline: say how to get one."""
    from huggingface_hub import constants

    pickle_repo.add_pr(3)
    resolve_model(REPO)  # caches main's configs only
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as err:
        resolve_model(REPO, need_weights=True)
    msg = str(err.value)
    assert "hub cannot be reached" in msg and f"python -m clipfeat.hub {REPO}" in msg
    assert "--allow-pickle loads them, but unpickling can run arbitrary code" in msg
    assert capfd.readouterr() == ("", "")


def test_hub_quiet_restores_logging():
    from clipfeat.hub import quiet

    hf = logging.getLogger("huggingface_hub")
    before = (hf.handlers[:], hf.propagate, hf.level)
    with quiet():
        assert not hf.propagate
    assert (hf.handlers, hf.propagate, hf.level) == before


def test_hub_module_fetches_the_conversion(pickle_repo, capsys):
    from clipfeat import hub

    pickle_repo.add_pr(3)
    assert hub.main([REPO]) == 0
    out = capsys.readouterr().out
    assert f"weights from refs/pr/3@{PR_SHA}" in out
    assert hub.main(["./no/such/dir"]) == 2


@pytest.mark.parametrize("name", ["runs/exx", "runs/exx/"])
def test_mistyped_relative_path_is_a_missing_folder(tmp_path, monkeypatch, name):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match=r"no such (folder|model folder)"):
        resolve_model(name)
