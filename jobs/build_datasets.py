"""Construct stage: `items` + `samples` -> `idk_it`, `sft_baseline`, `cadpo_pairs` tables (+ quarantine).

    python -m jobs.build_datasets --config configs/tiny.yaml [--run-dir DIR] [section.key=value ...]

Buckets and targets come from the `construct` section, so changing a threshold reruns only this stage
and what follows it, never sampling.
"""

from __future__ import annotations

import sys

from inbol_ray.cli import fixed, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("build_datasets", __doc__, argv, fixed("construct"))


if __name__ == "__main__":
    sys.exit(main())
