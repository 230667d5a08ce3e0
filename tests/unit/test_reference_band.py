"""A run against the embedded default's seed band (issue 34): the verdicts, when the band applies, and the
band `make seeds` writes from its own table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from inbol_ray import schema as S
from inbol_ray.config import load_config
from inbol_ray.eval.reference_band import (
    DEFAULT_BAND,
    QUANTITIES,
    applies,
    band_from_summary,
    band_section,
    verdict,
)
from inbol_ray.eval.seeds import stack, summary

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
SPLITS = {"shapes_ood_a": "ood_test", "shapes_ood_b": "ood_test", "shapes_unans": "unanswerable_test"}


def metrics(cadpo_ood: float, cadpo_unans: float = 0.70) -> pd.DataFrame:
    rows = []
    for method, ood, refr, unans in (("base", -0.10, 0.0, 0.0), ("cadpo", cadpo_ood, 0.61, cadpo_unans)):
        for dataset in ("shapes_ood_a", "shapes_ood_b"):
            rows.append(
                {S.METHOD: method, S.DATASET: dataset, S.N: 100, S.ACC: 0.3, S.REFR: refr, S.S_TRUST: ood}
            )
        rows.append({S.METHOD: method, S.DATASET: "shapes_unans", S.N: 100, S.ACC: 0.0, S.REFR: unans,
                     S.S_TRUST: unans - 1})  # fmt: skip
    return pd.DataFrame(rows)


def test_verdicts() -> None:
    assert verdict(0.10, 0.10, 0.05) == "inside"
    assert verdict(0.19, 0.10, 0.05) == "inside"  # 1.8 sd
    assert verdict(0.25, 0.10, 0.05) == "outside, by 3.0 sd (above)"
    assert verdict(0.0, 0.0, 0.0) == "inside"
    assert verdict(0.05, 0.0, 0.0) == "outside, by 5.0 sd (above)"  # sd floored at one point


def test_the_band_applies_to_the_default_config_at_any_seed() -> None:
    assert applies(load_config(TINY))
    seeded = load_config(
        TINY, ["data.shapes.seed=3", "train.seed=3", "sampling.seed=3", "run_dir=/elsewhere"]
    )
    assert applies(seeded)
    assert not applies(load_config(TINY, ["construct.tau_known=1.0"]))
    assert not applies(load_config(TINY, ["data.shapes.n_train=64"]))


def test_the_report_section_says_inside_or_outside() -> None:
    cfg = load_config(TINY)
    inside = "\n".join(band_section(cfg, metrics(0.10), SPLITS))
    assert "| cadpo | OOD avg s_trust | 10.0 | 10.2 ± 6.8 | inside |" in inside
    assert "every quantity is inside the band" in inside.lower()
    outside = "\n".join(band_section(cfg, metrics(0.40, cadpo_unans=0.20), SPLITS))
    assert "| cadpo | OOD avg s_trust | 40.0 | 10.2 ± 6.8 | outside, by 4.4 sd (above) |" in outside
    assert "| cadpo | unanswerable RefR | 20.0 | 70.3 ± 7.6 | outside, by 6.6 sd (below) |" in outside
    assert "2 of 6 quantities outside the band" in outside
    other = "\n".join(band_section(load_config(TINY, ["data.shapes.n_train=64"]), metrics(0.1), SPLITS))
    assert "does not apply" in other


def test_make_seeds_band_from_its_own_table(tmp_path: Path) -> None:
    per_seed = {0: metrics(0.05), 1: metrics(0.10), 2: metrics(0.15)}
    band = band_from_summary(summary(stack(per_seed, dict.fromkeys(per_seed, SPLITS))), [0, 1, 2], "test")
    mean, sd = band["methods"]["cadpo"]["ood_s_trust"]
    assert abs(mean - 0.10) < 1e-9 and abs(sd - 0.05) < 1e-9
    assert set(band["methods"]["base"]) == set(QUANTITIES)
    shipped = json.loads(DEFAULT_BAND.read_text())
    assert set(shipped["methods"]) == {"base", "sft", "idk_it", "cadpo"} and shipped["seeds"] == [0, 1, 2]
    assert all(set(q) == set(QUANTITIES) for q in shipped["methods"].values())
