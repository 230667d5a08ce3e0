"""The checkpoint cache (content-keyed, private, bounded) and the optimizer state a resume reads.

Why these checks: a retrained adapter of the same size used to be served from a stale copy; the cache lived
at a shared predictable path any user could plant weights in; it grew without bound and copied Ray Train
state nobody loads; and a resume unpickled the optimizer file from storage in full (code execution for
whoever can write the bucket). The cache runs here on local folders through the same code path as object
storage (`cached_copy` takes any pyarrow filesystem); the ETag side is tests/integration/
test_checkpoint_cache_s3.py.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn

from inbol_ray import checkpoint_cache as cc
from inbol_ray.train import loop_checkpoint as lc

URI = "s3://bucket/models/cadpo"
"""The name an entry is keyed by; the files come from a local folder."""


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(cc.CACHE_ENV, str(root))
    monkeypatch.setenv(cc.CACHE_BYTES_ENV, "")  # the default bound; tests that set it are undone after
    return root


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _checkpoint(root: Path) -> Path:
    """A training output: adapter and records, plus training state no loader reads."""
    _write(root / "adapter" / "adapter_config.json", b'{"r": 8}')
    _write(root / "adapter" / "adapter_model.safetensors", b"A" * 64)
    _write(root / "metrics.jsonl", b"{}\n")
    _write(root / "ray" / "cadpo-1" / "checkpoint_000002" / "optimizer.pt", b"O" * 32)
    _write(root / "tensorboard" / "events.out", b"T" * 16)
    _write(root / "optimizer.pt", b"O" * 8)
    return root


def _copy(src: Path) -> str:
    return cc.cached_copy(pafs.LocalFileSystem(), str(src), URI)


def _files(directory: str | Path) -> set[str]:
    root = Path(directory)
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


# --- identity ----------------------------------------------------------------------------------------------


def test_stamp_of_a_local_folder_is_names_sizes_mtimes_without_training_state(tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "ckpt")
    found = cc.stamp(str(src))
    weights = src / "adapter" / "adapter_model.safetensors"
    names = [name for name, _, _ in found]
    assert names == ["/adapter/adapter_config.json", "/adapter/adapter_model.safetensors", "/metrics.jsonl"]
    assert ("/adapter/adapter_model.safetensors", 64, weights.stat().st_mtime_ns) in found
    json.dumps(found)  # hashed into stage manifests

    before = cc.stamp(str(src))
    weights.write_bytes(b"B" * 64)  # same size, other bytes
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    assert cc.stamp(str(src)) != before
    _write(src / "ray" / "cadpo-1" / "checkpoint_000004" / "optimizer.pt", b"O" * 32)
    _write(src / "tensorboard" / "events.out", b"T" * 99)
    assert cc.stamp(str(src)) == cc.stamp(str(src)), "reading must not change it"
    assert len(cc.stamp(str(src))) == 3, "training state joined the identity"


def test_stamp_of_a_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cc.stamp(str(tmp_path / "nothing"))


@pytest.mark.parametrize(
    ("relative", "expected"),
    [
        ("/ray/run/checkpoint_000001/trainable.safetensors", True),
        ("/tensorboard/events.out.tfevents", True),
        ("/optimizer.pt", True),
        ("/adapter/adapter_model.safetensors", False),
        ("/model-00001-of-00003.safetensors", False),
        ("/rayleigh/config.json", False),
    ],
)
def test_training_state_is_recognised(relative: str, expected: bool) -> None:
    assert cc.is_training_state(relative) is expected


def test_object_store_tag_is_read_from_metadata() -> None:
    assert cc.tag_of({"Content-Length": b"3", "ETag": b'"abc"'}) == 'etag:"abc"'
    assert cc.tag_of({"Content-Length": b"3"}) is None


def test_local_paths_are_not_copied(tmp_path: Path) -> None:
    assert cc.local_dir(str(tmp_path)) == str(tmp_path)
    assert cc.local_dir(f"file://{tmp_path}") == str(tmp_path)


# --- the cache ---------------------------------------------------------------------------------------------


def test_copy_holds_model_files_only_and_is_reused(cache: Path, tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "ckpt")
    first = _copy(src)
    assert Path(first).parent == cache
    assert _files(first) == {
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "metrics.jsonl",
        cc.MARKER,
    }
    marker = Path(first) / cc.MARKER
    os.utime(marker, (1, 1))
    assert _copy(src) == first, "an unchanged checkpoint was copied again"
    assert marker.stat().st_mtime > 1, "a hit must refresh the entry's last use"
    assert len(os.listdir(cache)) == 1


def test_same_size_rewrite_gets_a_new_entry_with_the_new_bytes(cache: Path, tmp_path: Path) -> None:
    src = _checkpoint(tmp_path / "ckpt")
    first = _copy(src)
    weights = src / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"B" * 64)
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    second = _copy(src)
    assert second != first
    assert (Path(second) / "adapter" / "adapter_model.safetensors").read_bytes() == b"B" * 64
    assert (Path(first) / "adapter" / "adapter_model.safetensors").read_bytes() == b"A" * 64


def test_a_lost_race_uses_the_winners_copy(cache: Path, tmp_path: Path) -> None:
    """Another process renamed its copy into place first: ours is dropped, no `.copy-*` is left behind."""
    src = _checkpoint(tmp_path / "ckpt")
    winner = _copy(src)
    marker = json.loads((Path(winner) / cc.MARKER).read_text())
    files = [tuple(f) for f in marker["files"]]
    key = json.dumps({"uri": URI, "files": files})
    assert cc._copy_entry(pafs.LocalFileSystem(), str(src), files, winner, key)
    assert os.listdir(cache) == [Path(winner).name]


def test_cache_root_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(cc.CACHE_ENV, raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    root = cc.cache_root()
    assert root == str(tmp_path / f"inbol-checkpoints-{os.getuid()}")
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_cache_root_writable_by_others_is_refused(cache: Path, mode: int) -> None:
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(PermissionError, match="writable by group or others"):
        cc.cache_root()


def test_cache_root_that_is_a_symlink_is_refused(cache: Path, tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    cache.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PermissionError, match="not a directory"):
        cc.cache_root()


def test_cache_root_owned_by_another_user_is_refused() -> None:
    """Only root could create such a folder here, so the check itself is fed another owner's status."""
    mode = stat.S_IFDIR | 0o700
    theirs = os.stat_result((mode, 0, 0, 1, os.getuid() + 1, 0, 0, 0, 0, 0))
    ours = os.stat_result((mode, 0, 0, 1, os.getuid(), 0, 0, 0, 0, 0))
    assert "owned by uid" in cc.not_private(theirs, os.getuid())
    assert cc.not_private(ours, os.getuid()) is None


def test_configure_sets_what_workers_inherit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cc.CACHE_ENV, "/from/env")
    monkeypatch.setenv(cc.CACHE_BYTES_ENV, "")
    cc.configure("", 5_000)
    assert os.environ[cc.CACHE_ENV] == "/from/env", "an empty cache_dir must leave the env in charge"
    assert cc.cache_bytes() == 5_000
    cc.configure(str(tmp_path / "c"), 7)
    assert os.environ[cc.CACHE_ENV] == str(tmp_path / "c")
    monkeypatch.setenv(cc.CACHE_BYTES_ENV, "2e9")
    assert cc.cache_bytes() == 2_000_000_000
    with pytest.raises(ValueError, match="checkpoint.cache_dir"):
        cc.configure("s3://bucket/cache", 7)


def test_ray_session_configures_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from inbol_ray.config import CheckpointConfig
    from inbol_ray.runtime import configure_checkpoint_cache

    monkeypatch.setenv(cc.CACHE_ENV, "")
    monkeypatch.setenv(cc.CACHE_BYTES_ENV, "")
    configure_checkpoint_cache(CheckpointConfig(cache_dir=str(tmp_path), cache_bytes=123))
    assert (os.environ[cc.CACHE_ENV], cc.cache_bytes()) == (str(tmp_path), 123)


# --- eviction ----------------------------------------------------------------------------------------------


def test_to_evict_drops_least_recently_used_until_it_fits() -> None:
    found = [(3.0, 40, "c"), (1.0, 40, "a"), (2.0, 40, "b"), (4.0, 40, "d")]
    assert cc.to_evict(found, budget=100, keep="d") == ["a", "b"]
    assert cc.to_evict(found, budget=160, keep="d") == []
    assert cc.to_evict(found, budget=10, keep="a") == ["b", "c", "d"], "the entry returned must stay"


def test_a_new_copy_evicts_old_entries_beyond_the_budget(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three checkpoints of 200 bytes under a 450-byte bound: the least recently used one goes."""
    srcs = []
    for i, name in enumerate(["a", "b", "c"]):
        src = _write(tmp_path / name / "model.safetensors", bytes([i]) * 200).parent
        srcs.append(src)
    monkeypatch.setenv(cc.CACHE_BYTES_ENV, "450")
    a = cc.cached_copy(pafs.LocalFileSystem(), str(srcs[0]), "s3://bucket/a")
    b = cc.cached_copy(pafs.LocalFileSystem(), str(srcs[1]), "s3://bucket/b")
    os.utime(Path(b) / cc.MARKER, (10, 10))
    os.utime(Path(a) / cc.MARKER, (20, 20))  # a used after b: b is the least recently used
    c = cc.cached_copy(pafs.LocalFileSystem(), str(srcs[2]), "s3://bucket/c")
    assert sorted(os.listdir(cache)) == sorted([Path(a).name, Path(c).name])

    monkeypatch.setenv(cc.CACHE_BYTES_ENV, "100")  # smaller than one entry: the one returned still stays
    again = cc.cached_copy(pafs.LocalFileSystem(), str(srcs[1]), "s3://bucket/b")
    assert os.listdir(cache) == [Path(again).name]
    assert (Path(again) / "model.safetensors").read_bytes() == bytes([1]) * 200


def test_folders_that_are_not_entries_are_left_alone(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy in progress (another process's `.copy-*`) holds no marker: never counted, never evicted."""
    cache.mkdir(mode=0o700)
    _write(cache / ".copy-xyz" / "model.safetensors", b"x" * 1000)
    src = _write(tmp_path / "a" / "model.safetensors", b"a" * 10).parent
    monkeypatch.setenv(cc.CACHE_BYTES_ENV, "1")
    cc.cached_copy(pafs.LocalFileSystem(), str(src), "s3://bucket/a")
    assert (cache / ".copy-xyz" / "model.safetensors").exists()


# --- the optimizer state a resume reads ---------------------------------------------------------------------


class _Payload:
    """Unpickling it opens (creates) `marker`: any code could run in its place."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_read_optimizer_refuses_a_pickle_that_runs_code(tmp_path: Path) -> None:
    live = tmp_path / "live"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(live))}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert live.exists(), "the payload must really run code under a full unpickle"

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoint_000004"
    ckpt.mkdir()
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, ckpt / lc.OPTIMIZER_FILE)
    with pytest.raises(pickle.UnpicklingError):
        lc.read_optimizer(ckpt)
    assert not marker.exists()


def _trained(model: nn.Module) -> torch.optim.Optimizer:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    return opt


class _Scorer(nn.Module):
    """The loop's scorer shape: the policy under `.model`, which gather_state's FSDP path relies on."""

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.model = policy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _policy() -> nn.Module:
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    policy[0].weight.requires_grad_(False)  # frozen and trainable tensors side by side, as with LoRA
    return policy


def test_saved_optimizer_state_loads_back_safely(tmp_path: Path) -> None:
    """What write_checkpoint saves for a plain (DDP / single worker) run reads back with weights only."""
    policy = _policy()
    scorer = _Scorer(policy)
    opt = _trained(scorer)
    trainable, optim = lc.gather_state(scorer, policy, opt)
    lc.write_checkpoint(tmp_path, trainable, optim, {"step": 1})
    fresh = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.1)
    lc.load_optimizer(scorer, fresh, lc.read_optimizer(tmp_path))
    for group in opt.state:
        for name, value in opt.state[group].items():
            torch.testing.assert_close(fresh.state[group][name], value)
    assert fresh.param_groups[0]["betas"] == opt.param_groups[0]["betas"]


def test_fsdp_optimizer_state_loads_back_safely(tmp_path: Path) -> None:
    """FSDP's full optimizer state (gathered on rank 0, keyed by parameter names) reads back the same way:
    one CPU rank in an in-memory gloo group."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    assert not dist.is_initialized(), "another test left a process group in this process"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        policy = _policy()
        scorer = FSDP(_Scorer(policy), use_orig_params=True, device_id=torch.device("cpu"))
        opt = _trained(scorer)
        trainable, optim = lc.gather_state(scorer, policy, opt)
        lc.write_checkpoint(tmp_path, trainable, optim, {"step": 1})
        fresh = torch.optim.AdamW([p for p in scorer.parameters() if p.requires_grad], lr=1e-3)
        lc.load_optimizer(scorer, fresh, lc.read_optimizer(tmp_path))
        assert sorted(fresh.state_dict()["state"]) == sorted(opt.state_dict()["state"])
        for key, value in opt.state_dict()["state"].items():
            torch.testing.assert_close(fresh.state_dict()["state"][key]["exp_avg"], value["exp_avg"])
    finally:
        dist.destroy_process_group()
