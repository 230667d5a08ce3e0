"""The seed table: means and sds over seeds, split averages, and which orderings exceed seed noise."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from inbol_ray import schema as S
from inbol_ray.eval.seeds import Claim, Quantity, claim_rows, seeds_markdown, stack, summary
from jobs.seeds import SEED_KEYS, main, seed_overrides

SPLITS = {"v": "val", "a": "ood_test", "b": "ood_test", "u": "unanswerable_test", "x": "other"}


def _metrics(values: dict[tuple[str, str], tuple[float, float]]) -> pd.DataFrame:
    """(method, set) -> (acc, refr); s_trust = 2 acc + refr - 1 as the metric defines it."""
    rows = [
        {S.METHOD: m, S.DATASET: d, S.N: 100, S.ACC: acc, S.REFR: refr, S.S_TRUST: 2 * acc + refr - 1}
        for (m, d), (acc, refr) in values.items()
    ]
    return pd.DataFrame(rows)


def _seed(shift: float) -> pd.DataFrame:
    return _metrics(
        {
            ("base", "a"): (0.50 + shift, 0.0),
            ("base", "b"): (0.40, 0.0),
            ("base", "u"): (0.0, 0.10),
            ("base", "x"): (0.9, 0.0),
            ("cadpo", "a"): (0.45, 0.40 + shift),
            ("cadpo", "b"): (0.40, 0.40),
            ("cadpo", "u"): (0.0, 0.80),
            ("sft", "a"): (0.50, 0.0),
            ("sft", "b"): (0.40 + 3 * shift, 0.0),
            ("sft", "u"): (0.0, 0.40),
        }
    )


@pytest.fixture
def stacked() -> pd.DataFrame:
    seeds = {0: _seed(0.0), 1: _seed(0.02), 2: _seed(-0.02)}
    return stack(seeds, {s: SPLITS for s in seeds})


def test_means_sds_and_split_averages(stacked: pd.DataFrame) -> None:
    assert set(stacked["split"]) == {"val", "ood_test", "unanswerable_test"} - {
        "val"
    }  # "x" is no seed-table split
    table = summary(stacked).set_index([S.METHOD, S.DATASET])
    a = table.loc[("base", "a")]
    assert a["acc_mean"] == pytest.approx(0.50) and a["acc_sd"] == pytest.approx(0.02)  # sample sd of +-0.02
    avg = table.loc[("base", "avg:ood_test")]  # mean of the per-seed averages over a and b
    assert avg[f"{S.S_TRUST}_mean"] == pytest.approx(((2 * 0.5 - 1) + (2 * 0.4 - 1)) / 2)
    assert avg["seeds"] == 3


def test_orderings_are_paired_per_seed(stacked: pd.DataFrame) -> None:
    claims = claim_rows(stacked).set_index("claim")
    # CA-DPO's OOD s_trust minus the base's: cadpo gains refusals on "a" where the base gains accuracy
    above = claims.loc["CA-DPO OOD s_trust >= base + 10"]
    per_seed = [above[f"diff_seed{s}"] for s in (0, 1, 2)]
    base = [((2 * (0.5 + d) - 1) + (2 * 0.4 - 1)) / 2 for d in (0.0, 0.02, -0.02)]
    cadpo = [((2 * 0.45 + 0.4 + d - 1) + (2 * 0.4 + 0.4 - 1)) / 2 for d in (0.0, 0.02, -0.02)]
    assert per_seed == pytest.approx([c - b for c, b in zip(cadpo, base, strict=True)])
    assert above["holds"] == 3 and bool(above["beyond_noise"])
    # a claim on a method the runs lack (idk_it) is left out, not reported as failed
    assert not any("IDK-IT" in c for c in claims.index)
    unans = claims.loc["CA-DPO unanswerable RefR >= 70%"]
    assert unans["diff_mean"] == pytest.approx(0.10) and bool(unans["beyond_noise"])
    assert bool(claims.loc["base unanswerable RefR < 30%"]["beyond_noise"])


def test_beyond_noise_needs_every_seed_and_two_standard_errors() -> None:
    claim = Claim("x", Quantity("a", "s", S.ACC), 0.0, margin=0.0)
    assert claim.beyond_noise([0.05, 0.06, 0.04])
    assert not claim.beyond_noise([0.05, 0.06, -0.01])  # fails in one seed
    assert not claim.beyond_noise([0.001, 0.09, 0.002])  # holds everywhere, but the spread swamps the mean
    assert not claim.beyond_noise([0.05])  # one seed measures no noise
    within = Claim("y", Quantity("a", "s", S.ACC), 0.0, within=0.05)
    assert within.holds(-0.04) and not within.holds(0.06)
    assert within.beyond_noise([0.01, 0.0, -0.01]) and not within.beyond_noise([0.04, 0.03, 0.049])
    below = Claim("z", Quantity("a", "s", S.REFR), 0.3, below=True)
    assert below.holds(-0.1) and not below.holds(0.0)


def test_markdown_shows_mean_and_sd_per_split_and_the_orderings(stacked: pd.DataFrame) -> None:
    text = seeds_markdown(stacked, ["## Training recipe", "", "(recipe)"])
    assert "## Out-of-domain" in text and "## Unanswerable" in text and "## Validation" not in text
    assert "50.0 ± 0.0" in text or "0.0 ± 4.0" in text  # base on "a": s_trust 0 +- 4 points
    assert "## Orderings" in text and "3/3" in text and text.endswith("(recipe)")
    assert not math.isnan(summary(stacked)[f"{S.S_TRUST}_sd"].max())


def test_every_seed_key_is_a_config_field() -> None:
    from inbol_ray.config import load_config

    cfg = load_config("configs/tiny.yaml", seed_overrides(7))
    assert cfg.data.shapes.seed == cfg.model.seed == cfg.train.seed == cfg.sampling.seed == 7
    assert cfg.data.mismatch_seed == cfg.base_train.seed == cfg.construct.seed == 7
    assert len(seed_overrides(7)) == len(SEED_KEYS)


def test_cli_refuses_a_seed_override_and_repeated_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--config", "configs/tiny.yaml", "--run-dir", "unused", "train.seed=3"]) == 2
    assert main(["--config", "configs/tiny.yaml", "--run-dir", "unused", "--seeds", "1,1"]) == 2
    err = capsys.readouterr().err
    assert "train.seed" in err and "repeats" in err
