"""Export ShapesWorld as the real data sets' published files (the 7B config's `/data` tree) under a folder.

    python -m jobs.export_shapes --config configs/tiny.yaml --out DIR [--config more.yaml] [key=value ...]

Builds the items exactly as the prepare stage does for `data.source: shapes`, writes them with
`inbol_ray.data.export.export_shapes`, and prints one line per file. Then run the real-data path on them:
replace `/data` by DIR in configs/llava-1.5-7b.yaml's `data.datasets` paths. No Ray is started, so
`run_job` (which runs pipeline stages) does not fit; this is a plain argparse main.
"""

from __future__ import annotations

import argparse
import sys

from inbol_ray.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.export_shapes", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", action="append", required=True, help="YAML config; repeat to layer files (later wins)"
    )
    parser.add_argument("--out", required=True, help="folder (local path or URI) to write the files under")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (applied last)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"export_shapes: config error: {exc}", file=sys.stderr)
        return 2
    if cfg.data.source != "shapes":
        print(
            f"export_shapes: data.source is {cfg.data.source!r}; only 'shapes' can be exported",
            file=sys.stderr,
        )
        return 2
    from inbol_ray.data.export import export_shapes
    from inbol_ray.data.prepare import shapes_items

    manifest = export_shapes(shapes_items(cfg), args.out)
    files = manifest["files"]
    width = max((len(f) for f in files), default=4)
    print(f"{'file':<{width}}  rows")
    for rel in sorted(files):
        print(f"{rel:<{width}}  {files[rel]}")
    print(f"export_shapes: {len(manifest['datasets'])} data sets under {manifest['out_dir']}; "
          "use configs/llava-1.5-7b.yaml with /data replaced by this folder "
          "(add unanswerable_train, format unanswerable_jsonl, split train, to train on unanswerable items)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
