"""Evaluate stage: every trained method's checkpoint (and the two baselines) on every evaluation set.

    python -m jobs.evaluate --config configs/tiny.yaml [--run-dir DIR] [section.key=value ...]

Checkpoints are found by convention: `<run_dir>/models/<method>` for each method in `eval.methods`,
`<run_dir>/models/base` (else `model.path`) for `base` and `refusal_prompt`. Methods without a
checkpoint are skipped with a note. Writes `predictions.parquet`, `metrics.parquet`, the base model's
confidence on the test items, `report.md` and `figures/` under the run directory; reruns reuse every
(method, data set) whose checkpoint and settings did not change.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from inbol_ray.config import Config, ConfigError, load_config
from inbol_ray.data import io as dio
from inbol_ray.runtime import ray_session

BASE_METHODS = ("base", "refusal_prompt")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--run-dir", default="", help="override run_dir (local path)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    return parser.parse_args(argv)


def find_models(cfg: Config, run_dir: str) -> tuple[dict[str, str], list[str]]:
    """(method -> checkpoint dir for every method found, methods without a checkpoint)."""
    models_dir = Path(run_dir) / "models"
    base = models_dir / "base" if (models_dir / "base").is_dir() else Path(cfg.model.path)
    found, missing = {}, []
    for method in cfg.eval.methods:
        path = base if method in BASE_METHODS else models_dir / method
        if path.is_dir():
            found[method] = str(path)
        else:
            missing.append(method)
    return found, missing


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"evaluate: config error: {exc}", file=sys.stderr)
        return 2
    run_dir = dio.absolute(args.run_dir or cfg.run_dir)
    items_uri = dio.join(run_dir, "items")
    models, missing = find_models(cfg, run_dir)
    if "base" not in models or not dio.exists(items_uri):
        print(
            f"evaluate: need {items_uri} and a base checkpoint (run jobs.prepare / jobs.pipeline first)",
            file=sys.stderr,
        )
        return 2
    if missing:
        print(f"evaluate: no checkpoint for {', '.join(missing)}: skipped")
    from inbol_ray.eval.base_confidence import compute_base_confidence
    from inbol_ray.eval.evaluate import run_evaluation
    from inbol_ray.eval.report import write_report

    with ray_session(cfg.ray):
        result = run_evaluation(cfg, run_dir, models, items_uri)
        conf_uri = compute_base_confidence(cfg, run_dir, models["base"], items_uri)
    print(result.summary_line())
    report = write_report(run_dir, confidence_uri=conf_uri, methods=cfg.eval.methods, bins=cfg.eval.conf_bins)
    print(f"evaluate: report -> {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
