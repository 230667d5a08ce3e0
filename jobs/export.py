"""Export one trained method of a run as a folder anyone can load: weights, processor, model card.

    python -m jobs.export --config configs/tiny.yaml --run-dir runs/tiny --method cadpo --out DIR_OR_URI \\
        [--merge] [--base-id ORG/NAME[@REV]] [--license ID] [section.key=value ...]

A LoRA method leaves a peft adapter whose `adapter_config.json` names `--base-id` as its base (and the
revision, when given), so `PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(ID), DIR)`
loads it anywhere; `--merge` writes the merged full model instead. A fully fine-tuned method is always a
full model. Either way the folder gets the base's processor and tokenizer and a `README.md` model card: the
method, this run's tables and training recipe, how to load it and how to upload the folder to the Hub.
Safetensors only. Without `--base-id` the run's base location is kept (a Hub id when `model.path` is one,
pinned to the commit the run used) and the card says so.

Pass the run's own configs and overrides: the card's recipe is read from them, so a config whose hash
differs from the method's training manifest is refused, as are weights retrained after the run's
evaluation (the tables would be another model's). `--base-id` is compared with the run's base file by
file (SHA-256) when it is in the local hub cache; nothing is downloaded. `--out` must be new or empty
(local or `s3://...`). The job reads the run and writes elsewhere: it takes no driver lease.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time

from inbol_ray import methods as M
from inbol_ray.cli import _fail, _parse

SAFE_WEIGHTS = ".safetensors"
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class ExportError(ValueError):
    """An export that would mislabel what it holds; the message says what to do."""


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=M.TRAINED, help="the trained method to export")
    parser.add_argument("--out", required=True, help="new or empty folder or URI (s3://...) to write")
    parser.add_argument("--merge", action="store_true", help="LoRA methods: write the merged full model")
    parser.add_argument("--base-id", default="", help="public Hub id of the run's base, e.g. org/name[@rev]")
    parser.add_argument("--license", default="", help="Hub license id (default: the base card's, if any)")
    parser.add_argument(
        "--skip-base-check", action="store_true", help="do not compare --base-id's cached files with the base"
    )


def main(argv: list[str] | None = None) -> int:
    def adjust(cfg, args) -> None:
        if args.method not in cfg.eval.methods:  # the stage list holds the methods a run trains
            cfg.eval.methods.append(args.method)

    parsed = _parse("export", __doc__, argv, _arguments, adjust)
    if isinstance(parsed, int):
        return parsed
    cfg, args = parsed
    from inbol_ray.run_layout import RunLayout

    try:
        where = export(cfg, RunLayout.of(cfg), args)
    except (ExportError, FileNotFoundError) as exc:
        return _fail("export", str(exc), [])
    print(f"export: {args.method} -> {where}")
    return 0


# --- what the run vouches for --------------------------------------------------------------------------


def run_problems(cfg, layout, method: str) -> list[str]:
    """Why this config and run cannot describe `method`'s weights (empty: they can)."""
    from inbol_ray.manifest import read_manifest
    from inbol_ray.pipeline import stage_hashes, stages

    stage = f"train_{method}"
    trained = read_manifest(layout.manifest(stage))
    if trained is None:
        return [f"{method} is not trained in {layout.root} (no manifests/{stage}.json)"]
    problems = []
    expected = stage_hashes(cfg, stages(cfg))[stage]
    if trained["config_hash"] != expected:
        problems.append(
            f"the config given is not the one {method} was trained with ({stage} hash {expected}, manifest "
            f"{trained['config_hash']}): pass the run's configs and overrides, the card's recipe is read from them"
        )
    evaluated = (read_manifest(layout.manifest("evaluate")) or {}).get("inputs", {})
    if evaluated.get(stage) != trained["token"]:
        problems.append(
            f"{method}'s weights were not evaluated in this run (or were retrained since): run jobs.evaluate "
            "first, the card's tables come from it"
        )
    return problems


def base_id_of(layout, given: str) -> str | None:
    """The public base id: `--base-id`, else the run's base when `model.path` is a Hub id (at its commit)."""
    from inbol_ray import hub

    if given:
        if hub.hub_ref(given) is None and not re.fullmatch(r"[\w.-]+/[\w.-]+(@[\w./-]+)?", given):
            raise ExportError(f"--base-id {given!r} is not a Hub id (org/name or org/name@revision)")
        return given
    found = hub.identity(layout.base_model) if layout.base_model else None
    return None if found is None else f"{found['hub'].split('@', 1)[0]}@{found['commit']}"


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _weight_digests(folder: str) -> dict[str, str]:
    """SHA-256 of each top-level safetensors file; a hub cache blob is named by it already (LFS files)."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(SAFE_WEIGHTS):
            blob = os.path.basename(os.path.realpath(os.path.join(folder, name)))
            out[name] = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else _sha256(os.path.join(folder, name))
    return out


def check_base(base_id: str, run_base: str) -> str:
    """Compare `base_id`'s snapshot in the local hub cache with the run's base (local folder), file by file;
    raises `ExportError` when they differ, returns what was found. Nothing is downloaded: a base that is
    not cached here is reported unchecked."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, _, revision = base_id.partition("@")
    try:
        snapshot = snapshot_download(repo, revision=revision or None, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError):
        return f"{base_id} is not in the local hub cache: not compared with the run's base"
    theirs, ours = _weight_digests(snapshot), _weight_digests(run_base)
    if not theirs or theirs != ours:
        differ = sorted(n for n in set(theirs) | set(ours) if theirs.get(n) != ours.get(n))
        raise ExportError(
            f"--base-id {base_id} ({snapshot}) does not hold the run's base weights ({run_base}; files that "
            f"differ: {differ[:5]}): name the base the run trained on, or --skip-base-check if the same "
            "weights are stored in another layout"
        )
    return f"{base_id}: the same safetensors files as the run's base (SHA-256)"


def base_license(folders: list[str], build_tiny: bool) -> str:
    """The license of the first base model card (README.md front matter) found, else apache-2.0 for the
    project's own tiny model, else `other` (the base's terms apply; the card says so)."""
    import yaml

    for folder in folders:
        card = os.path.join(folder, "README.md")
        if os.path.isfile(card):
            with open(card, encoding="utf-8") as f:
                text = f.read()
            if text.startswith("---"):
                meta = yaml.safe_load(text.split("---", 2)[1]) or {}
                if isinstance(meta, dict) and meta.get("license"):
                    return str(meta["license"])
    return "apache-2.0" if build_tiny else "other"


# --- writing ---------------------------------------------------------------------------------------------


def _empty(location: str) -> bool:
    """No file (hidden ones included) at or below `location`: an export never mixes with older files."""
    import pyarrow.fs as pafs

    from inbol_ray.data import io as dio

    fs, path = dio.resolve(location)
    if fs.get_file_info(path).type == pafs.FileType.File:
        return False
    return not fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))


def write_adapter(adapter: str, staging: str, base_id: str | None, base_location: str) -> None:
    """The adapter's config and safetensors weights, its recorded base replaced (peft's own README is not
    copied: the card replaces it)."""
    from inbol_ray.checkpoint import ADAPTER_CONFIG, safe_adapter

    safe_adapter(adapter)
    with open(os.path.join(adapter, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    repo, _, revision = (base_id or "").partition("@")
    config["base_model_name_or_path"] = repo or base_location
    config["revision"] = revision or None
    with open(os.path.join(staging, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    shutil.copy(os.path.join(adapter, "adapter_model.safetensors"), staging)


def _shareable(folder: str) -> None:
    """Files 0644 in a 0755 folder: the staging folder is private (mkdtemp) and checkpoints may be 0600,
    but an export is meant to be read by others."""
    os.chmod(folder, 0o755)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)


def copy_full_model(model_dir: str, staging: str) -> None:
    """A full model's files as they are (config, safetensors shards, processor); pickle weights refused."""
    names = [n for n in sorted(os.listdir(model_dir)) if os.path.isfile(os.path.join(model_dir, n))]
    pickled = [n for n in names if n.endswith(PICKLE_WEIGHTS)]
    if pickled or not any(n.endswith(SAFE_WEIGHTS) for n in names):
        raise ExportError(f"{model_dir}: weights must be safetensors only (found {pickled or 'none'})")
    for name in names:
        if name != "README.md":
            shutil.copy(os.path.join(model_dir, name), staging)


def export(cfg, layout, args) -> str:
    """Check, write every file into a local staging folder, then move (or upload) it to `--out`."""
    from inbol_ray.checkpoint import local_dir, read_pointer, resolve, upload_dir
    from inbol_ray.data import io as dio
    from inbol_ray.eval.model_card import Exported, card_for, training_sets
    from inbol_ray.eval.report import read_item_keys
    from inbol_ray.manifest import read_manifest

    method = args.method
    problems = run_problems(cfg, layout, method)
    if problems:
        raise ExportError("; ".join(problems))
    out = dio.absolute(args.out)
    if not _empty(out):
        raise ExportError(f"--out {out} is not empty: choose a new folder, or remove it first")
    found, run_base = resolve(layout.model(method)), resolve(layout.base_model).model_dir
    adapter = found.adapter_dir is not None and not args.merge
    if adapter and found.model_dir != run_base:
        raise ExportError(
            f"{method}'s adapter sits on {found.model_dir}, not on the run's base {run_base}: export it with "
            "--merge (no public id names that model)"
        )
    if args.merge and found.adapter_dir is None:
        print(f"export: {method} was fully fine-tuned: its full model is exported (--merge changes nothing)")
    base_id = base_id_of(layout, args.base_id)
    base_dir = local_dir(run_base)
    checked = "no --base-id: nothing to compare"
    if base_id:
        checked = "skipped (--skip-base-check)" if args.skip_base_check else check_base(base_id, base_dir)
    print(f"export: base check: {checked}")
    trained = read_manifest(layout.manifest(f"train_{method}")) or {}
    pointer = read_pointer(layout.model(method)) or {}
    exported = Exported(
        method=method,
        adapter=adapter,
        base_id=base_id,
        base_location=run_base,
        license=args.license or base_license([base_dir], cfg.model.build_tiny),
        datasets=training_sets(read_item_keys(layout.items), cfg),
        run_dir=layout.root,
        provenance={
            "weights": dio.join(layout.model(method), pointer["dir"]) if pointer else layout.model(method),
            f"train_{method} manifest token": trained.get("token", ""),
            "trained at": trained.get("finished_at", ""),
            "versions at training": ", ".join(f"{k} {v}" for k, v in trained.get("versions", {}).items()),
            "base check": checked,
            "exported at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )

    def write(staging: str) -> None:
        from transformers import AutoProcessor

        from inbol_ray.checkpoint import load_model, save_model

        if found.adapter_dir is None:  # fully fine-tuned: its folder already holds the base's processor
            copy_full_model(local_dir(found.model_dir), staging)
        else:
            processor = AutoProcessor.from_pretrained(base_dir)  # the base's tokenizer and processor
            if adapter:
                write_adapter(local_dir(found.adapter_dir), staging, base_id, run_base)
                processor.save_pretrained(staging)
            else:  # --merge: the adapter folded into the base, as the run's evaluation loaded it
                model, _ = load_model(layout.model(method), dtype=cfg.model.dtype)
                save_model(model, processor, staging)
        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(card_for(cfg, layout, exported))
        _shareable(staging)

    fs_local = not dio.is_uri(out) or out.startswith("file://")
    if fs_local:
        parent = os.path.dirname(dio.resolve(out)[1])
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".export-", dir=parent)  # same filesystem: the rename is atomic
        try:
            write(staging)
            if os.path.isdir(dio.resolve(out)[1]):
                os.rmdir(dio.resolve(out)[1])  # empty (checked above)
            os.rename(staging, dio.resolve(out)[1])
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    else:
        with tempfile.TemporaryDirectory() as staging:
            write(staging)
            upload_dir(staging, out)
    return out


if __name__ == "__main__":
    sys.exit(main())
