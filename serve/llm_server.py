"""Ray's `LLMServer` reading models and adapters where this project's run layout keeps them.

Ray's server mirrors a model or LoRA adapter from cloud URIs only, and expects adapters as direct
subfolders of one `dynamic_lora_loading_path`. A run keeps each method's adapter under
`<run>/models/<method>/adapter` (a bare adapter folder also works), locally or on object storage, so the
one thing changed here is *where files come from*: `inbol_ray.checkpoint` finds the adapter and
`checkpoint.local_dir` gives a local copy (the path itself, or a cached copy of an `s3://` / `gs://` one,
keyed by its file listing). Everything else (the engine, streaming, batching, multiplexed routing) is
Ray's. The class lives in an importable module because Serve imports it by name in every replica.
"""

from __future__ import annotations

import asyncio
import functools
from typing import Any

from inbol_ray import checkpoint as ckpt
from inbol_ray.data import io as dio
from serve.ray_llm import (
    DiskMultiplexConfig,
    LLMConfig,
    LLMServer,
    LoraModelLoader,
    get_lora_id,
    global_id_manager,
)
from serve.replica import bind_replica_grpc_to_node_ip


def adapter_location(models_root: str, lora_id: str) -> str:
    """The adapter folder of method `lora_id` under a run's `models` folder (KeyError-free: a clear error)."""
    found = ckpt.adapter_dir(dio.join(models_root, lora_id))
    if found is None:
        raise FileNotFoundError(f"no LoRA adapter for model '{lora_id}' under {models_root}")
    return found


class RunAdapterLoader(LoraModelLoader):
    """Adapters from the run layout under `models_root`, local or remote, through the checkpoint module's
    cache (Ray's `LoraConfig.dynamic_lora_loading_path` accepts cloud URIs only, so the root comes here)."""

    def __init__(self, *, models_root: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.models_root = models_root

    async def load_model_from_config(self, lora_model_id: str, llm_config: LLMConfig) -> DiskMultiplexConfig:
        if lora_model_id in self.disk_cache:
            return self.disk_cache[lora_model_id]
        lora_id = get_lora_id(lora_model_id)
        local = await asyncio.to_thread(
            lambda: ckpt.safe_adapter(ckpt.local_dir(adapter_location(self.models_root, lora_id)))
        )
        found = DiskMultiplexConfig.model_validate(
            {
                "model_id": lora_model_id,
                "max_total_tokens": None,
                "local_path": local,
                "lora_assigned_int_id": global_id_manager.next(),
            }
        )
        self.disk_cache[lora_model_id] = found
        return found


def local_model(llm_config: LLMConfig) -> LLMConfig:
    """The config with its model source made local (a remote checkpoint copied once per node)."""
    loading = llm_config.model_loading_config
    source = loading.model_source
    if not isinstance(source, str) or not dio.is_uri(source):
        return llm_config
    local = ckpt.local_dir(source)
    update: dict[str, Any] = {"model_source": local}
    if loading.tokenizer_source in (None, source):
        update["tokenizer_source"] = local
    return llm_config.model_copy(update={"model_loading_config": loading.model_copy(update=update)})


class RunLLMServer(LLMServer):
    """`LLMServer` whose model and adapters may live on object storage (see the module docstring);
    `models_root` is the run's `models` folder, where adapter `<base>:<method>` is looked up."""

    async def __init__(self, llm_config: LLMConfig, *, models_root: str = "", **kwargs: Any) -> None:
        bind_replica_grpc_to_node_ip()  # before Serve starts the replica's gRPC server: loopback stays loopback
        kwargs.setdefault("model_downloader", functools.partial(RunAdapterLoader, models_root=models_root))
        self._lora_lock = asyncio.Lock()
        await super().__init__(local_model(llm_config), **kwargs)

    async def _maybe_resolve_lora_from_multiplex(self) -> None:
        """One adapter load at a time: Ray checks "already loaded?" and then awaits the load, so two
        concurrent first requests for one adapter both load it and vLLM fails the second ("has already been
        loaded"), a 500 for a client that did nothing wrong. Loaded adapters return at once."""
        async with self._lora_lock:
            await super()._maybe_resolve_lora_from_multiplex()
