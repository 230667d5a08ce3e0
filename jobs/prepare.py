"""Prepare stage: data sets in their published formats (or ShapesWorld) -> `<run_dir>/items` + quarantine.

    python -m jobs.prepare --config configs/llava-1.5-7b.yaml [--config site.yaml] [--run-dir DIR] [key=value ...]

Every missing path and every file in the wrong format is listed before Ray starts (exit code 2).
"""

from __future__ import annotations

import sys

from inbol_ray.cli import fixed, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("prepare", __doc__, argv, fixed("prepare"))


if __name__ == "__main__":
    sys.exit(main())
