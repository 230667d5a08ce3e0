"""What a run's outside inputs are, by identity rather than by name: the stage hashes include it.

Why: reuse judged by the config alone hands back stale results when a user corrects an annotation file in
place or re-points `model.path` at a retrained checkpoint under the same name (measured before this: 40
of 40 items kept their old answers after the VQAv2 annotations were edited and prepare rerun). A file's
identity is what changes whenever its bytes can have changed and costs no read: size and modification
time locally, the object store's ETag (or, where none, size and modification time). With `data.verify:
digest` a file is its size and SHA-256 instead: a copy that changes modification times (`cp`, a new
download of the same release) reuses the run, and an edit that keeps size and time (some sync tools, a
filesystem with coarse timestamps) is still seen; each file is read once per (size, mtime) per process.

Image folders are not listed: a published image set is immutable in practice and listing OVEN's 5M images
would cost minutes per run. A replaced image is noticed only through the annotation that names it.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import pyarrow.fs as pafs

from inbol_ray.data import io as dio

_DIGESTS: dict[tuple[str, int, Any], str] = {}


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _file_identity(fs: pafs.FileSystem, info: pafs.FileInfo, uri: str, digest: bool) -> list[Any]:
    """[size, version], or with `digest` [size, content hash]. `version` is the modification time in ns
    locally and the ETag on object storage (`checkpoint_cache.remote_etag`), else its modification time."""
    if isinstance(fs, pafs.LocalFileSystem):
        version: Any = info.mtime_ns
    else:
        from inbol_ray.checkpoint_cache import remote_etag

        version = remote_etag(fs, info.path) or (info.mtime_ns or 0)
    if not digest:
        return [info.size, version]
    key = (uri, info.size, version)
    if key not in _DIGESTS:
        _DIGESTS[key] = _sha256(fs, info.path)
    return [info.size, _DIGESTS[key]]


def identity(location: str, digest: bool = False) -> Any:
    """A file's identity, a folder's as `{relative name: identity}` of its files, or "missing"; a Hub data
    set (`hf://datasets/org/name[@rev]`) is the commit its revision resolves to."""
    if not location:
        return None
    from inbol_ray.data.loaders.hf import hub_identity

    found = hub_identity(location)
    if found is not None:
        return found
    fs, path = dio.resolve(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return _file_identity(fs, info, location, digest)
    if info.type != pafs.FileType.Directory:
        return "missing"
    root = path.rstrip("/") + "/"
    return {
        i.path[len(root) :]: _file_identity(fs, i, dio.join(location, i.path[len(root) :]), digest)
        for i in sorted(fs.get_file_info(pafs.FileSelector(path, recursive=True)), key=lambda i: i.path)
        if i.type == pafs.FileType.File and not i.base_name.startswith((".", "_"))
    }


def spec_files(spec) -> dict[str, str]:
    """The files a data set spec's loader reads besides its images: `path`, VQAv2's annotations beside
    its questions, and the COCO instances file of the mismatch recipe."""
    from inbol_ray.data.loaders.training import vqav2_annotations_path

    files = {"path": spec.path}
    if spec.format == "vqav2" and spec.path:
        with contextlib.suppress(ValueError):  # a misnamed file: prepare's input check names it
            files["annotations"] = vqav2_annotations_path(spec.path)
    if spec.instances:
        files["instances"] = spec.instances
    return files


def data_identity(data) -> dict[str, Any]:
    """Every configured data set's input files by identity (`data.source: files`; ShapesWorld is
    generated, its generator's version stands in)."""
    if data.source != "files":
        return {}
    digest = data.verify == "digest"
    return {
        spec.name: {what: identity(uri, digest) for what, uri in spec_files(spec).items()}
        for spec in data.datasets
    }


def model_identity(model) -> Any:
    """`model.path`'s files by identity (a retrained or replaced base under the same path is a changed
    input); None when the run builds its own tiny model (the base_model stage's hash covers it)."""
    if model.build_tiny or not model.path:
        return None
    from inbol_ray.checkpoint import stamp

    try:
        return stamp(model.path)
    except FileNotFoundError:
        return "missing"  # the job's input check names it; hashing must not fail first
