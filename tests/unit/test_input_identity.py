"""Outside inputs by identity in the stage hashes, and outputs keyed by the input outputs they were made
from (issue 31). Unit speed: hashes and manifests only, no stage runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from inbol_ray import manifest
from inbol_ray.config import Config, DataConfig, DatasetSpec, ModelConfig
from inbol_ray.input_identity import identity
from inbol_ray.pipeline import fresh, stage_hashes, stages
from inbol_ray.run_layout import RunLayout

FIX = Path(__file__).resolve().parents[1] / "fixtures"


def files_config(tmp_path: Path, **data) -> Config:
    shutil.copytree(FIX / "gqa", tmp_path / "gqa", dirs_exist_ok=True)
    spec = DatasetSpec(name="gqa", format="gqa", path=str(tmp_path / "gqa/testdev_balanced_questions.json"),
                       images=str(tmp_path / "gqa/images"), split="ood_test")  # fmt: skip
    return Config(run_dir=str(tmp_path / "run"), data=DataConfig(source="files", datasets=[spec], **data))


def test_same_size_edit_and_digest_mode(tmp_path: Path) -> None:
    cfg = files_config(tmp_path)
    path = Path(cfg.data.datasets[0].path)
    before = stage_hashes(cfg, stages(cfg))["prepare"]
    assert stage_hashes(cfg, stages(cfg))["prepare"] == before  # reading changes nothing
    text = path.read_text()
    path.write_text(text[:-2] + text[-2:][::-1] if text[-2:] != text[-2:][::-1] else text.upper())
    assert path.stat().st_size == len(text.encode())
    assert stage_hashes(cfg, stages(cfg))["prepare"] != before

    digest = files_config(tmp_path, verify="digest")
    hashed = stage_hashes(digest, stages(digest))["prepare"]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a copy that changed only the time
    assert stage_hashes(digest, stages(digest))["prepare"] == hashed


def test_memory_settings_do_not_rerun_prepare(tmp_path: Path) -> None:
    a, b = files_config(tmp_path), files_config(tmp_path, max_line_bytes=4096)
    assert stage_hashes(a, stages(a)) == stage_hashes(b, stages(b))


def test_a_replaced_base_checkpoint_reruns_what_reads_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`model.path` by the identity of its files: a retrained base copied over the same folder."""
    base = tmp_path / "base"
    shutil.copytree(tiny_checkpoint, base)
    cfg = files_config(tmp_path)
    cfg.model = ModelConfig(path=str(base))
    before = stage_hashes(cfg, stages(cfg))
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight, same size
    weights.write_bytes(bytes(data))
    after = stage_hashes(cfg, stages(cfg))
    assert after["prepare"] == before["prepare"]  # the data did not change
    assert after["sample"] != before["sample"] and after["evaluate"] != before["evaluate"]


def test_an_input_rerun_with_the_same_config_makes_its_readers_stale(tmp_path: Path) -> None:
    """The hash cannot see a stage rerun with the same config (its manifest removed to force it); the
    tokens of the input manifests a stage was made from can."""
    cfg = files_config(tmp_path)
    layout = RunLayout.of(cfg)
    all_stages = {s.name: s for s in stages(cfg)}
    hashes = stage_hashes(cfg, list(all_stages.values()))

    def finish(name: str) -> None:
        inputs = {i: manifest.token(layout.manifest(i)) for i in all_stages[name].inputs}
        manifest.write_manifest(layout.manifest(name), name, hashes[name], {}, inputs=inputs)

    finish("prepare")
    finish("sample")
    assert fresh(layout, all_stages["sample"], hashes["sample"])
    finish("prepare")  # the same config, made again
    assert fresh(layout, all_stages["prepare"], hashes["prepare"])
    assert not fresh(layout, all_stages["sample"], hashes["sample"])


def test_identity_of_files_and_folders(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.json").write_text("{}")
    (tmp_path / "d" / ".hidden").write_text("x")
    assert identity(str(tmp_path / "nowhere")) == "missing"
    assert list(identity(str(tmp_path / "d"))) == ["a.json"]
    size, _ = identity(str(tmp_path / "d" / "a.json"))
    assert size == 2
    assert identity(str(tmp_path / "d" / "a.json"), digest=True)[1] == (
        "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    )


def test_a_hub_data_set_is_its_commit(tmp_path: Path, monkeypatch) -> None:
    """`format: hf` by Hub id: the commit its revision resolves to, offline from a real hub cache (no listing
    of the repository over the network), and a moved branch reruns prepare."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = Path(os.environ["HF_HUB_CACHE"]) / "datasets--org--identity-vqa"  # the session's hub cache
    for commit in ("1" * 40, "2" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "README.md").write_text("---\n---\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("1" * 40)
    spec = DatasetSpec(name="vqa", format="hf", path="org/identity-vqa", preset="lmms-lab/VQAv2", hf_split="validation",
                       split="id_test")  # fmt: skip
    cfg = Config(run_dir=str(tmp_path / "run"), data=DataConfig(source="files", datasets=[spec]))
    from inbol_ray.data.loaders import hf

    hf._COMMITS.clear()
    before = stage_hashes(cfg, stages(cfg))["prepare"]
    (repo / "refs" / "main").write_text("2" * 40)
    hf._COMMITS.clear()  # a new job resolves the branch again
    assert stage_hashes(cfg, stages(cfg))["prepare"] != before
