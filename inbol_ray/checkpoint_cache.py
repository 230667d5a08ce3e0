"""The node-local copy of a checkpoint on object storage, and a checkpoint's identity.

`from_pretrained` and vLLM read local files only, so every consumer of an `s3://` checkpoint (sampler
actors, evaluation, Serve replicas) goes through `local_dir`.

Why the copy is keyed by content, not by names and sizes: a retrained adapter of the same rank has exactly
the sizes of the old one, so a warm node (a Serve pod, a long-lived worker) kept serving the old weights.
The identity of a remote file is its object store tag (S3's ETag, read with a HEAD request through the
same pyarrow filesystem that copies it), of a local file its size and mtime. Why the cache is private and
bounded: whatever sits in it is loaded into the model later, so nobody else may write there, and a node that
serves many runs would otherwise fill its disk. Training state (Ray Train checkpoints, optimizer state,
TensorBoard logs) is neither copied nor part of the identity: no loader reads it, and it is most of the
bytes of a training output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs

from inbol_ray.data import io as dio

CACHE_ENV = "INBOL_CHECKPOINT_CACHE"
"""Where checkpoints on object storage are copied to (default: `<tmp>/inbol-checkpoints-<uid>`)."""
CACHE_BYTES_ENV = "INBOL_CHECKPOINT_CACHE_BYTES"
"""Bound of the cache in bytes (`200e9` style accepted); least recently used copies go beyond it."""
DEFAULT_CACHE_BYTES = 200_000_000_000
MARKER = ".inbol_copied_from.json"
"""In every cache entry: what it is a copy of and its size; its mtime is the entry's last use."""
TRAINING_STATE_DIRS = frozenset({"ray", "tensorboard"})
TRAINING_STATE_FILES = frozenset({"optimizer.pt", "optimizer.bin", "scheduler.pt"})
COPY_ATTEMPTS = 3
"""Copies tried when the checkpoint changes while it is being copied (a retraining uploading over it)."""

FileId = tuple[str, int, int | str]
"""(path below the checkpoint, starting with `/`; size; mtime_ns, or the object store's `etag:...`)."""


def configure(cache_dir: str, cache_bytes: int) -> None:
    """Put `checkpoint.*` into the environment, the one channel every reader of the cache shares.

    Ray workers started afterwards by this process inherit it; on a cluster the workers and Serve replicas
    read no config, so there the manifests' `runtime_env` sets the same variables. An empty `cache_dir`
    leaves `$INBOL_CHECKPOINT_CACHE` (or the private default) in charge.
    """
    if cache_dir:
        if dio.is_uri(cache_dir):
            raise ValueError(f"checkpoint.cache_dir must be a local folder, not {cache_dir}")
        os.environ[CACHE_ENV] = os.path.abspath(os.path.expanduser(cache_dir))
    os.environ[CACHE_BYTES_ENV] = str(int(cache_bytes))


def cache_bytes() -> int:
    raw = os.environ.get(CACHE_BYTES_ENV, "").strip()
    try:
        return int(float(raw)) if raw else DEFAULT_CACHE_BYTES
    except ValueError:
        raise ValueError(f"{CACHE_BYTES_ENV}={raw!r} is not a number of bytes") from None


def is_training_state(relative: str) -> bool:
    """Files no model loader reads: Ray Train checkpoints, TensorBoard logs, optimizer/scheduler state."""
    *folders, name = relative.strip("/").split("/")
    return name in TRAINING_STATE_FILES or any(f in TRAINING_STATE_DIRS for f in folders)


# --- identity --------------------------------------------------------------------------------------------


def stamp(location: str) -> list[FileId]:
    """The identity of a checkpoint's model files: retraining changes it, reading does not.

    Hashed into evaluation shard manifests (generation/stage.py), so it must be deterministic and JSON
    friendly. A local folder keeps the tuples it always had (name, size, mtime_ns), so evaluation shards of
    existing local runs stay reusable. A Hub id is its resolved commit (`[("hub:<id>", 0, "<commit>")]`): a
    moved branch is another checkpoint, and the snapshot's files never change under a commit.
    """
    from inbol_ray import hub

    found = hub.identity(location)
    if found is not None:
        return [(f"hub:{found['hub']}", 0, found["commit"])]
    fs, path = dio.resolve(location)
    files = _identity(fs, path.rstrip("/"))
    if not files:
        raise FileNotFoundError(f"checkpoint directory not found or empty: {location}")
    return files


def _identity(fs: pafs.FileSystem, path: str) -> list[FileId]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    local = isinstance(fs, pafs.LocalFileSystem)
    out = []
    for info in infos:
        relative = info.path[len(path) :]
        if info.type != pafs.FileType.File or is_training_state(relative):
            continue
        tag = None if local else remote_etag(fs, info.path)
        out.append((relative, info.size, tag or info.mtime_ns))
    return sorted(out)


def remote_etag(fs: pafs.FileSystem, path: str) -> str | None:
    """The store's content tag of an object (one HEAD request), None where the store gives none.

    pyarrow's S3 filesystem returns the HEAD response's ETag as stream metadata (no boto3 needed). Callers
    (here and input_identity.py) fall back to size + mtime, which misses a same-size rewrite within a second.
    """
    with fs.open_input_stream(path) as stream:
        return tag_of(stream.metadata() or {})


def tag_of(metadata: dict[str | bytes, str | bytes]) -> str | None:
    """The first content tag in an object's metadata (pyarrow gives str keys and bytes values on S3)."""
    for key, value in metadata.items():
        name = (key.decode() if isinstance(key, bytes) else key).lower()
        if name in ("etag", "x-amz-version-id", "generation") and value:
            return f"{name}:{value.decode() if isinstance(value, bytes) else value}"
    return None


# --- the cache -------------------------------------------------------------------------------------------


def local_dir(location: str) -> str:
    """A local directory holding `location`'s model files: the path itself, a cached copy of a remote one,
    or a Hub id's snapshot in the hub cache (`inbol_ray.hub`)."""
    from inbol_ray import hub

    location = hub.localize(location)
    if not dio.is_uri(location) or location.startswith("file://"):
        return dio.resolve(location)[1]
    fs, path = dio.resolve(location)
    return cached_copy(fs, path.rstrip("/"), location)


def cached_copy(fs: pafs.FileSystem, path: str, location: str) -> str:
    """The cache entry of the folder `path` on `fs` (`location` names it), copied there when missing.

    The entry is keyed by `location` and the content identity of its files, so a checkpoint overwritten
    with other bytes is fetched again and an unchanged one is not. Several processes on a node (sampler
    actors, Serve replicas) ask for the same checkpoint at once: each copies into a private temporary folder
    and renames it into place, so no reader ever sees a half-copied safetensors file; the loser of the race
    drops its copy and uses the winner's. The identity is read again after the copy: one that changed
    meanwhile (an upload in progress) is not kept under the old key. Any pyarrow filesystem works, which is
    how the unit tests run it on local folders.
    """
    root = cache_root()
    for _ in range(COPY_ATTEMPTS):
        files = _identity(fs, path)
        if not files:
            raise FileNotFoundError(f"checkpoint not found or empty: {location}")
        key = json.dumps({"uri": location, "files": files})
        out = os.path.join(root, _digest(key))
        if _touch(out):
            return out
        if _copy_entry(fs, path, files, out, key):
            evict(root, cache_bytes(), keep=out)
            return out
    raise RuntimeError(
        f"checkpoint {location} changed during each of {COPY_ATTEMPTS} copies: still uploading?"
    )


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _touch(entry: str) -> bool:
    """Mark a complete entry as just used (its LRU clock); False when there is none (or it was evicted)."""
    try:
        os.utime(os.path.join(entry, MARKER))
    except FileNotFoundError:
        return False
    return True


def _copy_entry(fs: pafs.FileSystem, path: str, files: list[FileId], out: str, key: str) -> bool:
    """Copy `files` into the entry `out` atomically; False when the source changed during the copy."""
    tmp = tempfile.mkdtemp(prefix=".copy-", dir=os.path.dirname(out))
    try:
        _copy_files(fs, path, [f[0] for f in files], tmp)
        if _identity(fs, path) != files:
            return False
        marker = {**json.loads(key), "bytes": sum(f[1] for f in files)}
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump(marker, f)
        os.rename(tmp, out)
    except OSError:
        if not _touch(out):  # a real copy failure, not a lost race
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def _copy_files(fs: pafs.FileSystem, path: str, relatives: list[str], dest: str) -> None:
    """Copy the listed files only (training state stays behind), several at a time as pyarrow would."""
    local = pafs.LocalFileSystem()
    for relative in relatives:
        if ".." in relative.split("/"):  # an object key may hold `..`: never write outside the entry
            raise ValueError(f"refusing checkpoint file {relative!r}: it points outside its folder")

    def one(relative: str) -> None:
        os.makedirs(os.path.dirname(dest + relative), exist_ok=True)
        pafs.copy_files(path + relative, dest + relative, source_filesystem=fs, destination_filesystem=local)

    with ThreadPoolExecutor(max_workers=min(8, len(relatives))) as pool:
        list(pool.map(one, relatives))


def cache_root() -> str:
    """The cache folder, created private (0700) and refused when someone else could write into it."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        tempfile.gettempdir(), f"inbol-checkpoints-{os.getuid()}"
    )
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o700)
    problem = not_private(os.lstat(root), os.getuid())
    if problem:
        raise PermissionError(
            f"checkpoint cache {root} {problem}: its files are loaded into models, so only you may write "
            f"there; set {CACHE_ENV} (or checkpoint.cache_dir) to a folder of your own"
        )
    return root


def not_private(st: os.stat_result, uid: int) -> str | None:
    """Why a folder with this (lstat) status is unsafe for `uid` to cache into, or None when it is safe."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory (a symlink?)"
    if st.st_uid != uid:
        return f"is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


# --- eviction --------------------------------------------------------------------------------------------


def entries(root: str) -> list[tuple[float, int, str]]:
    """(last use, bytes, path) of every complete entry; copies in progress (`.copy-*`) are not entries."""
    out = []
    for name in os.listdir(root):
        entry = os.path.join(root, name)
        try:
            used = os.stat(os.path.join(entry, MARKER)).st_mtime
            with open(os.path.join(entry, MARKER)) as f:
                size = int(json.load(f)["bytes"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being evicted, or not ours
        out.append((used, size, entry))
    return out


def to_evict(found: list[tuple[float, int, str]], budget: int, keep: str) -> list[str]:
    """Least recently used entries to drop until the rest fit `budget`; `keep` (being returned) stays even
    when it alone exceeds the budget. An entry another process just got is the most recently used one, so
    it goes last."""
    total = sum(size for _, size, _ in found)
    out = []
    for _, size, entry in sorted(found):
        if total <= budget:
            break
        if entry != keep:
            out.append(entry)
            total -= size
    return out


def evict(root: str, budget: int, keep: str) -> list[str]:
    """Drop least recently used entries beyond `budget`. Each is renamed away first, so no process finds a
    half-deleted entry under its key (it copies afresh); files a process already opened stay readable."""
    dropped = []
    for entry in to_evict(entries(root), budget, keep):
        gone = os.path.join(root, f".evict-{uuid.uuid4().hex}")
        try:
            os.rename(entry, gone)
        except FileNotFoundError:  # another process evicted it first
            continue
        shutil.rmtree(gone, ignore_errors=True)
        dropped.append(entry)
    return dropped
