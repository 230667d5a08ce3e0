"""Rehearse the real-scale run on CPU: the LLaVA-1.5-7B config, on ShapesWorld written in the real formats.

    python -m jobs.rehearse [--run-dir runs/rehearsal] [--embedded-run-dir DIR] [--variant NAME]
                            [--until STAGE] [section.key=value ...]

Three steps, each an ordinary entry point of the project:
1. The embedded default (`configs/tiny.yaml`) up to its base model, under `<run-dir>/embedded` (or
   `--embedded-run-dir`), with the 7B config's `prompt.system` (LLaVA-1.5's vicuna_v1 system line, which
   its base was trained under): the tiny LLaVA checkpoint and its pre-training stand in for
   `llava-hf/llava-1.5-7b-hf`. `make demo`'s `runs/tiny` has no system line, so it is not reused.
2. Its ShapesWorld items exported as the published files (`inbol_ray.data.export`) under `<run-dir>/data`,
   laid out like the 7B config's `/data` tree.
3. `configs/llava-1.5-7b.yaml` layered with `configs/rehearsal.yaml` (which changes only what a CPU and a
   tiny model need), `model.path` = the base of step 1, `data.root` = the export of step 2, run by the main
   job under `<run-dir>/run`. Every data set name, loader, prompt, stage and code path is the 7B run's.

Overrides (`section.key=value`) go to step 3; `--embedded NAME=VALUE` ones to step 1 (tests shrink both).
`--variant hf` layers `configs/rehearsal-hf.yaml` last: the evaluation sets read from the Hugging Face
`datasets` releases' Parquet files the export also writes (format `hf`). `--until STAGE` stops step 3
after that stage (`prepare` checks a variant's data without training).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_CONFIG = ROOT / "configs" / "tiny.yaml"
REAL_CONFIGS = [ROOT / "configs" / "llava-1.5-7b.yaml", ROOT / "configs" / "rehearsal.yaml"]
VARIANTS = {"hf": ROOT / "configs" / "rehearsal-hf.yaml"}
"""Layers a variant adds on top of REAL_CONFIGS (`--variant`)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.rehearse", description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[-1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--run-dir", default="runs/rehearsal", help="folder of the rehearsal (local or URI)")
    parser.add_argument(
        "--embedded-run-dir", default="", help="run dir of the embedded default (default: <run-dir>/embedded)"
    )
    parser.add_argument(
        "--embedded",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override for step 1 (repeatable)",
    )
    parser.add_argument(
        "--variant", choices=sorted(VARIANTS), help="layer configs/rehearsal-<NAME>.yaml last"
    )
    parser.add_argument("--until", default="", help="stop step 3 after this stage (e.g. prepare)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides of step 3")
    return parser


def main(argv: list[str] | None = None) -> int:
    from inbol_ray.config import ConfigError, load_config
    from inbol_ray.data import io as dio
    from inbol_ray.data.export import export_shapes
    from inbol_ray.run_layout import RunLayout
    from inbol_ray.schema import ID
    from jobs import pipeline

    args = _parser().parse_args(argv)
    configs = [*REAL_CONFIGS, *([VARIANTS[args.variant]] if args.variant else [])]
    run_dir = dio.absolute(args.run_dir)
    embedded_dir = dio.absolute(args.embedded_run_dir or dio.join(run_dir, "embedded"))
    data_dir, real_dir = dio.join(run_dir, "data"), dio.join(run_dir, "run")

    print(f"rehearse [1/3]: embedded default up to its base model under {embedded_dir}")
    try:
        # The base learns the real config's conversation (its system line), as LLaVA-1.5 was trained in
        # the vicuna_v1 conversation its evaluation scripts ask in: a base that never saw the system line
        # would measure prompt drift, not the recipe.
        real = load_config([str(p) for p in configs], args.overrides)
        embedded_overrides = [f"prompt.system={json.dumps(real.prompt.system)}", *args.embedded]
        embedded = load_config(str(EMBEDDED_CONFIG), embedded_overrides)
    except ConfigError as exc:
        print(f"rehearse: config error: {exc}", file=sys.stderr)
        return 2
    step1 = ["--config", str(EMBEDDED_CONFIG), "--run-dir", embedded_dir, "--until", "base_model"]
    if pipeline.main([*step1, *embedded_overrides]) != 0:
        return 2
    layout = RunLayout.of(embedded, embedded_dir)

    print(f"rehearse [2/3]: ShapesWorld in the published formats under {data_dir}")
    # By id: generation order (ids are sequence numbers), which the export's slices assume; prepare's files
    # need not keep it.
    items = dio.read_table(layout.items).sort_by(ID)
    manifest = export_shapes(items, data_dir)
    rows = sum(entry["rows"] for entry in manifest["datasets"].values())
    print(f"  {len(manifest['datasets'])} data sets, {rows} rows; {len(manifest['hf'])} also as HF releases")

    print(f"rehearse [3/3]: {' + '.join(p.name for p in configs)} under {real_dir}")
    step3 = [arg for path in configs for arg in ("--config", str(path))]
    step3 += ["--run-dir", real_dir, *(["--until", args.until] if args.until else [])]
    step3 += [f"model.path={layout.base_model}", f"data.root={data_dir}"]
    return pipeline.main([*step3, *args.overrides])


if __name__ == "__main__":
    sys.exit(main())
