"""The node-local copy of a checkpoint on object storage, and a checkpoint's identity.

`from_pretrained` and vLLM read local files only, so every consumer of an `s3://` checkpoint (sampler
actors, evaluation, Serve replicas) goes through `local_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

import pyarrow.fs as pafs

from inbol_ray.data import io as dio

CACHE_ENV = "INBOL_CHECKPOINT_CACHE"
"""Where checkpoints on object storage are copied to (default: `<tmp>/inbol-checkpoints`)."""


def local_dir(location: str) -> str:
    """A local directory holding `location`'s files: the path itself, or a cached copy of a remote one.

    The copy is keyed by the URI and by the remote file listing (names, sizes), so a retrained checkpoint
    is fetched again and an unchanged one is not. Several processes on a node (sampler actors, Serve
    replicas) ask for the same checkpoint at once: each copies into a private temporary folder and renames
    it into place, so no reader ever sees a half-copied safetensors file; the loser of the race drops its
    copy and uses the winner's.
    """
    if not dio.is_uri(location) or location.startswith("file://"):
        return dio.resolve(location)[1]
    fs, path = dio.resolve(location)
    listing = sorted(
        (info.path[len(path) :], info.size)
        for info in fs.get_file_info(pafs.FileSelector(path, recursive=True))
        if info.type == pafs.FileType.File
    )
    if not listing:
        raise FileNotFoundError(f"checkpoint not found or empty: {location}")
    root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "inbol-checkpoints")
    stamp = json.dumps({"uri": location, "files": listing})
    out = os.path.join(root, _digest(location), _digest(stamp))
    if os.path.isdir(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".copy-", dir=os.path.dirname(out))
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        with open(os.path.join(tmp, ".inbol_copied_from.json"), "w") as f:
            f.write(stamp)
        os.rename(tmp, out)
    except OSError:
        if not os.path.isdir(out):  # a real copy failure, not a lost race
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stamp(location: str) -> list[tuple[str, int]]:
    """Names and sizes of a checkpoint's files (mtimes where local): retraining changes it, reading does not."""
    fs, path = dio.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    files = sorted(
        (info.path[len(path) :], info.size, info.mtime_ns if isinstance(fs, pafs.LocalFileSystem) else 0)
        for info in infos
        if info.type == pafs.FileType.File and "/ray/" not in info.path[len(path) :]
    )
    if not files:
        raise FileNotFoundError(f"checkpoint directory not found or empty: {location}")
    return files
