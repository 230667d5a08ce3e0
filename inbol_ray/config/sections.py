"""The typed run configuration: one dataclass per section, every field documented, checked on load.

Every threshold of the method lives here (DESIGN.md: "never a literal in code"). Each section validates
itself in `__post_init__`, so a config that cannot run (more workers than rows per step, an unknown
method) fails when it loads, before Ray starts, with one line naming the key. Building these from YAML
and CLI overrides is `inbol_ray.config.loading`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from inbol_ray import methods as M
from inbol_ray.config.data_sections import BaseTrainConfig, DataConfig, ModelConfig
from inbol_ray.config.errors import ConfigError, at_least, in_range


@dataclass
class GradingConfig:
    """How responses are scored against gold answers (inbol_ray.grading)."""

    vqa_correct_at: float = 0.5
    """A vqa_soft sample counts as correct when its VQA accuracy is at least this."""

    def __post_init__(self) -> None:
        in_range("grading.vqa_correct_at", self.vqa_correct_at, 0.0, 1.0)


@dataclass
class SamplingConfig:
    """Confidence sampling (K answers per item) and the engines every generating stage uses."""

    engine: Literal["transformers", "vllm"] = "transformers"
    """Generation engine of every stage that asks the model (sampling, evaluation, base confidence)."""
    k: int = 10
    """Samples per item; conf = correct / k."""
    temperature: float = 1.0
    """Sampling temperature of the K samples (> 0)."""
    top_p: float = 0.9
    """Nucleus sampling mass of the K samples."""
    max_new_tokens: int = 8
    """Longest sampled answer, in tokens."""
    seed: int = 0
    """Sample j of item i depends only on (seed, item id, j), the model and these settings."""
    batch_size: int = 32
    """Items per actor call."""
    num_actors: int = 1
    """Sampler actors (model copies) in the Ray Data actor pool."""
    gpus_per_actor: float = 0.0
    """GPUs each sampler actor reserves (0 on CPU)."""
    cpus_per_actor: float = 1.0
    """CPUs each sampler actor reserves; its torch threads = max(1, int(this))."""
    accelerator_type: str = ""
    """GPU type the generating actors (sampling, evaluation, Serve replicas) must run on, e.g. `L40S`
    (Ray's `accelerator_type:<type>` resource; "" = any). On an autoscaling cluster this is what steers
    them to the node type that offers it (configs/cluster.yaml, cluster/)."""
    gpu_memory_utilization: float = 0.85
    """vLLM on GPU: share of GPU memory the engine may take."""
    max_model_len: int = 2048
    """vLLM: longest prompt + answer in tokens (LLaVA-1.5: 576 image tokens + text)."""
    tensor_parallel_size: int = 1
    """vLLM: GPUs one engine spans (gpus_per_actor should match)."""
    kv_cache_memory_bytes: int = 0
    """vLLM: explicit KV cache size (0 = from memory utilisation on GPU, 256 MiB on CPU)."""

    def __post_init__(self) -> None:
        at_least("sampling.k", self.k, 1)
        if self.temperature <= 0:
            raise ConfigError(f"sampling.temperature must be > 0 (K samples), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sampling.top_p must be in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "batch_size", "num_actors", "tensor_parallel_size"):
            at_least(f"sampling.{name}", getattr(self, name), 1)
        if self.cpus_per_actor <= 0 and self.gpus_per_actor <= 0:
            raise ConfigError("sampling: an actor needs cpus_per_actor > 0 or gpus_per_actor > 0")


@dataclass
class ConstructConfig:
    """Turning confidences into training tables (inbol_ray.boundary)."""

    tau_known: float = 1.0
    """conf >= tau_known -> bucket `known`."""
    tau_unknown: float = 0.0
    """conf <= tau_unknown -> bucket `unknown`."""
    tau_idk: float = 0.5
    """IDK-IT: refuse when conf < tau_idk (answering earns 2*conf-1 in expectation, refusing 0)."""
    refusal_template: int = 0
    """Index into REFUSAL_TEMPLATES used as the training refusal (-1: rotate by item id)."""
    seed: int = 0
    """Seed of the choices construction makes (which incorrect sample a pair uses)."""
    window_rows: int = 100_000
    """Samples (with their items) the stage holds at once: more are cut into id ranges on local scratch disk
    and built a range at a time. Memory, not results, is what it bounds (the tables are the same)."""

    def __post_init__(self) -> None:
        at_least("construct.window_rows", self.window_rows, 1)
        if not 0.0 <= self.tau_unknown < self.tau_known <= 1.0:
            raise ConfigError(
                f"construct thresholds need 0 <= tau_unknown < tau_known <= 1, got "
                f"{self.tau_unknown}, {self.tau_known}"
            )
        in_range("construct.tau_idk", self.tau_idk, 0.0, 1.0)


@dataclass
class TrainConfig:
    """IDK-IT, SFT and the CA-DPO family on Ray Train (inbol_ray.train)."""

    method: Literal["idk_it", "sft", "cadpo", "dpo1", "dpo2", "dpo3"] = "cadpo"
    """The method `python -m jobs.train` trains (the pipeline trains every method in eval.methods)."""
    num_workers: int = 1
    """Ray Train workers (DDP/FSDP ranks); 0 runs the loop in the driver (local mode, for debugging)."""
    use_gpu: bool = False
    """One GPU per worker."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How workers share the model: DDP replicas, or FSDP shards (full fine-tuning of large models)."""
    lora: bool = True
    """Train LoRA adapters on the LM (else full fine-tuning of the LM)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch."""
    lora_target: str = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"
    """Regex of the modules LoRA wraps (anchored on `language_model`: the vision tower also has q_proj)."""
    train_projector: bool = False
    """Also train the multimodal projector."""
    epochs: int = 1
    """Passes over the training table."""
    max_steps: int = 0
    """0 = one pass over `epochs`."""
    batch_size: int = 16
    """Rows per optimizer step, all workers together (workers x grad_accum x micro-batch)."""
    grad_accum: int = 1
    """Micro-batches per worker per step."""
    lr: float = 1e-3
    """Learning rate of IDK-IT and SFT (and of DPO methods when dpo_lr is 0)."""
    beta: float = 0.1
    """DPO temperature."""
    sft_weight: float = 0.0
    """Optional NLL on the chosen response added to DPO losses (0 = pure DPO)."""
    checkpoint_every: int = 50
    """Steps between Ray Train checkpoints (each costs ~1 s: a report)."""
    num_to_keep: int = 2
    """Ray Train checkpoints kept."""
    max_failures: int = 1
    """Worker-group restarts Ray Train allows before the run fails."""
    logprob_chunk_size: int = 1024
    """Vocabulary chunk of the fused log-prob op (memory vs speed)."""
    seed: int = 0
    """Seed of the data order (per epoch) and of dropout (per step)."""
    dpo_lr: float = 0.0
    """Learning rate of the DPO methods (0 = `lr`): DPO usually wants a much smaller one than IDK-IT/SFT."""
    dpo_init: Literal["idk_it", "base"] = "idk_it"
    """What CA-DPO and the DPO ablations start from (and use as their frozen reference): the IDK-IT model
    (InBoL's two steps: IDK-IT teaches the model to say a refusal, CA-DPO then places it by confidence) or
    the base model."""
    merge: bool = False
    """LoRA: also save a merged full copy of the model next to the adapter. Off, a LoRA run stores one base
    and an adapter per method (MBs, not a 7B model's ~14 GB per method), and evaluation, Serve and the DPO
    stages load base + adapter (vLLM through a LoRARequest). Full fine-tuning always writes a full model."""
    weight_decay: float = 0.01
    """AdamW weight decay of every training (torch's AdamW default). LLaVA-1.5's LoRA recipe
    (scripts/v1_5/finetune_lora.sh) uses 0, which the LLaVA configs set."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 = no clipping; the norm is logged either way)."""
    cpus_per_worker: float = 1.0
    """Ray Train workers' (and reference scorers') CPU reservation; torch threads = max(1, round(this))."""
    window_rows: int = 16384
    """Rows of the training table a worker holds at once: each epoch shuffles the table's row groups, cuts
    them into pools of about this many rows and shuffles within a pool (inbol_ray.train.table_rows). A table
    this small or smaller is one pool: the classic full shuffle. Memory, not results, is what it bounds."""
    accelerator_type: str = ""
    """GPU type the Ray Train workers and reference scorers must run on, e.g. `H100` ("" = any): keeps
    an 8-worker DDP group on the training node type instead of spread over single-GPU sampling nodes."""
    tensorboard: bool = False
    """Also write per-step scalars to `<model out dir>/tensorboard` (metrics.jsonl is always written)."""
    warmup_ratio: float = 0.0
    """Share of each method's steps that ramp the rate linearly up from 0 (HF's ceil(ratio x steps)):
    large-model fine-tuning recipes warm up so Adam's early, poorly estimated steps stay small."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: keep the peak rate, or decay it to 0 by a half cosine over the remaining steps (HF's
    get_cosine_schedule_with_warmup, LLaVA-1.5's recipe). The rate is a pure function of the step, so a
    resumed run continues on the same curve (inbol_ray.train.schedule)."""
    gradient_checkpointing: bool = False
    """Recompute the LM's layer activations in the backward instead of keeping them: what lets a 7B/13B
    LLaVA (~600 tokens per item) train a useful micro-batch on one GPU, for ~30% more compute."""
    fp32_master_weights: bool = True
    """Full fine-tuning with model.dtype bfloat16/float16 keeps the trained weights in float32 (the policy
    loads in float32, CUDA runs forward/backward under bf16 autocast, the export is cast to model.dtype):
    an update below half the spacing of bf16 numbers around a weight (2^-8 ~ 0.004 for a weight near 1;
    lr 1e-5 x a unit Adam step is 400 times smaller) rounds away, so pure bf16 training silently stops
    learning. Setting it false with full fine-tuning in half precision is refused at load (there is no
    pure half-precision path); LoRA adapters are float32 either way (peft upcasts them)."""
    reference_batch_size: int = 0
    """Items per forward of the reference log-prob pass (0 = train.batch_size, as before this field): the
    pass keeps no activations for a backward, so it can take more items than a training micro-batch, but
    a whole optimizer step's rows in one forward is too much for a 7B model on one GPU."""

    def __post_init__(self) -> None:
        at_least("train.num_workers", self.num_workers, 0)
        at_least("train.reference_batch_size", self.reference_batch_size, 0)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"train.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr_schedule not in ("constant", "cosine"):  # the loader checks Literals; code may not
            raise ConfigError(f"train.lr_schedule must be constant or cosine, got {self.lr_schedule!r}")
        for name in (
            "epochs",
            "grad_accum",
            "lora_r",
            "checkpoint_every",
            "num_to_keep",
            "logprob_chunk_size",
            "window_rows",
        ):
            at_least(f"train.{name}", getattr(self, name), 1)
        ranks = max(1, self.num_workers) * self.grad_accum
        if self.batch_size < ranks:
            raise ConfigError(
                f"train.batch_size ({self.batch_size}) must be >= num_workers x grad_accum ({ranks}): "
                "every micro-batch needs a row"
            )
        if self.lr <= 0 or self.dpo_lr < 0:
            raise ConfigError(f"train.lr must be > 0 and train.dpo_lr >= 0, got {self.lr}, {self.dpo_lr}")
        if self.beta <= 0:
            raise ConfigError(f"train.beta must be > 0, got {self.beta}")
        in_range("train.lora_dropout", self.lora_dropout, 0.0, 0.99)
        if self.num_workers and self.cpus_per_worker <= 0:
            raise ConfigError("train.cpus_per_worker must be > 0")


@dataclass
class PromptConfig:
    """The instructions of the one prompt renderer (`inbol_ray.model.prompt.render_prompt`).

    Every stage that talks to the model (base training, sampling, construction, training, the reference
    pass, evaluation, Serve, the demo) renders an item with these, so the confidence that decides a
    training target is measured on exactly the prompt that is later evaluated and served. Defaults are
    LLaVA-1.5's own evaluation prompts (its `model_vqa_loader` / `model_vqa_mmbench` scripts).
    """

    short_answer: str = "Answer the question using a single word or phrase."
    """Ends every open question (LLaVA-1.5 answers in sentences without it, which VQA grading scores wrong)."""
    multiple_choice: str = "Answer with the option's letter from the given choices directly."
    """Ends every multiple-choice question, after its options (one per line as `A. <option>`)."""
    refusal_clause: str = "If you are not sure, answer: I don't know."
    """The `refusal_prompt` baseline's only change: this clause after the instruction."""
    system: str = ""
    """A system line before the conversation ("" = none). LLaVA-1.5's evaluation scripts use the vicuna_v1
    conversation, whose system line the LLaVA configs set (llava/conversation.py, `conv_vicuna_v1`)."""

    def __post_init__(self) -> None:
        for name in ("short_answer", "multiple_choice", "refusal_clause"):
            value = getattr(self, name)
            if value != value.strip() or "\n" in value:
                raise ConfigError(f"prompt.{name} must be one line without surrounding spaces, got {value!r}")
        if not self.refusal_clause:
            raise ConfigError("prompt.refusal_clause is empty: the refusal_prompt baseline would equal base")


@dataclass
class EvalConfig:
    """Which methods are trained and evaluated, on which sets, with which prompts."""

    datasets: list[str] = field(default_factory=list)
    """Eval set names (empty: every non-train split in `items`)."""
    methods: list[str] = field(default_factory=lambda: list(M.METHODS))
    """Methods to evaluate (inbol_ray.methods); the pipeline trains exactly what these need."""
    max_new_tokens: int = 8
    """Longest greedy answer, in tokens."""
    batch_size: int = 64
    """Items per actor call during evaluation."""
    conf_bins: int = 5
    """Bins of the base model's confidence in the intrinsic-boundary figures."""

    def __post_init__(self) -> None:
        unknown = M.unknown_methods(self.methods)
        if unknown:
            raise ConfigError(f"eval.methods: unknown method(s) {unknown}; known: {', '.join(M.METHODS)}")
        if not self.methods or len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"eval.methods must be non-empty without repeats, got {self.methods}")
        at_least("eval.conf_bins", self.conf_bins, 1)
        at_least("eval.max_new_tokens", self.max_new_tokens, 1)


@dataclass
class ServeConfig:
    """The Ray Serve deployment and its Gradio demo (serve/)."""

    host: str = "127.0.0.1"
    """HTTP bind address (loopback by default: expose deliberately)."""
    port: int = 8000
    """HTTP port."""
    min_replicas: int = 1
    """Autoscaling floor of model replicas."""
    max_replicas: int = 2
    """Autoscaling ceiling of model replicas."""
    target_ongoing_requests: float = 4.0
    """Serve autoscaling target per replica."""
    max_ongoing_requests: int = 16
    """Requests a replica accepts at once before Serve queues them."""
    max_image_bytes: int = 10_000_000
    """Uploads larger than this are refused with 413."""
    confidence_k: int = 10
    """Samples per request in confidence mode."""
    max_batch_size: int = 8
    """Greedy requests a model replica answers in one `generate` call (Serve dynamic batching), so
    concurrent users share a forward pass instead of queueing one by one."""
    batch_wait_timeout_s: float = 0.01
    """How long a replica waits to fill a batch: at most this is added to a lone user's latency."""
    upscale_delay_s: float = 30.0
    """Serve autoscaling: how long load must stay above `target_ongoing_requests` before a replica is
    added (Serve's default; tests and the benchmark shorten it to see 1 -> 2 replicas in seconds)."""
    api_key_env: str = "INBOL_SERVE_API_KEY"
    """The environment variable holding the endpoint's key. When it is set, every route but `/healthz`
    (the demo included) needs `Authorization: Bearer <key>`, what the `openai` client sends; binding a
    non-loopback host without it refuses to start (`python -m serve --insecure` overrides, with a warning)."""
    cors_origins: list[str] = field(default_factory=list)
    """Web origins allowed to call the API from a browser (empty: none; `*` is refused, since a page open in
    an operator's browser could otherwise read a loopback server's answers)."""
    max_n: int = 16
    """Most choices (`n`) one request may ask for: confidence mode needs K (`confidence_k`)."""
    max_tokens: int = 256
    """Most new tokens one choice may generate (`max_tokens` / `max_completion_tokens`)."""
    max_body_bytes: int = 16_000_000
    """Largest request body, counted as it streams in (with or without Content-Length)."""
    max_messages: int = 32
    """Most messages in one chat request."""
    max_text_chars: int = 20_000
    """Most characters of text in one request, over all its messages."""
    max_image_pixels: int = 25_000_000
    """Images with more pixels than this are refused before decoding (a served image is shrunk to the
    model's 336 px side anyway)."""
    max_queued_requests: int = 64
    """Requests waiting for a replica beyond `max_ongoing_requests`; more are answered 503 with
    Retry-After instead of queueing without bound."""
    request_timeout_s: float = 120.0
    """A request that has not finished after this is answered 504 (and its engine call abandoned)."""
    engine_hang_s: float = 300.0
    """`/readyz` and the replicas' health checks fail when an engine call has run longer than this: a wedged
    engine is restarted instead of holding requests forever."""

    def __post_init__(self) -> None:
        if "*" in self.cors_origins:
            raise ConfigError("serve.cors_origins: '*' is refused; list the origins that may call the API")
        for name in ("max_n", "max_tokens", "max_messages", "max_text_chars", "max_queued_requests"):
            at_least(f"serve.{name}", getattr(self, name), 1)
        if self.max_n < self.confidence_k:
            raise ConfigError(
                f"serve.max_n ({self.max_n}) must be >= serve.confidence_k ({self.confidence_k})"
            )
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(
                f"serve: need 1 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}"
            )


@dataclass
class RayConfig:
    """How jobs reach Ray."""

    address: str = ""
    """Empty: start a local Ray with `num_cpus`; otherwise connect (e.g. `auto`)."""
    num_cpus: int = 2
    """CPUs of a local Ray (explicit: Ray would otherwise take every core it sees)."""
    temp_dir: str = ""
    """Ray's session folder for a local Ray (empty: Ray's default)."""
    concurrent_stages: int = 1
    """Stages the pipeline runs at once when neither needs the other's output (sft beside idk_it, the DPO
    methods beside each other). Each asks Ray for its own resources (a training: train.num_workers x
    cpus_per_worker), so what does not fit waits. Never changes an output."""

    driver_lease_s: float = 300.0
    """One driver per run directory: a job holds a lease on the run (`<run_dir>/.lease.json`, renewed every
    third of this), and a second driver fails naming the holder; a lease not renewed for this long (a
    killed driver) is taken over with a warning."""

    def __post_init__(self) -> None:
        at_least("ray.num_cpus", self.num_cpus, 1)
        at_least("ray.concurrent_stages", self.concurrent_stages, 1)
        if self.driver_lease_s < 10:
            raise ConfigError(f"ray.driver_lease_s must be >= 10, got {self.driver_lease_s}")


@dataclass
class TrackingConfig:
    """An experiment tracker the run reports to (off by default): one parent run per pipeline run, a child
    per stage and per trained method (`inbol_ray.tracking`). A tracker that fails never fails a stage: one
    warning, and the run's own files stay the record."""

    backend: Literal["none", "mlflow", "wandb"] = "none"
    """Which tracker."""
    uri: str = ""
    """MLflow: the tracking URI (empty: $MLFLOW_TRACKING_URI, else MLflow's default); W&B: the base URL of a
    self-hosted server (empty: $WANDB_BASE_URL / W&B's default; `WANDB_MODE=offline` writes files only)."""
    project: str = "inbol-ray"
    """MLflow experiment / W&B project."""
    run_name: str = ""
    """The parent run's name (empty: the run directory's name)."""
    tags: list[str] = field(default_factory=list)
    """Extra tags on every run, as `key=value` (team, sweep id, ...)."""

    def __post_init__(self) -> None:
        bad = [t for t in self.tags if "=" not in t or not t.split("=", 1)[0]]
        if bad:
            raise ConfigError(f"tracking.tags: each tag is key=value, got {bad}")


@dataclass
class CheckpointConfig:
    """The node-local copies of checkpoints on object storage (`inbol_ray.checkpoint_cache`)."""

    cache_dir: str = ""
    """Where copies go (empty: $INBOL_CHECKPOINT_CACHE, else a private folder under the temp dir). The
    folder is created 0700: a copy is whatever a later load executes into the model."""
    cache_bytes: int = 200_000_000_000
    """Bound of the cache: least recently used copies are evicted beyond it (a 7B base is ~14 GB)."""

    def __post_init__(self) -> None:
        at_least("checkpoint.cache_bytes", self.cache_bytes, 1)


def check_training_precision(model_dtype: str, train: TrainConfig) -> None:
    """Refuse full fine-tuning with half-precision weights (see TrainConfig.fp32_master_weights): a
    cross-section check, run when a Config loads and again by the trainer before Ray starts, since a
    config changed in code after loading skips the first."""
    if model_dtype in ("bfloat16", "float16") and not train.lora and not train.fp32_master_weights:
        raise ConfigError(
            f"train.fp32_master_weights=false with full fine-tuning (train.lora=false) in "
            f"model.dtype={model_dtype} would round most updates away: keep it true, or use LoRA"
        )


@dataclass
class Config:
    """A whole run: one section per stage family."""

    run_dir: str = "runs/tiny"
    """Where every output of the run goes: a local path or a pyarrow filesystem URI (s3://...)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The model InBoL starts from."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training and evaluation data."""
    base_train: BaseTrainConfig = field(default_factory=BaseTrainConfig)
    """Embedded default only: the tiny model's base training."""
    grading: GradingConfig = field(default_factory=GradingConfig)
    """Scoring responses."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """Confidence sampling and the generation engines."""
    construct: ConstructConfig = field(default_factory=ConstructConfig)
    """Training tables from confidences."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training."""
    prompt: PromptConfig = field(default_factory=PromptConfig)
    """The instructions every prompt is rendered with."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and the report."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Serving."""
    ray: RayConfig = field(default_factory=RayConfig)
    """Ray connection."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Local copies of remote checkpoints."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking (MLflow, W&B)."""

    def __post_init__(self) -> None:
        check_training_precision(self.model.dtype, self.train)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section_hash(self, *sections: str) -> str:
        """Content hash of the named sections, so a stage reruns exactly when its inputs' config changes."""
        blob = json.dumps({s: dataclasses.asdict(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
