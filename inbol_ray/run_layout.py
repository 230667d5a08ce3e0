"""The run directory: every table, model, manifest, figure and report location of one run, in one place.

Why one owner: paths built by hand in five packages disagreed (one used `pathlib.Path`, so `s3://` run
dirs broke) and the rules "which model does this method start from, where does its reference come from,
where does its checkpoint go" lived in three places. Every location here is a URI string (a local absolute
path or `scheme://...`), joined with `/`, so the same layout works on a laptop and on object storage.

    <run_dir>/
      items/                       prepare: one row per (data set, question)
      quarantine/<stage>.parquet   rows a stage could not use, with the reason
      samples/                     sample: K graded responses per training item (shards + manifests)
      tables/<name>/               construct: idk_it, sft_baseline, cadpo_pairs; reference: cadpo_pairs_ref
      models/init, models/base     embedded default: the built tiny checkpoint and its trained base
      models/<method>/             a trained method: export.json naming its current export-<token>/ (merged
                                   HF dir and/or adapter/, swapped in whole), metrics.jsonl, train_result.json
      models/<method>/ray/         Ray Train's run storage (checkpoints for resume)
      eval/predictions/<method>/   evaluate: one shard per (method, data set); likewise other models'
      eval/models.json             other models scored on the run's sets (checkpoints, endpoints)
      eval/endpoint/<name>/<key>/  an endpoint model's answers as they arrived, keyed by endpoint, model, prompt, decoding
      eval/base_confidence/        the base model's K samples on the test items (report figures)
      predictions.parquet, metrics.parquet, report.md, figures/
      manifests/<stage>.json       what each finished stage was made from
      .lease.json                  the driver working on the run (one at a time: inbol_ray.run_lease)
"""

from __future__ import annotations

from dataclasses import dataclass

from inbol_ray import methods as M
from inbol_ray.checkpoint import model_location
from inbol_ray.data import io as dio

REFERENCE_SUFFIX = "_ref"


@dataclass(frozen=True)
class RunLayout:
    root: str
    """Absolute local path or URI of the run directory."""
    model_path: str = ""
    """`model.path`: the user's base checkpoint when the run does not build its own."""
    build_tiny: bool = False
    dpo_init: str = "idk_it"

    @classmethod
    def of(cls, cfg, run_dir: str | None = None) -> RunLayout:
        """The layout of `cfg` (a `Config`), rooted at `run_dir` or `cfg.run_dir`."""
        return cls(
            root=dio.absolute(run_dir or cfg.run_dir),
            model_path=model_location(cfg.model.path) if cfg.model.path else "",
            build_tiny=cfg.model.build_tiny,
            dpo_init=cfg.train.dpo_init,
        )

    def path(self, *parts: str) -> str:
        return dio.join(self.root, *parts)

    # --- tables ---------------------------------------------------------------------------------------
    @property
    def items(self) -> str:
        return self.path("items")

    @property
    def samples(self) -> str:
        return self.path("samples")

    def quarantine(self, stage: str) -> str:
        return self.path(dio.QUARANTINE_DIR, f"{stage}.parquet")

    def table(self, name: str) -> str:
        return self.path("tables", name)

    def reference_table(self, name: str = "cadpo_pairs") -> str:
        """The pairs table with the reference log-probs filled in (written by the reference stage)."""
        return self.table(name + REFERENCE_SUFFIX)

    def training_table(self, method: str) -> str:
        """What `method` trains on: its constructed table, with reference log-probs for DPO methods."""
        m = M.method(method)
        if m.table is None:
            raise ValueError(f"method {method!r} is not trained")
        return self.reference_table(m.table) if m.needs_reference else self.table(m.table)

    # --- models ---------------------------------------------------------------------------------------
    def model(self, name: str) -> str:
        return self.path("models", name)

    @property
    def tiny_init(self) -> str:
        return self.model("init")

    @property
    def base_model(self) -> str:
        """The model InBoL starts from: the trained tiny base (embedded default) or `model.path`."""
        return self.model("base") if self.build_tiny else self.model_path

    def start_model(self, method: str) -> str:
        """The checkpoint `method` starts training from (and, for DPO, scores its reference with)."""
        first = M.start_method(method, self.dpo_init)
        return self.model(first) if first else self.base_model

    def reference_model(self, method: str = "cadpo") -> str:
        """The frozen reference of a DPO method: its start model (InBoL: the IDK-IT model)."""
        if not M.method(method).needs_reference:
            raise ValueError(f"method {method!r} has no reference model")
        return self.start_model(method)

    def eval_model(self, method: str) -> str:
        """The checkpoint a method is evaluated with: its trained model, or the base for the baselines."""
        return self.model(method) if M.method(method).trained else self.base_model

    def train_storage(self, method: str) -> str:
        """Ray Train's `storage_path` for `method` (checkpoints to resume from)."""
        return dio.join(self.model(method), "ray")

    # --- evaluation and report ------------------------------------------------------------------------
    def eval_shards(self, method: str) -> str:
        return self.path("eval", "predictions", method)

    @property
    def external_models(self) -> str:
        return self.path("eval", "models.json")

    @property
    def base_confidence(self) -> str:
        return self.path("eval", "base_confidence")

    @property
    def predictions(self) -> str:
        return self.path("predictions.parquet")

    @property
    def metrics(self) -> str:
        return self.path("metrics.parquet")

    @property
    def report(self) -> str:
        return self.path("report.md")

    def figure(self, name: str) -> str:
        return self.path("figures", name)

    def manifest(self, stage: str) -> str:
        return self.path("manifests", f"{stage}.json")
