"""Sample stage: `items` -> `samples` (K graded responses per training item, conf).

    python -m jobs.sample_confidence --config configs/tiny.yaml [--run-dir DIR] [section.key=value ...]

Engine, K, temperature, actors and GPUs per actor come from the `sampling` section (e.g.
`sampling.engine=vllm sampling.num_actors=4 sampling.gpus_per_actor=1`). The model is the run's base: the
trained tiny base for the embedded default, else `model.path`. Rerunning resumes: finished shards are kept.
"""

from __future__ import annotations

import sys

from inbol_ray.cli import fixed, run_job


def main(argv: list[str] | None = None) -> int:
    return run_job("sample_confidence", __doc__, argv, fixed("sample"))


if __name__ == "__main__":
    sys.exit(main())
