"""Training curves in the report, from metrics.jsonl files written by the training's own writer.

The histories are synthetic but have a real training's keys (`loss`, `loss/<group>`, `<pair>/margin`,
`<pair>/accuracy`, NaN for a pair type without rows in a step) and go through `step_metrics.write_jsonl`,
so the file the figures read is the file a training leaves. The image checks decode the PNG and look for
each line's colour drawn across its panel: a blank or legend-only figure fails them.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inbol_ray.config import Config
from inbol_ray.data import io as dio
from inbol_ray.eval.training_curves import (
    LOSS_COLOUR,
    PAIR_STYLE,
    figure_name,
    metrics_uri,
    panels,
    plot_training,
    read_history,
    rolling_mean,
    training_section,
    write_training_figures,
)
from inbol_ray.run_layout import RunLayout
from inbol_ray.train.step_metrics import write_jsonl
from tests.unit.test_report import report_of, write_synthetic_run

PAIRS = tuple(PAIR_STYLE)


def sft_history(steps: int = 40) -> list[dict]:
    return [
        {"step": s, "epoch": (s - 1) // 20, "loss": 5.0 / s, "loss/answer": 2.0 / s, "loss/refusal": 8.0 / s,
         "grad_norm": 1.0, "lr": 1e-3, "ids": [f"x{s}"]}
        for s in range(1, steps + 1)
    ]  # fmt: skip


def dpo_history(steps: int = 120, seed: int = 0) -> list[dict]:
    """Margins that grow, accuracies that rise, and steps where a pair type had no rows (NaN)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(1, steps + 1):
        row = {
            "step": s,
            "epoch": (s - 1) // 60,
            "loss": 0.7 - 0.3 * s / steps + 0.05 * rng.standard_normal(),
        }
        for k, pair in enumerate(PAIRS):
            row[f"{pair}/margin"] = (k + 1) * s / steps + 0.1 * rng.standard_normal()
            row[f"{pair}/accuracy"] = min(1.0, 0.2 * (k + 1) + 0.4 * s / steps)
        if s % 7 == 0:
            row["correct>incorrect/margin"] = row["correct>incorrect/accuracy"] = float("nan")
        rows.append(row)
    return rows


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB")).astype(int)


def drawn_extent(pixels: np.ndarray, colour: str, tolerance: int = 40) -> float:
    """The share of the image's width covered by pixels of `colour`: a line across a panel covers its
    axes' width, a legend swatch a few percent."""
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    match = np.abs(pixels - rgb).sum(axis=2) <= tolerance
    columns = np.flatnonzero(match.any(axis=0))
    return 0.0 if columns.size == 0 else (columns.max() - columns.min()) / pixels.shape[1]


def test_panels_follow_the_keys_present() -> None:
    sft = panels(sft_history())
    assert [p.title for p in sft] == ["loss"]
    assert [line.key for line in sft[0].lines] == ["loss", "loss/answer", "loss/refusal"]

    rows = dpo_history()
    for row in rows:  # a statistic added later (as a tracker would log) is plotted, not ignored
        row["correct>refusal/chosen_logp"] = -1.0
        row["refusal>incorrect/accuracy"] = None  # a pair type that never had rows: no line
    dpo = panels(rows)
    assert [p.title for p in dpo] == ["loss", "reward margin", "reward accuracy", "chosen logp"]
    assert [line.key for line in dpo[1].lines] == [f"{p}/margin" for p in PAIRS]
    assert [line.key for line in dpo[2].lines] == ["correct>refusal/accuracy", "correct>incorrect/accuracy"]
    assert dpo[2].bounds == (-0.04, 1.04) and dpo[1].zero_line


def test_trl_named_pair_statistics_get_titles_and_wrap_to_a_second_row() -> None:
    """The keys a DPO training logs today: per pair type the chosen and rejected rewards and log-probs
    (TRL's names) besides margin and accuracy; overall `rewards/*` keys have no pair type and no panel."""
    rows = dpo_history(60)
    for row in rows:
        for k, pair in enumerate(PAIRS):
            for stat in ("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected"):
                row[f"{pair}/{stat}"] = -float(k) - row["step"] / 60
        row["rewards/margins"] = row["rewards/accuracies"] = 0.5
    titles = [p.title for p in panels(rows)]
    assert titles == [
        "loss", "reward margin", "reward accuracy",
        "reward of the chosen response", "reward of the rejected response",
        "log-prob of the chosen response", "log-prob of the rejected response",
    ]  # fmt: skip
    pixels = decode(plot_training("cadpo", rows))
    assert pixels.shape[0] > 0.35 * pixels.shape[1]  # 4 panels a row: two rows, not one strip of seven
    for colour, _ in PAIR_STYLE.values():
        assert drawn_extent(pixels, colour) > 0.6


def test_a_history_without_the_usual_keys_still_plots_what_it_has() -> None:
    rows = [{"step": 1, "loss": 1.0}, {"step": 2}, {"step": 3, "loss": None}, {"step": 4, "loss": 0.5}]
    assert [p.title for p in panels(rows)] == ["loss"]
    assert plot_training("m", rows) is not None
    assert plot_training("m", []) is None
    assert plot_training("m", [{"step": 1, "note": "text only"}]) is None


def test_read_history_skips_unreadable_lines_and_sorts_by_step(tmp_path: Path) -> None:
    uri = str(tmp_path / "metrics.jsonl")
    assert read_history(uri) == []
    rows = dpo_history(7)
    write_jsonl(list(reversed(rows)), uri)  # NaN -> null, as the training writes it
    with open(uri, "a") as f:
        f.write('{"step": 8, "loss": 0.1\n')  # a torn last line
    back = read_history(uri)
    assert [r["step"] for r in back] == [1, 2, 3, 4, 5, 6, 7]
    assert back[6]["correct>incorrect/margin"] is None and math.isfinite(back[5]["correct>incorrect/margin"])


def test_rolling_mean_skips_gaps() -> None:
    y = np.array([1.0, np.nan, 3.0, 5.0, np.nan, np.nan, np.nan])
    out = rolling_mean(y, 2)
    assert out[:5].tolist() == [1.0, 1.0, 3.0, 4.0, 5.0]
    assert np.isnan(out[5]) and np.isnan(out[6])


@pytest.mark.parametrize("steps", [2, 120])
def test_dpo_figure_draws_every_line_across_its_panel(steps: int) -> None:
    """Two steps (a smoke run: markers, no smoothing) and a long run (a rolling mean over faint steps)."""
    pixels = decode(plot_training("cadpo", dpo_history(steps)))
    assert pixels.shape[1] > 1000 and pixels.shape[0] > 300
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not one colour: lines, text, grid
    # three panels side by side: a line across one covers about a quarter of the width
    assert drawn_extent(pixels, LOSS_COLOUR) > 0.2
    for colour, _ in PAIR_STYLE.values():
        assert drawn_extent(pixels, colour) > 0.5  # in the margin and the accuracy panels


def test_sft_figure_has_its_loss_line() -> None:
    pixels = decode(plot_training("sft", sft_history()))
    assert drawn_extent(pixels, LOSS_COLOUR) > 0.5  # one panel: the loss spans most of the figure
    assert drawn_extent(pixels, PAIR_STYLE["correct>refusal"][0]) == 0.0  # no pair panels for SFT


def test_report_shows_a_figure_per_trained_method(tmp_path: Path) -> None:
    """write_report on a run whose idk_it and cadpo trainings left metrics; dpo1 was not trained yet."""
    write_synthetic_run(tmp_path)
    layout = RunLayout.of(Config(), str(tmp_path))
    write_jsonl(sft_history(), metrics_uri(layout, "idk_it"))
    write_jsonl(dpo_history(), metrics_uri(layout, "cadpo"))
    text = Path(report_of(tmp_path, ["base", "idk_it", "dpo1", "cadpo"])).read_text()
    curves = text.split("## Training curves", 1)[1].split("\n## ", 1)[0]
    assert "](figures/training_idk_it.png)" in curves and "](figures/training_cadpo.png)" in curves
    assert "No training metrics for: dpo1." in curves
    assert text.index("## Training recipe") < text.index("## Training curves") < text.index("## Intrinsic")
    for method in ("idk_it", "cadpo"):
        pixels = decode((tmp_path / "figures" / figure_name(method)).read_bytes())
        assert drawn_extent(pixels, LOSS_COLOUR) > 0.2


def test_nothing_is_written_for_untrained_methods(tmp_path: Path) -> None:
    layout = RunLayout.of(Config(), str(tmp_path))
    assert write_training_figures(layout, ["idk_it", "cadpo"]) == {}
    assert not dio.exists(layout.figure(figure_name("idk_it")))
    assert training_section({}, []) == []
    assert json.dumps(training_section({}, ["sft"])).count("No training metrics for: sft.") == 1
