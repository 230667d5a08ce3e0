"""What trains: LoRA on the language model (or full fine-tuning of it), the projector by config, never the
vision tower; and how the trained weights leave a run (peft adapter, merged HF checkpoint).

Why LoRA by regex: peft matches plain names like `q_proj` in the CLIP tower too (DESIGN.md section 7), so
`train.lora_target` is a regex on full module names (`.*language_model.*\\.(q_proj|v_proj)`). The vision
tower stays frozen in every mode: it is what the paper keeps fixed, and a frozen tower is also what lets
DDP run without `find_unused_parameters` (CLIP's post_layernorm is not used by LLaVA's features).

Checkpoints hold only the trainable tensors (`trainable_state`): for LoRA that is a few MB against the
model's GB, and the base weights are the reference anyway.

Precision: full fine-tuning in bfloat16/float16 loads the policy in float32 (`master_dtype`), because
half-precision weights lose every update smaller than their rounding step; the export casts back to
`model.dtype`, so what leaves a run is the same size and type as what came in.
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from inbol_ray.config import TrainConfig
from inbol_ray.train.schedule import master_dtype

PROJECTOR = "multi_modal_projector"
VISION_TOWER = "vision_tower"
TRAINABLE_FILE = "trainable.safetensors"


def load_policy(model_dir: str, model_dtype: str, cfg: TrainConfig) -> nn.Module:
    """The start model in its training dtype with `prepare_policy` applied: the same policy in the workers
    and in the export, so checkpointed tensors fit both.

    LoRA from a start that is itself an adapter (CA-DPO from IDK-IT's adapter): that adapter is loaded
    trainable on the base and trained on, so the result is again one adapter on the run's one base; the
    frozen reference (IDK-IT) is the same base + adapter, scored once by the reference pass. Full fine-tuning
    from an adapter start merges it in memory first.
    """
    from inbol_ray.checkpoint import adapter_dir, load_for_training, local_dir, safe_adapter

    dtype = master_dtype(cfg, model_dtype)
    adapter = adapter_dir(model_dir)
    if not (cfg.lora and adapter):
        return prepare_policy(load_for_training(model_dir, dtype), cfg)
    from peft import PeftModel

    base = load_for_training(model_dir, dtype, merge_adapter=False)
    for p in base.parameters():
        p.requires_grad_(False)
    policy = PeftModel.from_pretrained(base, safe_adapter(local_dir(adapter)), is_trainable=True)
    _check_trainable(policy, cfg)
    return policy


def enable_gradient_checkpointing(policy: nn.Module) -> None:
    """Checkpoint the LM's decoder layers (non-reentrant) and stop it building a KV cache in training.

    Only the training loop calls this, on its own copy: the export rebuilds the policy without it, so the
    saved config keeps `use_cache` on for generation. Only the LM: the vision tower is frozen, so there is
    nothing of it to keep for a backward. Non-reentrant checkpointing gets gradients to LoRA adapters
    inside a checkpointed layer although the layer's input (frozen embeddings) does not require grad;
    `gradient_checkpointing_enable` also registers transformers' `enable_input_require_grads` hook on the
    embeddings (what peft relies on in reentrant mode), so it is not added a second time here.
    """
    from inbol_ray.train.response_logprobs import causal_lm

    lm = causal_lm(policy)
    lm.model.language_model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
    for config in (lm.config, lm.config.get_text_config()):
        config.use_cache = False


def prepare_policy(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Freeze the base, then add what trains: LoRA adapters (or the whole LM) and optionally the projector."""
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model  # here: importing peft costs ~3 s per worker process

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target,
            # modules_to_save puts the projector into the saved adapter, so the adapter alone is the delta.
            modules_to_save=[PROJECTOR] if cfg.train_projector else None,
        )
        model = get_peft_model(model, lora)
    else:
        for name, p in model.named_parameters():
            if PROJECTOR in name:
                p.requires_grad_(cfg.train_projector)
            elif VISION_TOWER not in name:
                p.requires_grad_(True)
    _check_trainable(model, cfg)
    return model


def _check_trainable(model: nn.Module, cfg: TrainConfig) -> None:
    leaked = [n for n, p in model.named_parameters() if p.requires_grad and VISION_TOWER in n]
    if leaked:
        raise ValueError(
            f"train.lora_target matches vision-tower modules ({leaked[0]}, ...): anchor it on "
            f"'language_model', e.g. .*language_model.*\\.(q_proj|v_proj)"
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing to train: train.lora_target {cfg.lora_target!r} matched no module")


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that change in training, by parameter name (contiguous CPU copies, ready to save)."""
    return {
        n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy saved trainable tensors into a policy built by `prepare_policy` with the same config."""
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"checkpoint does not fit this policy: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


def save_trainable(state: dict[str, torch.Tensor], directory: str | os.PathLike) -> None:
    save_file(state, os.path.join(directory, TRAINABLE_FILE))


def read_trainable(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(directory, TRAINABLE_FILE))


def export_model(
    policy: nn.Module, processor, out_dir: str, merge: bool, dtype: str | None = None, base: str = ""
) -> tuple[str | None, str | None]:
    """Save the adapter (LoRA) and/or a full llava-hf checkpoint into the *local* `out_dir`; return
    (model_dir, adapter_dir), None for what was not written.

    `dtype`: the full checkpoint's dtype (model.dtype), when the policy trained in another one (float32
    master weights); the adapter keeps its own. `base`: the location the adapter records as its base
    (`base_model_name_or_path`), the run's base URI rather than the local cache path it was loaded from, so
    any node finds it.

    The full checkpoint goes to `out_dir` itself, so `<run_dir>/models/<method>` loads like the base model
    (from_pretrained, vLLM); the adapter to `out_dir/adapter`. Merging modifies `policy`, so call this last.
    The trainer uploads `out_dir` when the run lives on object storage.
    """
    from inbol_ray.checkpoint import ADAPTER_SUBDIR, save_model

    os.makedirs(out_dir, exist_ok=True)
    adapter_dir = None
    peft = sys.modules.get("peft")  # imported only where LoRA is on (prepare_policy, load_policy)
    if peft is not None and isinstance(policy, peft.PeftModel):
        adapter_dir = os.path.join(out_dir, ADAPTER_SUBDIR)
        policy.save_pretrained(adapter_dir)
        if base:
            record_base(adapter_dir, base)
        if not merge:
            return None, adapter_dir
        policy = policy.merge_and_unload()
    if dtype is not None:
        policy = policy.to(getattr(torch, dtype))
    return save_model(policy, processor, out_dir), adapter_dir


def record_base(adapter_dir: str, base: str) -> None:
    """Name `base` in a saved adapter's `adapter_config.json`."""
    import json

    from inbol_ray.checkpoint import ADAPTER_CONFIG

    path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    with open(path) as f:
        config = json.load(f)
    config["base_model_name_or_path"] = base
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
