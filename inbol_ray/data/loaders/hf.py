"""Format `hf`: a Hugging Face `datasets` release read as its files are, without the `datasets` library.

Why not `datasets.load_dataset`: it is a large dependency for what is, on disk, Parquet (a Hub release) or
Arrow IPC streams (`save_to_disk`), both of which pyarrow reads a batch at a time. Where a release lives:
- a Hub id (`path: org/name[@revision]`, kept as `hf://datasets/org/name[@revision]`): fetched with
  `huggingface_hub.snapshot_download(repo_type="dataset")` - only the files of the split (and config) read
  - into the user's hub cache (`HF_HUB_CACHE` / `HF_HOME`), with the user's token variables, honouring
  `HF_HUB_OFFLINE` (a cached snapshot is used as is; an uncached id fails naming the id and the case);
- a folder laid out like a Hub release (a local copy, an `hf download`, ShapesWorld's export): the split's
  files are those its card's `configs:` YAML lists (README.md, as `datasets` reads it), else by the Hub's
  conventions `<config>/<split>-*.parquet`, `<config>/<split>/*.parquet` (the Hub's parquet conversion),
  `data/<split>-*.parquet` (the default config), `<split>-*.parquet` or `<split>/*.parquet`, the first of
  these that matches; a folder holding shards without split names is read whole;
- a `save_to_disk` folder: `state.json` + `data-*.arrow` (one split), or `dataset_dict.json` + one such
  folder per split;
- one `.parquet` file.
Each `preset` (`hf_presets`) says which columns a row needs and how it becomes an item; a file without them
is a file-level `DataFormatError` (naming what the release dropped, when the preset knows), a bad row is
quarantined with a reason naming the field, a refused split or release fails before anything is read.

Bounded memory: rows are read a batch at a time (Parquet by row group batches, Arrow streams by record
batch), and the loader hands the chunk sink its rows early once their image bytes pass `FLUSH_BYTES`, so a
chunk of photos never grows to 50k of them. Images are the release's embedded bytes (`{"bytes", "path"}`
cells). GQA's images are a config of their own: an index of its `id` column (file, row group) is built
once, and each batch of questions reads only the row groups holding its images.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import yaml

from inbol_ray.config import DatasetSpec
from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import DataFormatError, Parsed, check_columns, make_bad, make_item
from inbol_ray.data.loaders.hf_presets import PRESETS, Preset, RowContext
from inbol_ray.hub import HubRef, offline

HUB_PREFIX = "hf://datasets/"
_HUB = re.compile(r"^hf://datasets/(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?/?$")
_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_.]+?)-\d{5}-of-\d{5}")
BATCH_ROWS = 64
"""Rows turned into Python objects at a time: a batch of photos is a few MB to a few tens of MB."""
QUESTION_BATCH = 2048
"""GQA: questions whose images are fetched together (one pass over the row groups they need)."""
FLUSH_BYTES = 256 << 20
"""Image bytes a loader lets its items spool hold before handing them to the sink."""


class HubDatasetError(DataFormatError):
    """A Hub data set id that cannot be read here; the message names the id and the case (not found,
    gated, no such revision, offline and not cached, unreachable)."""


# --- where the release is -------------------------------------------------------------------------------


def hub_ref(path: str) -> HubRef | None:
    """The Hub data set a spec's `path` names (`hf://datasets/org/name[@rev]`, as `DatasetSpec` keeps an
    `org/name[@rev]` id), or None for a local folder or another URI."""
    match = _HUB.match(path)
    if match is None:
        if path.startswith(HUB_PREFIX):
            raise HubDatasetError(f"{path}: not a Hub data set id (hf://datasets/org/name[@revision])")
        return None
    return HubRef(match["repo"], match["rev"])


_COMMITS: dict[str, str] = {}
"""Per process, id@revision -> the commit it resolved to first: every file a job reads of a release (GQA's
questions and images configs, the card) comes from one commit even if the branch moves meanwhile."""


def forget() -> None:
    """Resolve every revision again on next use (a long-lived process that wants a moved branch now)."""
    _COMMITS.clear()


def snapshot(ref: HubRef, patterns: list[str]) -> str:
    """The local snapshot folder of `ref` holding (at least) the files matching `patterns`, fetched into
    the hub cache unless they are there; errors name the id and what went wrong."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hf_errors

    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    try:
        folder = snapshot_download(
            ref.repo,
            repo_type="dataset",
            revision=_COMMITS.get(str(ref), ref.revision),
            allow_patterns=patterns,
            cache_dir=cache,
            local_files_only=offline(),
        )
        _COMMITS.setdefault(str(ref), os.path.basename(os.path.normpath(folder)))
        return folder
    except hf_errors.GatedRepoError:
        raise HubDatasetError(f"{ref}: gated on the Hub; accept its terms there and set HF_TOKEN") from None
    except hf_errors.RepositoryNotFoundError:
        raise HubDatasetError(
            f"{ref}: no such data set on the Hub (or a private one: set HF_TOKEN); a local folder of this "
            f"shape is written ./{ref.repo}"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise HubDatasetError(f"{ref}: revision {ref.revision!r} not found on the Hub") from None
    except (hf_errors.LocalEntryNotFoundError, hf_errors.IncompleteSnapshotError) as exc:
        why = "HF_HUB_OFFLINE is set and it is not in the hub cache" if offline() else f"not fetched ({exc})"
        raise HubDatasetError(
            f"{ref}: {why} ({cache}); fetch it where the Hub is reachable "
            f"(`hf download {ref.repo} --repo-type dataset`) or point `path` at a local copy"
        ) from None


def hub_identity(path: str) -> dict[str, str] | None:
    """A Hub data set's identity for stage hashes (`{"hub": id, "commit": sha}`; fetches only its card),
    None for anything else: the commit a moved branch points at is a changed input."""
    ref = hub_ref(path)
    if ref is None:
        return None
    folder = snapshot(ref, ["README.md"])
    return {"hub": str(ref), "commit": os.path.basename(os.path.normpath(folder))}


def card_patterns(readme: str, config: str, split: str) -> list[str] | None:
    """The files the card's `configs:` YAML gives for (config, split), as `datasets` reads them; None when
    the card says nothing about them (then the conventions of `split_patterns` apply)."""
    if not readme.startswith("---"):
        return None
    try:
        meta = yaml.safe_load(readme.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return None
    listed = meta.get("configs") if isinstance(meta, dict) else None
    configs = [c for c in listed if isinstance(c, dict)] if isinstance(listed, list) else []
    if config:
        chosen = [c for c in configs if c.get("config_name") == config]
    else:  # the default config: marked so, named so, or the only one
        chosen = [c for c in configs if c.get("default") or c.get("config_name") == "default"]
        chosen = chosen or (configs if len(configs) == 1 else [])
    files = chosen[0].get("data_files") if chosen else None
    for entry in files if isinstance(files, list) else []:
        if isinstance(entry, dict) and entry.get("split") == split and entry.get("path"):
            return [entry["path"]] if isinstance(entry["path"], str) else [str(p) for p in entry["path"]]
    return None


def split_patterns(config: str, split: str) -> list[list[str]]:
    """Where a Hub-layout folder keeps one split's Parquet files, most specific first (see the module doc)."""
    groups = [[f"{config}/{split}-*.parquet", f"{config}/{split}/*.parquet"]] if config else []
    groups.append([f"data/{split}-*.parquet", f"data/{split}/*.parquet"])
    groups.append([f"{split}-*.parquet", f"{split}/*.parquet"])
    if not config:
        groups.append([f"default/{split}/*.parquet"])
    return groups


def _matches(relative: str, pattern: str) -> bool:
    """Glob as the Hub's `data_files` are: `*` stays inside one path segment, `**` crosses them."""
    regex = ".*".join("[^/]*".join(re.escape(p) for p in part.split("*")) for part in pattern.split("**"))
    return re.fullmatch(regex, relative) is not None


@dataclass(frozen=True)
class Files:
    """One split's files: `kind` "parquet" or "arrow" (IPC streams of `save_to_disk`), in read order.
    `label` is what `source` columns show: the Hub id at its commit, or the folder."""

    kind: str
    paths: tuple[str, ...]
    fs: pafs.FileSystem
    root: str
    label: str

    def source(self, path: str) -> str:
        return f"{self.label}/{path[len(self.root) :].lstrip('/')}"


def locate(path: str, config: str, split: str, what: str) -> Files:
    """The files of `split` (and `config`) of the release at `path` (local folder, URI or Hub id)."""
    ref = hub_ref(path)
    if ref is None:
        return _find(path, config, split, what, dio.absolute(path))
    card = _card(pafs.LocalFileSystem(), snapshot(ref, ["README.md"]))  # its `configs:` say where splits are
    listed = card_patterns(card, config, split)
    patterns = listed or [p for group in split_patterns(config, split) for p in group]
    folder = snapshot(ref, patterns)
    commit = os.path.basename(os.path.normpath(folder))
    return _find(folder, config, split, what, f"{HUB_PREFIX}{ref.repo}@{commit}")


def _find(location: str, config: str, split: str, what: str, label: str) -> Files:
    fs, root = dio.resolve(location)
    kind = fs.get_file_info(root).type
    if kind == pafs.FileType.File:
        return Files("parquet", (root,), fs, dio.parent(root), dio.parent(label))
    if kind != pafs.FileType.Directory:
        raise DataFormatError(f"{location}: {what} not found")
    if _is_file(fs, f"{root}/dataset_dict.json"):
        splits = json.loads(_read(fs, f"{root}/dataset_dict.json")).get("splits", [])
        if split not in splits:
            raise DataFormatError(
                f"{location}: no split {split!r} in this save_to_disk folder (splits: {splits})"
            )
        root, label = f"{root}/{split}", f"{label}/{split}"
    if _is_file(fs, f"{root}/state.json"):
        state = json.loads(_read(fs, f"{root}/state.json"))
        names = [entry["filename"] for entry in state.get("_data_files", [])]
        if not names:
            raise DataFormatError(f"{location}: state.json lists no _data_files")
        return Files("arrow", tuple(f"{root}/{n}" for n in names), fs, root, label)
    found = sorted(
        info.path[len(root) + 1 :]
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=True))
        if info.type == pafs.FileType.File and info.base_name.endswith(".parquet")
        and not info.base_name.startswith((".", "_"))
    )  # fmt: skip
    listed = card_patterns(_card(fs, root), config, split)
    groups = [listed] if listed else split_patterns(config, split)
    for group in groups:
        chosen = [rel for rel in found if any(_matches(rel, p) for p in group)]
        if chosen:
            return Files("parquet", tuple(f"{root}/{rel}" for rel in chosen), fs, root, label)
    top = [rel for rel in found if "/" not in rel]
    if top and not listed and not any(_SHARD.match(rel) for rel in top):  # one split's unnamed shards
        return Files("parquet", tuple(f"{root}/{rel}" for rel in top), fs, root, label)
    seen = sorted({m["split"] for rel in found if (m := _SHARD.match(rel.rsplit("/", 1)[-1]))})
    where = f"config {config!r}, split {split!r}" if config else f"split {split!r}"
    raise DataFormatError(
        f"{location}: no Parquet files of {what} ({where}; looked for {groups}"
        f"{' as its card lists them' if listed else ''}); splits seen: {seen or 'none'}"
    )


def _card(fs: pafs.FileSystem, root: str) -> str:
    """The release's data set card (README.md), or "" when it has none."""
    path = f"{root}/README.md"
    return _read(fs, path).decode("utf-8", errors="replace") if _is_file(fs, path) else ""


def _is_file(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File


def _read(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


# --- reading rows ---------------------------------------------------------------------------------------


def _columns(files: Files, path: str) -> list[str]:
    if files.kind == "parquet":
        with files.fs.open_input_file(path) as handle:
            return pq.ParquetFile(handle).schema_arrow.names
    with files.fs.open_input_stream(path) as stream:
        return pa.ipc.open_stream(stream).schema.names


def _batches(files: Files, path: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    if files.kind == "parquet":
        with files.fs.open_input_file(path) as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        return
    with files.fs.open_input_stream(path) as stream:
        for batch in pa.ipc.open_stream(stream):
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, BATCH_ROWS):
                yield batch.slice(start, BATCH_ROWS)


def iter_rows(files: Files, required: tuple[str, ...], optional: tuple[str, ...], hints: Mapping[str, str]):
    """(source, row) pairs of every file in order, each row holding the columns read (required ones
    checked per file: a missing one is a file-level error, explained by `hints` when the preset knows)."""
    for path in files.paths:
        names = _columns(files, path)
        missing = [name for name in required if name not in names]
        if any(name in hints for name in missing):
            explained = "; ".join(hints[name] for name in missing if name in hints)
            raise DataFormatError(f"{files.source(path)}: missing field(s) {missing}: {explained}")
        check_columns(names, required, files.source(path))
        wanted = [*required, *(name for name in optional if name in names)]
        source = files.source(path)
        for batch in _batches(files, path, wanted):
            for row in batch.to_pylist():
                yield source, row


class ImageIndex:
    """Images of a release that keeps them in a config of their own (GQA), fetched by key on demand.

    Built from the images' `id` column alone: key -> (file, unit), a unit being a Parquet row group or an
    Arrow record batch. `fetch` reads only the units holding the keys asked for."""

    def __init__(self, files: Files) -> None:
        self.files = files
        self.where: dict[str, tuple[str, int]] = {}
        for path in files.paths:
            check_columns(_columns(files, path), ("id", "image"), files.source(path))
            for unit, table in self._units(path, ["id"]):
                for key in table.column("id").to_pylist():
                    self.where.setdefault(str(key), (path, unit))

    def _units(
        self, path: str, columns: list[str], wanted: set[int] | None = None
    ) -> Iterator[tuple[int, pa.Table]]:
        """(unit number, its rows) of one file, only the `wanted` units when given."""
        if self.files.kind == "parquet":
            with self.files.fs.open_input_file(path) as handle:
                reader = pq.ParquetFile(handle)
                for unit in range(reader.num_row_groups):
                    if wanted is None or unit in wanted:
                        yield unit, reader.read_row_group(unit, columns=columns)
            return
        with self.files.fs.open_input_stream(path) as stream:  # a stream is read through; unwanted dropped
            for unit, batch in enumerate(pa.ipc.open_stream(stream)):
                if wanted is None or unit in wanted:
                    yield unit, pa.Table.from_batches([batch.select(columns)])

    def fetch(self, keys: set[str]) -> dict[str, Any]:
        """key -> its image cell, for the keys this release has (absent keys are left out)."""
        by_file: dict[str, set[int]] = {}
        for key in keys:
            if key in self.where:
                path, unit = self.where[key]
                by_file.setdefault(path, set()).add(unit)
        out: dict[str, Any] = {}
        for path, units in by_file.items():
            for _, table in self._units(path, ["id", "image"], units):
                for key, image in zip(
                    table.column("id").to_pylist(), table.column("image").to_pylist(), strict=True
                ):
                    if str(key) in keys:
                        out.setdefault(str(key), image)
        return out


# --- the loader -----------------------------------------------------------------------------------------


def preset_of(spec: DatasetSpec) -> Preset:
    """The spec's column map: `preset`, else the one named like the Hub id in `path`."""
    ref = hub_ref(spec.path)
    name = spec.preset or (ref.repo if ref else "")
    if name in PRESETS:
        return PRESETS[name]
    known = ", ".join(PRESETS)
    if not name:
        raise DataFormatError(f"format hf needs `preset` (a built-in column map; known: {known})")
    raise DataFormatError(f"no built-in column map {name!r} (set `preset`; known: {known})")


@dataclass(frozen=True)
class Selection:
    """What a spec reads of its release: the map, the release split and config."""

    preset: Preset
    split: str
    config: str

    @classmethod
    def of(cls, spec: DatasetSpec) -> Selection:
        preset = preset_of(spec)
        split = spec.hf_split or preset.split(spec)
        return cls(preset, split, spec.hf_config or preset.config(split))

    def refusal(self, spec: DatasetSpec) -> str:
        """Why the release cannot give this spec gradable items, or ""."""
        return self.preset.refuse(spec, self.split, self.config)


def hf_problems(spec: DatasetSpec) -> list[str]:
    """What can be seen wrong with an `hf` spec without reading its rows: an unknown map, a refused split or
    release, a local folder that is not there, a Hub id that is offline and not cached."""
    try:
        chosen = Selection.of(spec)
        ref = hub_ref(spec.path)
    except DataFormatError as exc:
        return [str(exc)]
    if reason := chosen.refusal(spec):
        return [reason]
    if ref is None:
        return [] if dio.exists(spec.path) else [f"path not found: {spec.path}"]
    if not offline():
        return []  # fetched when the stage reads it; a wrong id fails there, naming it
    try:
        locate(spec.path, chosen.config, chosen.split, "the data set")
    except DataFormatError as exc:
        return [str(exc)]
    return []


def parse_hf(spec: DatasetSpec, out: Parsed | None = None) -> Parsed:
    """A `datasets` release through its preset (module doc): refused selections raise before any read."""
    out = Parsed() if out is None else out
    try:
        chosen = Selection.of(spec)
    except DataFormatError as exc:
        raise DataFormatError(f"{spec.name}: {exc}") from None
    if reason := chosen.refusal(spec):
        raise DataFormatError(f"{spec.name}: {reason}")
    preset = chosen.preset
    files = locate(spec.path, chosen.config, chosen.split, f"{preset.name} (the questions)")
    rows = iter_rows(files, preset.required, preset.optional, preset.missing_hints)
    if preset.images_config is not None:
        images = _images_of(spec, preset.images_config(chosen.config), chosen.split)
        rows = _joined(rows, images, preset.image_key)
    held = 0
    for number, (source, row) in enumerate(rows):
        if spec.limit and out.n_input >= spec.limit:
            break
        key, fields, reason = preset.row(row, RowContext(spec, chosen.split, number))
        key = f"row{number}" if key is None or key == "" else key
        if fields is None:
            out.quarantine.append(make_bad(spec, key, source, reason))
            continue
        out.items.append(make_item(spec, key, source=source, **fields))
        held += len(fields.get("image") or b"")
        if held > FLUSH_BYTES:  # photos are large: hand them on before the row count would
            out.items.flush()
            held = 0
    return out


def _images_of(spec: DatasetSpec, config: str, split: str) -> ImageIndex:
    """The images config's index: under `images` when the spec names a folder (a save_to_disk copy of
    it, say), else beside the questions in the same release."""
    return ImageIndex(locate(spec.images or spec.path, config, split, f"images ({config})"))


def _joined(rows: Iterator[tuple[str, dict[str, Any]]], images: ImageIndex, key: str):
    """Rows with their `image` cell filled from `images` by `row[key]`, a batch of rows at a time."""
    batch: list[tuple[str, dict[str, Any]]] = []

    def flush():
        found = images.fetch({str(row.get(key)) for _, row in batch})
        for source, row in batch:
            yield source, {**row, "image": found.get(str(row.get(key)))}

    for pair in rows:
        batch.append(pair)
        if len(batch) >= QUESTION_BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()
