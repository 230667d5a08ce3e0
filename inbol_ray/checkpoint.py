"""Checkpoints: resolve, copy, fix the llava-hf layout and load, for training, evaluation, Serve and vLLM.

What a "checkpoint" can be here, and what every consumer needs from it:
- a merged HF directory (`config.json` + safetensors + processor files): loads as is;
- a training output `<run_dir>/models/<method>/`: a merged HF directory and/or `adapter/` (LoRA);
- a bare peft adapter directory, whose base is named in `adapter_config.json` (or passed explicitly).
A LoRA run stores one base and an adapter per method, never merged copies (~14 GB each at 7B): every loader
takes base + adapter. `load_model` / `load_for_training` merge the adapter in memory (transformers), vLLM
serves it with a `LoRARequest` on the base (sampling/vllm_engine.py). `resolve` says what a location holds
(and an adapter's base), and `local_dir` copies a checkpoint from object storage
(`s3://...`) to a local cache, because `from_pretrained` and vLLM read local files only.

Why `to_llava_hf_layout` lives here: transformers 5 saves the CLIP tower as `vision_tower.X`, vLLM's LLaVA
loader expects llava-hf's `vision_tower.vision_model.X`; every writer of a checkpoint calls it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.fs as pafs

from inbol_ray import hub
from inbol_ray.checkpoint_cache import CACHE_ENV, local_dir, stamp  # re-exported
from inbol_ray.data import io as dio

ADAPTER_SUBDIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"


# --- where a checkpoint is -------------------------------------------------------------------------------


def _is_file(location: str) -> bool:
    return dio.file_type(location) == pafs.FileType.File


def upload_dir(local: str, location: str) -> str:
    """Copy a local directory to `location` (no-op when `location` is that directory); returns `location`."""
    fs, path = dio.resolve(location)
    if isinstance(fs, pafs.LocalFileSystem) and os.path.abspath(local) == path:
        return location
    fs.create_dir(path, recursive=True)
    pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return location


# --- a method's published export ----------------------------------------------------------------------

EXPORT_POINTER = "export.json"
"""In `<run_dir>/models/<method>/`: which `export-<token>/` folder holds the method's weights, and the
names and sizes of its files. Written last, so it only ever names a whole export."""
EXPORT_PREFIX = "export-"


class CheckpointError(FileNotFoundError):
    """A checkpoint folder that cannot be trusted to hold one training's weights (half-written, mixed, or
    not matching its pointer); the message says what to do."""


def _listing(location: str) -> dict[str, int]:
    """Relative file names and sizes below `location` (empty when it does not exist)."""
    fs, path = dio.resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    root = path.rstrip("/") + "/"
    return {i.path[len(root) :]: i.size for i in infos if i.type == pafs.FileType.File}


def model_location(location: str) -> str:
    """A model location as every process should see it: a Hub id as it is (each node resolves it through
    its own hub cache), a local path made absolute, a URI unchanged."""
    return location if hub.hub_ref(location) is not None else dio.absolute(location)


def publish_export(out: str, write: Callable[[str], None], *, about: dict | None = None) -> str:
    """Write a method's weights as a fresh `out/export-<token>/` and swap it in whole; returns its location.

    Why: a retrained method must never leave files of two trainings side by side (a stale merged model
    beside a new adapter was loaded in its place). `write(local_dir)` saves the model and/or adapter into an
    empty local folder; it is uploaded (object storage) or moved (local) under a name no one reads yet,
    then `export.json` (files and sizes) is written in one atomic put, and only then are older exports and
    files of the pre-pointer layout removed. A crash at any point leaves the previous pointer valid.
    """
    token = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:8]
    name = EXPORT_PREFIX + token
    target = dio.join(out, name)
    fs, out_path = dio.resolve(out)
    fs.create_dir(out_path, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        staging = tempfile.mkdtemp(prefix=f".{name}-", dir=out_path)  # same filesystem: rename is atomic
        write(staging)
        os.rename(staging, dio.resolve(target)[1])
    else:
        with tempfile.TemporaryDirectory() as staging:
            write(staging)
            upload_dir(staging, target)
    files = _listing(target)
    if not files:
        raise CheckpointError(f"export to {target} wrote no files")
    pointer = {
        "dir": name,
        "files": files,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **(about or {}),
    }
    dio.write_bytes(dio.join(out, EXPORT_POINTER), json.dumps(pointer, indent=1, sort_keys=True).encode())
    _remove_superseded(out, keep=name)
    return target


TRAINING_FILES = ("ray", "tensorboard", "metrics.jsonl", "train_result.json", EXPORT_POINTER)
"""What else lives in `models/<method>/`: Ray Train's resume state and the training's records."""


def _remove_superseded(out: str, keep: str) -> None:
    """Older exports and the weights of the layout before pointers (files at the top, `adapter/`)."""
    fs, path = dio.resolve(out)
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        if info.base_name in (keep, *TRAINING_FILES) or info.base_name.startswith((".tmp-",)):
            continue
        dio.remove(dio.join(out, info.base_name))


def read_pointer(location: str) -> dict | None:
    """`location`'s export pointer, or None when it has none (a plain HF folder, a bare adapter)."""
    uri = dio.join(location, EXPORT_POINTER)
    if not _is_file(uri):
        return None
    return json.loads(dio.read_bytes(uri).decode())


def follow_export(location: str) -> str:
    """The folder that holds `location`'s weights: its current export when it has a pointer (checked
    against the files: every listed file present with its size), else `location` itself."""
    pointer = read_pointer(location)
    if pointer is None:
        return location
    target = dio.join(location, pointer["dir"])
    found = _listing(target)
    wrong = sorted(n for n, size in pointer["files"].items() if found.get(n) != size)
    extra = sorted(set(found) - set(pointer["files"]))
    if wrong or extra:
        raise CheckpointError(
            f"{location}: the files of {pointer['dir']} do not match {EXPORT_POINTER} (missing or resized: "
            f"{wrong[:5]}, unlisted: {extra[:5]}); the export was changed after it was published: retrain, "
            f"or restore the folder"
        )
    return target


def has_model(location: str) -> bool:
    return _is_file(dio.join(follow_export(location), "config.json"))


def adapter_dir(location: str) -> str | None:
    """The peft adapter of a checkpoint that holds no full model (training output or bare adapter)."""
    location = follow_export(location)
    if _is_file(dio.join(location, "config.json")):
        return None
    for candidate in (dio.join(location, ADAPTER_SUBDIR), location):
        if _is_file(dio.join(candidate, ADAPTER_CONFIG)):
            return candidate
    return None


@dataclass(frozen=True)
class Resolved:
    model_dir: str
    """A full HF model directory (the merged checkpoint, or the adapter's base)."""
    adapter_dir: str | None = None
    """The peft adapter to apply on top of `model_dir` (None: `model_dir` is the whole model)."""


def resolve(location: str, base: str | None = None) -> Resolved:
    """What `location` holds: a full model, or base + adapter; a training output through its export
    pointer (where a merged model and the adapter it was merged from are one training's: the model wins).

    A bare adapter names its base in `adapter_config.json`; `base` overrides that, for an adapter trained
    elsewhere whose recorded path does not exist here. A folder without a pointer that holds both a full
    model and `adapter/` is refused: nothing says they come from one training (the layout before export
    pointers, where a retrained method could leave its old merged model beside a new adapter).
    """
    location = hub.localize(location)  # a Hub id: its local snapshot (inbol_ray.hub)
    pointed = read_pointer(location) is not None
    location = follow_export(location)
    if _is_file(dio.join(location, "config.json")):
        if not pointed and _is_file(dio.join(location, ADAPTER_SUBDIR, ADAPTER_CONFIG)):
            raise CheckpointError(
                f"{location}: holds both a full model (config.json) and {ADAPTER_SUBDIR}/, with no "
                f"{EXPORT_POINTER} saying they are one training's; retrain the method (exports now replace "
                f"the folder whole), or remove whichever is stale"
            )
        return Resolved(location)
    adapter = adapter_dir(location)
    if adapter is None:
        if not dio.exists(location):
            raise FileNotFoundError(f"checkpoint not found: {location}")
        raise FileNotFoundError(f"{location}: neither a HF model dir (config.json) nor a peft adapter dir")
    recorded = json.loads(dio.read_bytes(dio.join(adapter, ADAPTER_CONFIG)).decode()).get(
        "base_model_name_or_path"
    )
    base_dir = hub.localize(base or recorded or "")
    if not base_dir or not has_model(base_dir):
        raise FileNotFoundError(f"adapter {adapter}: base model {base_dir} not found; pass its path as base")
    return Resolved(dio.absolute(follow_export(base_dir)), adapter)


# --- writing ---------------------------------------------------------------------------------------------


def to_llava_hf_layout(ckpt_dir: str) -> None:
    """Rename `vision_tower.X` keys to `vision_tower.vision_model.X`, as llava-hf checkpoints store them.

    transformers 5 saves the CLIP tower without the `vision_model.` level, and vLLM's LLaVA loader
    expects llava-hf names; transformers itself loads both spellings, so the rename costs nothing.
    """
    from safetensors.torch import load_file, save_file

    def rename(key: str) -> str:
        if key.startswith("vision_tower.") and not key.startswith("vision_tower.vision_model."):
            return key.replace("vision_tower.", "vision_tower.vision_model.", 1)
        return key

    for name in sorted(os.listdir(ckpt_dir)):
        if name.endswith(".safetensors"):
            shard = os.path.join(ckpt_dir, name)
            tensors = load_file(shard)
            save_file({rename(k): v for k, v in tensors.items()}, shard, metadata={"format": "pt"})
    index = os.path.join(ckpt_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            data = json.load(f)
        data["weight_map"] = {rename(k): v for k, v in data["weight_map"].items()}
        with open(index, "w") as f:
            json.dump(data, f, indent=2)


def save_model(model, processor, out_dir: str) -> str:
    """Save a full model + processor as a llava-hf directory (local), the form vLLM and Serve load."""
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    to_llava_hf_layout(out_dir)
    return out_dir


# --- loading ---------------------------------------------------------------------------------------------


class UnsafeCheckpoint(ValueError):
    """A checkpoint whose weights are only in a pickle format (`.bin`, `.pt`): loading it would run
    whatever code whoever could write the folder (or bucket) put there."""


def safe_adapter(directory: str) -> str:
    """`directory` when its peft adapter weights are safetensors; raises `UnsafeCheckpoint` when they are a
    pickle (`adapter_model.bin`), which peft would otherwise unpickle."""
    names = set(os.listdir(directory))
    if "adapter_model.safetensors" not in names:
        pickled = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl")))
        raise UnsafeCheckpoint(
            f"adapter {directory}: no adapter_model.safetensors"
            + (f" (only pickle weights {pickled}: refused, they could run code on load)" if pickled else "")
        )
    return directory


def _with_adapter(model, found: Resolved):
    """`model` (the base) with `found`'s adapter merged in memory, or as it is when there is none."""
    if found.adapter_dir is None:
        return model
    from peft import PeftModel

    return PeftModel.from_pretrained(model, safe_adapter(local_dir(found.adapter_dir))).merge_and_unload()


def load_model(location: str, dtype: str = "float32", device: str = "cpu", base: str | None = None):
    """(model, processor) for generation: eval mode, left padding, from a local dir or a URI; an adapter
    location loads its base and merges the adapter in memory (nothing written)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    found = resolve(location, base)
    path = local_dir(found.model_dir)
    # LLaVA-1.5 and every other image-text-to-text architecture transformers knows (Qwen2-VL, ...).
    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=getattr(torch, dtype), use_safetensors=True
    )
    model = _with_adapter(model, found).to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(path)
    processor.tokenizer.padding_side = "left"
    return model, processor


def load_for_training(location: str, dtype: str = "float32", merge_adapter: bool = True):
    """The LLaVA model with an attention that accepts the shared-prefix block mask (sdpa); an adapter
    location gives its base with the adapter merged in memory (`merge_adapter=False`: the bare base)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    found = resolve(location)
    model = LlavaForConditionalGeneration.from_pretrained(
        local_dir(found.model_dir),
        dtype=getattr(torch, dtype),
        attn_implementation="sdpa",
        use_safetensors=True,
    )
    return _with_adapter(model, found) if merge_adapter else model


def load_processor(location: str):
    """The processor of a model, or of an adapter's base (adapters hold no processor files)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(local_dir(resolve(location).model_dir))


__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_SUBDIR",
    "CACHE_ENV",
    "EXPORT_POINTER",
    "CheckpointError",
    "Resolved",
    "adapter_dir",
    "follow_export",
    "has_model",
    "load_for_training",
    "load_model",
    "load_processor",
    "model_location",
    "publish_export",
    "read_pointer",
    "local_dir",
    "resolve",
    "save_model",
    "stamp",
    "to_llava_hf_layout",
    "upload_dir",
]
