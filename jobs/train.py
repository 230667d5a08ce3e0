"""Train one method with Ray Train (DDP or FSDP workers, or local mode; LoRA or full fine-tuning).

    python -m jobs.train --config configs/tiny.yaml [--run-dir DIR] method=cadpo [section.key=value ...]

method: idk_it | sft | cadpo | dpo1 | dpo2 | dpo3 (`method=X` is short for `train.method=X`). The table,
start model and reference come from the method table (inbol_ray.methods): DPO methods first get the
reference stage (reference log-probs, once), and start from `train.dpo_init`'s model, which must be trained.
Rerunning the same command resumes from the last Ray Train checkpoint.
"""

from __future__ import annotations

import sys

from inbol_ray import methods as M
from inbol_ray.cli import run_job


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [f"train.{a}" if a.startswith("method=") else a for a in argv]

    def adjust(cfg, args) -> None:
        if cfg.train.method not in cfg.eval.methods:  # the stage list holds the methods a run trains
            cfg.eval.methods.append(cfg.train.method)

    def choose(cfg, args):
        method = cfg.train.method
        return (["reference"] if M.method(method).needs_reference else []) + [f"train_{method}"], ""

    return run_job("train", __doc__, argv, choose, adjust=adjust)


if __name__ == "__main__":
    sys.exit(main())
