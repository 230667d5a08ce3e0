"""Evaluate stage: every method in `eval.methods` on every evaluation set, then the report.

    python -m jobs.evaluate --config configs/tiny.yaml [--run-dir DIR] [section.key=value ...]

Checkpoints come from the run layout (`models/<method>`; `base` and `refusal_prompt` use the run's base),
and every trained method must have finished training (else the job lists what to run first). Writes
`predictions.parquet`, `metrics.parquet`, the base model's confidence on the test items, `report.md` and
`figures/`; reruns reuse every (method, data set) whose checkpoint and settings did not change.
"""

from __future__ import annotations

import sys

from inbol_ray.cli import fixed, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("evaluate", __doc__, argv, fixed("evaluate", "report"))


if __name__ == "__main__":
    sys.exit(main())
