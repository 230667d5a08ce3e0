"""Config sections of what a run starts from: the model, the data, and the embedded default's base training."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from inbol_ray.config.errors import ConfigError, at_least, in_range

Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class ModelConfig:
    path: str = "runs/tiny/model/init"
    """HF model directory (local path). For the embedded default the tiny checkpoint is built here."""
    build_tiny: bool = False
    """Build the tiny LLaVA checkpoint at `path` when it does not exist (embedded default only)."""
    seed: int = 0
    """Seed of the tiny checkpoint's weights and tokenizer."""
    image_size: int = 48
    """Tiny model: square input resolution of the vision tower."""
    patch_size: int = 16
    """Tiny model: ViT patch size; image tokens = (image_size / patch_size)^2. 48/16 puts one
    ShapesWorld grid cell in one patch, which lets a from-scratch tower learn to see in minutes."""
    text_hidden: int = 128
    """Tiny model: LM width. Heads are 64 wide so vLLM's attention backends accept the model."""
    text_layers: int = 2
    """Tiny model: decoder layers of the LM."""
    vision_hidden: int = 128
    """Tiny model: width of the CLIP-style vision tower."""
    vision_layers: int = 2
    """Tiny model: layers of the vision tower."""
    vocab_size: int = 576
    """Tiny model: BPE vocabulary size trained on ShapesWorld text."""
    dtype: Dtype = "float32"
    """Weights dtype for inference and training."""
    image_aspect: Literal["pad", "crop"] = "crop"
    """How a non-square image becomes the vision tower's square input. `pad`: centred on a square of the
    processor's mean colour, then resized (LLaVA-1.5's `image_aspect_ratio pad` and its `expand2square`,
    how it was trained and evaluated: nothing at the edges is lost); `crop`: the processor as shipped
    (short side resized, then centre-cropped: a 640x480 photo loses a quarter of its width). Applied in
    one place (`inbol_ray.data.images.to_model_image`) before every processor call and for vLLM."""

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.image_size ({self.image_size}) must be a multiple of model.patch_size")
        for name in ("text_hidden", "vision_hidden"):
            width = getattr(self, name)
            if width % 64:
                raise ConfigError(f"model.{name} ({width}) must be a multiple of 64 (head size 64)")


@dataclass
class ShapesConfig:
    """ShapesWorld, the embedded default's procedural benchmark (inbol_ray.data.shapes)."""

    seed: int = 0
    """Seed of every scene, question and split."""
    n_pretrain: int = 6000
    """Base-model training items (answerable only, rare names almost never shown): what the base
    model saw before InBoL, like LLaVA's own instruction data."""
    n_train: int = 2000
    """InBoL training items (answerable + mismatched unanswerable): sampled for confidence, then
    used by IDK-IT / SFT / DPO. All names at equal frequency, so rare names get low confidence."""
    n_val: int = 300
    """Items of the validation set (shapes_val): answerable + unanswerable, held-out entities and images, for
    choosing every setting; the test sets are for the final table only."""
    val_unanswerable_fraction: float = 0.25
    """Fraction of shapes_val made unanswerable by mismatch (the test sets hold 300 of 1500)."""
    n_id_test: int = 400
    """Items of the in-domain test set (shapes_id_test)."""
    n_ood_test: int = 400
    """Items per OOD test set (shapes_ood_paraphrase, shapes_ood_scene)."""
    n_unanswerable_test: int = 300
    """Items of the unanswerable test set (shapes_unanswerable): mismatched questions only."""
    unanswerable_fraction: float = 0.15
    """Fraction of train items made unanswerable by image-question mismatch."""
    n_names: int = 24
    """Knowledge family: how many colour-shape combinations get an invented name."""
    rare_name_fraction: float = 0.5
    """Share of named combinations that are rare in training (the intrinsic boundary)."""
    heldout_name_fraction: float = 0.5
    """Share of the rare named combinations asked about only in the held-out splits (val, tests);
    shapes_train asks about the other rare ones, every split about the common ones
    (`shapes_questions.heldout_combos`)."""
    rare_name_weight: float = 0.002
    """Pretrain split: sampling weight of a rare name relative to a common one."""
    pretrain_multiple_choice: float = 0.25
    """Share of answerable pretrain items asked as multiple choice (options, letter answers), as
    LLaVA-1.5's training mix has: the base then answers the real formats' multiple-choice sets with a
    letter (`shapes.as_multiple_choice`)."""


@dataclass
class DatasetSpec:
    name: str = ""
    """Data set name as written into the `dataset` column (e.g. vqav2, aokvqa, gqa)."""
    format: Literal[
        "vqav2",
        "scienceqa",
        "oven",
        "aokvqa",
        "gqa",
        "mmmu",
        "mmbench",
        "aokvqa_mc",
        "vizwiz",
        "unanswerable_jsonl",
        "items",
        "hf",
    ] = "vqav2"
    """Loader of the data set's published file format (inbol_ray.data.loaders); `hf`: a Hugging Face
    `datasets` release read through a built-in column map (`preset`)."""
    path: str = ""
    """Local path or pyarrow filesystem URI of the data set's main file or folder; relative paths are
    under `data.root` when it is set. Format `hf` also takes a Hub data set id, `org/name` or
    `org/name@revision` (exactly one `/`: write `./org/name` for a local folder of that shape), kept as
    `hf://datasets/org/name[@revision]` so `data.root` never prefixes it."""
    images: str = ""
    """Image folder (when the format keeps images apart from the annotations); relative: under `data.root`."""
    split: Literal["train", "val", "id_test", "ood_test", "unanswerable_test"] = "train"
    """Which role the data set plays: InBoL training items, the validation set settings are chosen on, or
    one of the test splits."""
    limit: int = 0
    """Read the first this many rows of the file (0 = all): a *head*, for a quick look or a file already in
    random order. For a representative subset use `sample_rows`."""
    sample_rows: int = 0
    """Keep a seeded random subset of this many rows (0 = all), chosen while streaming with bounded memory
    (a hash of (data.sample_seed, row id) ranks each row; the lowest `sample_rows` are kept), so the
    subset is the same on every run and machine and unbiased by the file's order. Applied after `limit`."""
    instances: str = ""
    """COCO instance annotations (`instances_<split>.json`) of this data set's images, optional: with it
    prepare's mismatch recipe only puts a question on an image whose annotations prove the referent's
    COCO category absent (relative: under `data.root`)."""
    text_only: bool = False
    """Keep questions that have no image as text-only items (ScienceQA's text problems, MMMU's image-less
    questions, `items` rows without an image) instead of quarantining them as skipped. Off by default: the
    paper's ScienceQA is its image subset (ScienceQA-IMG). Evaluation splits only: training needs images."""
    hf_split: str = ""
    """Format `hf`: the release's own split to read (`validation`, `testdev`, `dev`, `test`, ...), not to be
    confused with `split`, the role the set plays here. Empty: the preset's default (its scored split)."""
    hf_config: str = ""
    """Format `hf`: the release's config (subset) name, e.g. `en` for lmms-lab/MMBench or
    `testdev_balanced_instructions` for lmms-lab/GQA. Empty: the preset's default."""
    preset: str = ""
    """Format `hf`: the built-in column map of the release (`lmms-lab/VQAv2`, `lmms-lab/GQA`, ...;
    inbol_ray.data.loaders.hf_presets), which says how its columns become items and which of its splits
    cannot be graded. Empty: the map named like the Hub id in `path`."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.datasets: every data set needs a name")
        if not self.path:
            raise ConfigError(f"data.datasets[{self.name}]: path is empty")
        self._check_hf()
        if self.limit < 0 or self.sample_rows < 0:
            raise ConfigError(f"data.datasets[{self.name}]: limit and sample_rows must be >= 0")
        if self.text_only and self.split == "train":
            raise ConfigError(
                f"data.datasets[{self.name}]: text_only is for evaluation splits (training items need an image)"
            )

    def _check_hf(self) -> None:
        """`hf_split`, `hf_config` and `preset` belong to format `hf`; a Hub id becomes its `hf://` URI.

        Why the URI: `data.root` prefixes every relative path (`DataConfig`), which would turn
        `lmms-lab/VQAv2` into `/data/lmms-lab/VQAv2`; a URI is left alone, and `hf://datasets/...` is the
        form `huggingface_hub`'s file system names a Hub data set by.
        """
        import re

        given = [f for f in ("hf_split", "hf_config", "preset") if getattr(self, f)]
        if self.format != "hf":
            if given:
                raise ConfigError(f"data.datasets[{self.name}]: {', '.join(given)} apply to format hf only")
            return
        if self.path.startswith("hf://") and not self.path.startswith("hf://datasets/"):
            raise ConfigError(
                f"data.datasets[{self.name}]: {self.path} is not a data set (hf://datasets/org/name[@revision])"
            )
        if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?", self.path):
            self.path = f"hf://datasets/{self.path}"
        elif not self.preset and not self.path.startswith("hf://"):
            raise ConfigError(
                f"data.datasets[{self.name}]: a local release ({self.path}) needs `preset`, the column map "
                f"to read it with (e.g. preset: lmms-lab/VQAv2)"
            )


def under_root(root: str, path: str) -> str:
    """`path` resolved under `root` when it is relative (absolute paths and URIs stay as they are)."""
    if not path or not root or path.startswith("/") or "://" in path:
        return path
    return f"{root.rstrip('/')}/{path}"


@dataclass
class DataConfig:
    source: Literal["shapes", "files"] = "shapes"
    """`shapes` generates ShapesWorld; `files` reads `datasets` in their published formats."""
    root: str = ""
    """Folder (path or URI) that relative `datasets` paths are under: where a user downloaded the data
    sets. A site config or one override (`data.root=/mnt/data`) then moves every path at once, and the
    rehearsal points the 7B config at ShapesWorld's export this way ("" = relative to the working dir)."""
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    """ShapesWorld settings (source `shapes`)."""
    datasets: list[DatasetSpec] = field(default_factory=list)
    """Data sets in their published formats (source `files`), each with its split."""
    image_storage: Literal["bytes", "path"] = "bytes"
    """Store encoded image bytes in the tables, or paths resolved lazily by each stage."""
    max_image_bytes: int = 20_000_000
    """Images larger than this (encoded) are quarantined: a decoder bomb must not stall an actor."""
    max_image_pixels: int = 40_000_000
    """Images with more pixels than this are quarantined (PIL's decompression-bomb guard, made explicit)."""
    unanswerable_per_answerable: float = 0.0
    """Source `files`: mismatched unanswerable training rows per answerable training row (>= 0), built by
    prepare from the `train` data sets (a question on another item's image; `inbol_ray.data.mismatch`),
    written as data sets `<name>_mismatch`. The paper's training sets are all answerable, so without this
    training sees no extrinsic boundary. ShapesWorld makes its own: use `shapes.unanswerable_fraction`."""
    mismatch_seed: int = 0
    """Seed of which questions are mismatched and with which images."""
    mismatch_max_referent_share: float = 0.05
    """A question goes on an image that never mentions its referent only from a pool (data set) where at
    most this share of images mention it: absence of a mention proves little for common things."""
    mismatch_max_image_uses: int = 2
    """How many mismatched rows may share one image, so no picture becomes a cue to refuse."""
    mismatch_min_fill: float = 0.5
    """Prepare fails when the recipe builds fewer than this share of its target row count (a shortfall
    that large changes the training mix the config asked for); a smaller shortfall is counted and
    printed in the report."""
    sample_seed: int = 0
    """Seed of every data set's `sample_rows` subset."""
    verify: Literal["identity", "digest"] = "identity"
    """How prepare knows its input files are unchanged: `identity` (size and modification time locally,
    ETag or version on object storage: free, and any edit in place changes it) or `digest` (also the
    SHA-256 of every annotation file: survives copies that reset mtimes, costs one read per run)."""
    max_line_bytes: int = 64_000_000
    """Longest line a JSONL reader accepts: a file with no newline (or a truncated one) fails naming its
    file and line instead of being buffered whole."""

    def __post_init__(self) -> None:
        if self.root:
            for spec in self.datasets:
                spec.path, spec.images = under_root(self.root, spec.path), under_root(self.root, spec.images)
                spec.instances = under_root(self.root, spec.instances)
        if self.source == "files" and not self.datasets:
            raise ConfigError("data.datasets is empty but data.source is 'files'")
        names = [d.name for d in self.datasets]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ConfigError(f"data.datasets: names must be unique, repeated: {repeated}")
        if self.unanswerable_per_answerable < 0:
            raise ConfigError(
                f"data.unanswerable_per_answerable must be >= 0, got {self.unanswerable_per_answerable}"
            )
        if self.source == "shapes" and self.unanswerable_per_answerable > 0:
            raise ConfigError(
                "data.unanswerable_per_answerable applies to data.source 'files' only; ShapesWorld builds its "
                "own scene-graph-proved unanswerable items: set data.shapes.unanswerable_fraction instead"
            )
        in_range("data.mismatch_max_referent_share", self.mismatch_max_referent_share, 0.0, 1.0)
        at_least("data.mismatch_max_image_uses", self.mismatch_max_image_uses, 1)
        in_range("data.mismatch_min_fill", self.mismatch_min_fill, 0.0, 1.0)
        at_least("data.max_line_bytes", self.max_line_bytes, 1024)
        reserved = [n for n in names if n == "mismatch" or n.endswith("_mismatch")]
        if reserved and self.unanswerable_per_answerable:
            raise ConfigError(
                f"data.datasets: 'mismatch' and names ending in '_mismatch' belong to the mismatched rows "
                f"(ids mismatch:..., data sets <name>_mismatch), rename {reserved}"
            )


@dataclass
class BaseTrainConfig:
    """The short supervised training that makes the tiny model know some things and not others."""

    steps: int = 2000
    """Optimizer steps of the base training."""
    batch_size: int = 32
    """Items per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW, linear warmup then cosine decay)."""
    warmup_steps: int = 100
    """Steps of linear warmup."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    vision_lr_scale: float = 0.0
    """Learning-rate multiplier of the CLIP tower (0 freezes it). At the full rate the from-scratch
    tower collapsed to image-independent features in our runs; frozen random features or a slow
    tower keep colour and shape decodable while the projector and LM learn to read them."""
    seed: int = 0
    """Seed of the base training's data order and initialisation of the trained parts."""
    threads: int = 2
    """torch threads of the base training (it runs in the driver, before any Ray stage)."""
