"""`jobs.export`: a run's CA-DPO handed to someone without this project (issue 33, item 3).

The run is the session's smoke run (`smoke_pipeline`) with CA-DPO retrained as a LoRA adapter on a copy of
it (items, base model, samples and tables reused: ~40 s, where a fresh run takes minutes). Its base is put
into a real `huggingface_hub` cache as `org/tiny` (blobs named by SHA-256, snapshot symlinks, `refs/main`),
`HF_HUB_OFFLINE=1`. The adapter is exported to object storage (moto's S3 server), the merged model and the
smoke run's own fully fine-tuned CA-DPO to local folders. A fresh interpreter then loads them as a user
would, `AutoModelForImageTextToText.from_pretrained("org/tiny")` + `PeftModel.from_pretrained(base, out)`
(or the full model alone), resolving the id through that cache, and must give the run's greedy answers
(its `predictions.parquet`) on every evaluation item; the card's own loading snippet must run too.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from jobs import export as export_job
from jobs import pipeline as pipeline_job

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
LORA = ["train.lora=true", "train.dpo_init=base", "train.dpo_lr=1e-2", "eval.methods=[base,cadpo]"]
"""CA-DPO as a LoRA adapter on the base; dpo_lr high enough that 2 steps move most answers off the base's."""
TRAINED = ("sft", "idk_it", "dpo1", "dpo2", "dpo3", "cadpo")
BUCKET = "inbol-export-test"
COMMIT = "c0ffee" * 6 + "c0de"


def cache_repo(cache: Path, repo: str, checkpoint: Path) -> None:
    """`checkpoint`'s files as huggingface_hub stores a download: blobs named by their hash, the snapshot
    at COMMIT made of symlinks to them, `refs/main` naming COMMIT."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / COMMIT
    (folder / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(checkpoint.iterdir()):
        if file.is_file():
            blob = folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            shutil.copy(file, blob)
            (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(COMMIT)


@pytest.fixture(scope="module")
def lora_run(smoke_pipeline, tmp_path_factory) -> tuple[Path, list[str]]:
    """(run dir, overrides): the smoke run copied without its trained methods, CA-DPO trained there as a
    LoRA adapter from the base and evaluated beside the base."""
    smoke_dir, smoke, _ = smoke_pipeline

    def trained(folder: str, names: list[str]) -> list[str]:
        return [n for n in names if n in TRAINED] if folder.endswith(("models", "predictions")) else []

    run = tmp_path_factory.mktemp("export") / "run"
    shutil.copytree(smoke_dir, run, ignore=trained)
    overrides = [*smoke, *LORA]
    assert (
        pipeline_job.main(["--config", TINY, "--run-dir", str(run), "--until", "evaluate", *overrides]) == 0
    )
    return run, overrides


@pytest.fixture(scope="module")
def hub_cache(lora_run, tmp_path_factory):
    """`org/tiny`: the run's base; `org/untrained`: the tiny checkpoint before base training."""
    run, _ = lora_run
    cache = tmp_path_factory.mktemp("hf") / "hub"
    cache_repo(cache, "org/tiny", run / "models" / "base")
    cache_repo(cache, "org/untrained", run / "models" / "init")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(cache))  # what the loading subprocess reads
        # huggingface_hub reads both when imported: this process's exports look in the same cache
        mp.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
        mp.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
        yield cache


def export_argv(run: Path, overrides: list[str], out: str, *extra: str) -> list[str]:
    return ["--config", TINY, "--run-dir", str(run), "--method", "cadpo", "--out", out, *extra, *overrides]


@pytest.fixture(scope="module")
def exports(lora_run, smoke_pipeline, hub_cache, s3_endpoint: str, tmp_path_factory) -> dict[str, Path]:
    """The adapter (exported to S3, then downloaded), the merged model, and the smoke run's full CA-DPO."""
    import boto3
    import pyarrow.fs as pafs

    from inbol_ray.data import io as dio

    run, overrides = lora_run
    smoke_dir, smoke, _ = smoke_pipeline
    out = tmp_path_factory.mktemp("exported")
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    uri = f"s3://{BUCKET}/exports/cadpo"
    assert export_job.main(export_argv(run, overrides, uri, "--base-id", "org/tiny")) == 0
    fs, path = dio.resolve(uri)
    (out / "adapter").mkdir()
    pafs.copy_files(
        path, str(out / "adapter"), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
    )
    assert (
        export_job.main(export_argv(run, overrides, str(out / "merged"), "--merge", "--base-id", "org/tiny"))
        == 0
    )
    assert export_job.main(export_argv(smoke_dir, smoke, str(out / "full"), "--base-id", "org/tiny")) == 0
    return {name: out / name for name in ("adapter", "merged", "full")}


LOADER = r"""
import json, sys
import pandas as pd
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
from inbol_ray.model.generation import generate_responses

spec = json.loads(sys.argv[1])
answers = {}
for name, job in spec["exports"].items():
    model = AutoModelForImageTextToText.from_pretrained(job["base"] or job["folder"], dtype=torch.float32)
    if job["base"]:
        model = PeftModel.from_pretrained(model, job["folder"])
    processor = AutoProcessor.from_pretrained(job["folder"])
    items = pd.read_parquet(spec["items"]).set_index("id").loc[job["ids"]]
    out = generate_responses(model.eval(), processor, list(items["image"]), job["prompts"],
                             max_new_tokens=spec["max_new_tokens"])
    answers[name] = [r[0] for r in out]
print(json.dumps(answers))
exec(spec["snippet"])  # the card's own snippet, as a reader would paste it
"""


def run_answers(run: Path, model: str = "cadpo") -> pd.DataFrame:
    predictions = pd.read_parquet(run / "predictions.parquet")
    return predictions[predictions["model"] == model].sort_values("id").reset_index(drop=True)


def card_snippet(card: str) -> str:
    return re.search(r"```python\n(.*?)```", card, re.S).group(1)


@pytest.fixture(scope="module")
def loaded(exports, lora_run, smoke_pipeline, hub_cache, tmp_path_factory) -> tuple[dict, str]:
    """(answers per export on every evaluation item, what the card's snippet printed), from a fresh
    interpreter that knows the base only as `org/tiny` in the hub cache."""
    run, _ = lora_run
    smoke_dir = smoke_pipeline[0]
    work = tmp_path_factory.mktemp("user")
    first = pd.read_parquet(run / "items").iloc[-1]  # any item's picture will do for the snippet
    (work / "photo.png").write_bytes(first["image"])
    snippet = card_snippet((exports["adapter"] / "README.md").read_text())
    assert 'export = "."' in snippet and '"your_image.jpg"' in snippet
    snippet = snippet.replace('export = "."', f"export = {str(exports['adapter'])!r}")
    snippet = snippet.replace('"your_image.jpg"', repr(str(work / "photo.png")))

    def job(name: str, base: str, answered_in: Path) -> dict:
        rows = run_answers(answered_in)
        return {
            "base": base,
            "folder": str(exports[name]),
            "ids": list(rows["id"]),
            "prompts": list(rows["prompt"]),
        }

    spec = {
        "items": str(run / "items"),
        "max_new_tokens": 12,  # configs/tiny.yaml eval.max_new_tokens
        "exports": {
            "adapter": job("adapter", "org/tiny", run),
            "merged": job("merged", "", run),
            "full": job("full", "", smoke_dir),
        },
        "snippet": snippet,
    }
    done = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(spec)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    return json.loads(lines[0]), "\n".join(lines[1:])


def test_adapter_names_the_hub_base_and_answers_like_the_run(exports, loaded, lora_run) -> None:
    run, _ = lora_run
    folder = exports["adapter"]
    files = sorted(p.name for p in folder.iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(files)
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))], files
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny" and config["revision"] is None

    answers, _ = loaded
    expected = run_answers(run)
    assert answers["adapter"] == list(expected["response"])
    base = run_answers(run, "base")
    moved = sum(a != b for a, b in zip(expected["response"], base["response"], strict=True))
    assert moved >= len(base) // 2, "the adapter barely changes the base: this test could not see it dropped"


def test_merged_and_full_exports_load_without_peft(exports, loaded, lora_run, smoke_pipeline) -> None:
    answers, _ = loaded
    assert answers["merged"] == list(run_answers(lora_run[0])["response"])
    assert answers["full"] == list(run_answers(smoke_pipeline[0])["response"])
    for name in ("merged", "full"):
        files = {p.name for p in exports[name].iterdir()}
        assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= files, files
        assert "adapter_config.json" not in files


def test_the_cards_snippet_runs_against_the_hub_id(loaded) -> None:
    _, printed = loaded
    assert printed.strip(), "the card's snippet printed no answer"


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def tables(markdown: str) -> list[str]:
    """Every pipe table of a Markdown text, as its lines joined."""
    blocks, current = [], []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    return blocks


def test_cards_say_what_they_are_and_render_the_runs_tables(exports, smoke_pipeline) -> None:
    adapter = (exports["adapter"] / "README.md").read_text()
    meta = front_matter(adapter)
    assert meta["base_model"] == "org/tiny" and meta["library_name"] == "peft"
    assert meta["pipeline_tag"] == "image-text-to-text" and meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["shapes_train"] and "base_model:adapter:org/tiny" in meta["tags"]
    assert "org/tiny: the same safetensors files as the run's base (SHA-256)" in adapter

    full = (exports["full"] / "README.md").read_text()
    assert front_matter(full)["library_name"] == "transformers"
    report = (smoke_pipeline[0] / "report.md").read_text()
    results = full.split("## Results of this run", 1)[1].split("## Training recipe", 1)[0]
    found = tables(results)
    assert len(found) == 4  # in-domain, out-of-domain, unanswerable, validation
    assert all(table in tables(report) for table in found), "the card's tables are not the run's report's"
    recipe = tables(full.split("## Training recipe", 1)[1])[0]
    assert [line.split("|")[1].strip() for line in recipe.splitlines()[2:]] == ["idk_it", "cadpo"]


def test_export_refuses_what_it_would_mislabel(lora_run, hub_cache, tmp_path: Path, capsys) -> None:
    run, overrides = lora_run
    refused = {
        "does not hold the run's base weights": export_argv(
            run, overrides, str(tmp_path / "a"), "--base-id", "org/untrained"
        ),
        "is not the one cadpo was trained with": export_argv(
            run, overrides[: -len(LORA)], str(tmp_path / "b")
        ),
    }
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "old.safetensors").write_bytes(b"x")
    refused["is not empty"] = export_argv(run, overrides, str(tmp_path / "c"))
    for message, argv in refused.items():
        capsys.readouterr()
        assert export_job.main(argv) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
