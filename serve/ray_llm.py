"""Every `ray.llm` name serve/ uses, from one module, so a Ray upgrade breaks here, loudly, and nowhere else.

Ray marks `ray.serve.llm` (and its `openai_api_models`, `ingress`, `deployment` submodules) public and stable;
`ray.llm._internal` may change in any release without notice. Each name below comes from the public API
where the installed Ray has it (checked by importing it; tests/unit/test_ray_llm_imports.py keeps it so). The
public classes are empty subclasses of the internal ones (the same fields and methods), so they parse, build
and subclass exactly as before, and Ray's own `isinstance` checks accept them.

Internal-only, each for the reason in `INTERNAL_ONLY` (the test fails when a Ray upgrade makes one public, so
it moves to the public import, and when one disappears, at import time here):
- the ingress: `init` builds the FastAPI app Ray's ingress routes hang on (public: only
  `make_fastapi_ingress`, which registers Ray's routes, not ours); `ModelCard` is a `/v1/models` entry and
  `to_model_metadata` builds one from an `LLMConfig` as Ray's ingress does;
  `OpenAIHTTPException` is the error Ray's ingress answers in OpenAI's error shape;
- LoRA loading from the run layout: `LoraModelLoader` is the loader `LLMServer` accepts as `model_downloader`,
  `DiskMultiplexConfig` what it returns, `get_lora_id` and `global_id_manager` the adapter's id and vLLM's
  integer LoRA id as Ray's own loader assigns them.
"""

from __future__ import annotations

from ray.llm._internal.common.models import global_id_manager
from ray.llm._internal.common.utils.lora_utils import get_lora_id
from ray.llm._internal.serve.core.configs.llm_config import DiskMultiplexConfig
from ray.llm._internal.serve.core.configs.openai_api_models import (
    ModelCard,
    OpenAIHTTPException,
    to_model_metadata,
)
from ray.llm._internal.serve.core.ingress.ingress import init
from ray.llm._internal.serve.utils.lora_serve_utils import LoraModelLoader
from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment
from ray.serve.llm.ingress import OpenAiIngress
from ray.serve.llm.openai_api_models import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ErrorResponse,
)

INTERNAL_ONLY: dict[str, str] = {
    "init": "the FastAPI app of Ray's ingress; public make_fastapi_ingress adds Ray's routes, not ours",
    "ModelCard": "a /v1/models entry; ray.serve.llm.openai_api_models has no model card",
    "OpenAIHTTPException": "the error Ray's ingress answers in OpenAI's shape; not exported publicly",
    "to_model_metadata": "the model card metadata Ray's ingress reads from an LLMConfig; no public helper",
    "LoraModelLoader": "the model_downloader LLMServer accepts; Ray has no public adapter-loader hook",
    "DiskMultiplexConfig": "what a LoraModelLoader returns for LLMServer; not exported publicly",
    "get_lora_id": "the adapter name in a '<base>:<adapter>' model id, as Ray's own loader parses it",
    "global_id_manager": "vLLM's integer LoRA ids, shared with Ray's own loader so they never collide",
}
"""Names with no public home in the installed Ray, and why serve/ needs each."""

__all__ = [
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatCompletionStreamResponse",
    "DiskMultiplexConfig",
    "ErrorResponse",
    "LLMConfig",
    "LLMServer",
    "LoraModelLoader",
    "ModelCard",
    "OpenAIHTTPException",
    "OpenAiIngress",
    "build_llm_deployment",
    "get_lora_id",
    "global_id_manager",
    "init",
    "to_model_metadata",
]
