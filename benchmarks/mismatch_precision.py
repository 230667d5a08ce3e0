"""Benchmark: precision of prepare's image-question mismatch recipe, measured where the truth is known.

    python -m benchmarks.mismatch_precision                  # ~10 s on 2 CPU cores (n_train 2000)
    python -m benchmarks.mismatch_precision --quick          # seconds, small n
    python -m benchmarks.mismatch_precision data.unanswerable_per_answerable=0.3 shapes.n_train=4000

What runs: ShapesWorld (configs/tiny.yaml's generator, test sets shrunk) is exported as the real data
sets' files (`inbol_ray.data.export`), then the prepare stage's own `read_sources` reads them with
configs/llava-1.5-7b.yaml's data section (its `/data` replaced by the export folder, its
`unanswerable_per_answerable`, seed and thresholds), so the mismatched rows are exactly the ones a real run
would build from these files. Each built row names its question and image; the export manifest maps both
back to ShapesWorld items, whose scene graphs decide (`shapes_questions.is_unanswerable`, the same function that
proves ShapesWorld's own unanswerable items) whether the question really cannot be answered from the
chosen image.

Baseline (what a user would otherwise do): the same eligible questions, each on a uniformly random other
training image. ShapesWorld is a hard case for any text-only recipe: 4 shapes and 6 colours, one
question per image, so a random picture often holds the asked-about object unmentioned.

Columns: `answerable` training rows of the family; `eligible` (pass the question rules); `built`
mismatched rows, of them `by proof` (an image whose own item proves the referent absent, e.g. "How many
red objects?" -> zero, "Is there a circle?" -> no); `truly unanswerable` by the scene graph; `precision` =
truly unanswerable / built; `random image` = the baseline's precision over the family's eligible questions.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._measure import environment, format_table

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["family", "answerable", "eligible", "built", "by proof", "truly unanswerable", "precision",
           "random image"]  # fmt: skip
SHAPES_SIZES = {"n_pretrain": 0, "n_val": 8, "n_id_test": 8, "n_ood_test": 8, "n_unanswerable_test": 8}


def configs(overrides: list[str], quick: bool) -> tuple[Any, Any]:
    """(tiny config with ShapesWorld shrunk, 7B config) with `shapes.*` / `data.*` overrides applied."""
    from inbol_ray.config import load_config

    shapes_over = [o for o in overrides if o.startswith("shapes.")]
    data_over = [o for o in overrides if not o.startswith("shapes.")]
    sizes = {**SHAPES_SIZES, "n_train": 300 if quick else 2000}
    tiny = load_config(
        ROOT / "configs" / "tiny.yaml",
        [f"data.shapes.{k}={v}" for k, v in sizes.items()] + [f"data.{o}" for o in shapes_over],
    )
    return tiny, load_config(ROOT / "configs" / "llava-1.5-7b.yaml", data_over)


def pointed_at(cfg: Any, out: Path) -> Any:
    """The 7B config's data sets with `/data` replaced by the export folder (as tests/unit/test_export.py).

    COCO `instances:` files stay only where the export wrote one: ShapesWorld's referents (shapes, colours,
    invented names) name no COCO category, so they would change no pair."""

    def moved(path: str) -> str:
        return path.replace("/data", str(out), 1)

    cfg.data.datasets = [
        dataclasses.replace(
            s,
            path=moved(s.path),
            images=moved(s.images),
            instances=moved(s.instances) if s.instances and Path(moved(s.instances)).exists() else "",
        )
        for s in cfg.data.datasets
    ]
    return cfg


def measure(tiny: Any, real: Any, out: Path, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of the table (one per question family, then `all`; precisions as fractions, None when nothing
    was built) and the recipe's own counts (`Sources.mismatch`)."""
    from inbol_ray import schema as S
    from inbol_ray.data import shapes, shapes_questions
    from inbol_ray.data.export import export_shapes
    from inbol_ray.data.mismatch import image_key
    from inbol_ray.data.prepare import read_sources
    from inbol_ray.data.referents import exclusion_reason

    items = shapes.generate_items(tiny.data.shapes, tiny.model.image_size)
    truth = {it.id: it for it in shapes.generate(tiny.data.shapes, tiny.model.image_size)}
    names = shapes_questions.invented_names(tiny.data.shapes.n_names, tiny.data.shapes.seed)
    manifest = export_shapes(items, str(out))
    sources = read_sources(pointed_at(real, out))

    def original(row_id: str) -> shapes.ShapesItem:
        name, key = row_id.split(":", 1)
        return truth[manifest["datasets"][name]["ids"][key]]

    rows = sources.items.to_pylist()
    loaded = [
        r for r in rows if r[S.SPLIT] == "train" and r[S.ANSWERABLE] and not r[S.ID].startswith("mismatch:")
    ]
    stats: dict[str, Counter[str]] = defaultdict(Counter)
    for r in loaded:
        family = original(r[S.ID]).question.family
        stats[family]["answerable"] += 1
        stats[family]["eligible"] += exclusion_reason(r) is None
    for r in rows:
        if not r[S.ID].startswith("mismatch:"):
            continue
        question_id, image_id = r[S.ID][len("mismatch:") :].split("@")
        q, img = original(question_id), original(image_id)
        stats[q.question.family]["built"] += 1
        stats[q.question.family]["truly unanswerable"] += shapes_questions.is_unanswerable(
            q.question, img.scene, names
        )
        stats[q.question.family]["by proof"] += r[S.SOURCE].startswith("mismatch by proof:")

    rng = np.random.default_rng(seed)  # the baseline: each eligible question on a random other image
    images = sorted({image_key(r): r[S.ID] for r in loaded}.items())
    for r in loaded:
        if exclusion_reason(r) is not None:
            continue
        q = original(r[S.ID])
        others = [i for k, i in images if k != image_key(r)]
        img = original(others[int(rng.integers(len(others)))])
        stats[q.question.family]["random ok"] += shapes_questions.is_unanswerable(
            q.question, img.scene, names
        )
    table = []
    for family in [*sorted(stats), "all"]:
        c = sum(stats.values(), Counter()) if family == "all" else stats[family]
        table.append(
            {
                "family": family,
                **{k: c[k] for k in ("answerable", "eligible", "built", "by proof", "truly unanswerable")},
                "precision": c["truly unanswerable"] / c["built"] if c["built"] else None,
                "random image": c["random ok"] / c["eligible"] if c["eligible"] else None,
            }
        )
    return table, sources.mismatch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.mismatch_precision", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="small n (seconds); numbers mean little")
    parser.add_argument(
        "overrides", nargs="*", help="shapes.KEY=V (ShapesWorld) or data.KEY=V (7B data section)"
    )
    args = parser.parse_args(argv)
    tiny, real = configs(args.overrides, args.quick)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="mismatch_precision_") as tmp:
        table, counts = measure(tiny, real, Path(tmp))
    for key, value in environment().items():
        print(f"{key}: {value}")
    d = real.data
    print(
        f"ShapesWorld n_train={tiny.data.shapes.n_train} seed={tiny.data.shapes.seed}; "
        f"unanswerable_per_answerable={d.unanswerable_per_answerable} mismatch_seed={d.mismatch_seed} "
        f"max_referent_share={d.mismatch_max_referent_share} max_image_uses={d.mismatch_max_image_uses}; "
        f"{time.time() - t0:.1f}s\n"
    )
    shown = [
        {k: "-" if v is None else f"{v:.1%}" if isinstance(v, float) else v for k, v in r.items()}
        for r in table
    ]
    print(format_table(shown, COLUMNS))
    print()
    print("recipe counts: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
