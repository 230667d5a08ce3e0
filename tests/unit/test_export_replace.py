"""A method's export replaces the previous one whole (issue 31): retraining full -> LoRA or merge -> no merge
leaves no file of the earlier training where evaluation, sampling or Serve would load it.

The real thing on both sides: the tiny LLaVA checkpoint, a real peft LoRA adapter, `export_model` (what the
trainer writes) and `load_model` (what evaluation loads) through `checkpoint.resolve`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from inbol_ray import checkpoint as ckpt
from inbol_ray.train.lora import export_model

TARGET = "model.language_model.layers.0.self_attn.q_proj.weight"


def lora_policy(base: Path, scale: float):
    """The tiny model with a LoRA adapter on its attention, its B matrices set to `scale` (a delta the
    merged weights show)."""
    from peft import LoraConfig, get_peft_model

    model, _ = ckpt.load_model(str(base))
    torch.manual_seed(0)  # the same A matrices every time: the delta is linear in `scale`
    policy = get_peft_model(model, LoraConfig(r=2, lora_alpha=2, target_modules=r".*language_model.*q_proj"))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.fill_(scale)
    return policy


def publish(out: Path, base: Path, scale: float, merge: bool) -> str:
    policy = lora_policy(base, scale)
    processor = ckpt.load_processor(str(base))
    return ckpt.publish_export(
        str(out), lambda local: export_model(policy, processor, local, merge, base=str(base))
    )


def q_weight(location: Path | str) -> torch.Tensor:
    model, _ = ckpt.load_model(str(location))
    return dict(model.named_parameters())[TARGET].detach().clone()


def test_lora_after_merged_full_model_loads_the_new_weights(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "cadpo"
    base_q = q_weight(tiny_checkpoint)
    first = publish(out, tiny_checkpoint, 0.05, merge=True)  # a merged model + its adapter
    assert ckpt.resolve(str(out)) == ckpt.Resolved(first)
    merged_q = q_weight(out)
    assert not torch.equal(merged_q, base_q)

    second = publish(out, tiny_checkpoint, -0.05, merge=False)  # retrained: adapter only
    found = ckpt.resolve(str(out))
    assert found == ckpt.Resolved(str(tiny_checkpoint), os.path.join(second, "adapter"))
    assert not Path(first).exists() and not (out / "config.json").exists()
    new_q = q_weight(out)
    assert not torch.equal(new_q, merged_q) and not torch.equal(new_q, base_q)
    assert torch.allclose(new_q - base_q, -(merged_q - base_q), atol=1e-5)  # the new adapter's delta

    third = publish(out, tiny_checkpoint, 0.05, merge=True)  # and back: no adapter-only export left
    assert ckpt.resolve(str(out)) == ckpt.Resolved(third)
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(third).name, ckpt.EXPORT_POINTER])
    assert torch.allclose(q_weight(out), merged_q)


def test_a_failed_export_keeps_the_previous_one(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "idk_it"
    first = publish(out, tiny_checkpoint, 0.05, merge=False)

    def crash(local: str) -> None:
        Path(local, "adapter").mkdir()
        Path(local, "adapter", "adapter_config.json").write_text("{}")  # half written, then the node dies
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ckpt.publish_export(str(out), crash)
    assert ckpt.resolve(str(out)).adapter_dir == os.path.join(first, "adapter")
    second = publish(out, tiny_checkpoint, 0.05, merge=False)  # the next export clears the leftovers
    assert sorted(p.name for p in out.iterdir()) == sorted([Path(second).name, ckpt.EXPORT_POINTER])


def test_files_changed_after_publishing_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "cadpo"
    target = Path(publish(out, tiny_checkpoint, 0.05, merge=False))
    weights = target / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated (a half copy)
    with pytest.raises(ckpt.CheckpointError, match="do not match export.json"):
        ckpt.resolve(str(out))
    weights.unlink()
    (target / "stray.bin").write_bytes(b"x")
    with pytest.raises(
        ckpt.CheckpointError, match=r"missing or resized: \['adapter/adapter_model.safetensors'\]"
    ):
        ckpt.resolve(str(out))


def test_a_full_model_beside_an_adapter_without_a_pointer_is_ambiguous(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The layout before pointers: nothing says the two come from one training, so neither is chosen."""
    out = tmp_path / "legacy"
    policy = lora_policy(tiny_checkpoint, 0.05)
    export_model(
        policy, ckpt.load_processor(str(tiny_checkpoint)), str(out), merge=True, base=str(tiny_checkpoint)
    )
    with pytest.raises(ckpt.CheckpointError, match="holds both a full model"):
        ckpt.resolve(str(out))
    assert ckpt.resolve(str(out / "adapter")).adapter_dir == str(out / "adapter")  # each alone is fine


def test_a_pickled_adapter_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """peft falls back to `adapter_model.bin` (a pickle) when there is no safetensors file."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(tiny_checkpoint), "peft_type": "LORA"})
    )
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ckpt.UnsafeCheckpoint, match=r"only pickle weights \['adapter_model.bin'\]"):
        ckpt.load_model(str(adapter))


def test_a_model_with_pickle_weights_only_is_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`use_safetensors=True`: a `pytorch_model.bin` checkpoint is never unpickled."""
    import shutil

    model_dir = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, model_dir)
    model, _ = ckpt.load_model(str(tiny_checkpoint))
    for f in model_dir.glob("*.safetensors*"):
        f.unlink()
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        ckpt.load_model(str(model_dir))
