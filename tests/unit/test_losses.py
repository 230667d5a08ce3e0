"""CA-DPO, its ablations and the response-only cross-entropy, checked against hand-worked numbers and a
naive per-row reference. Notation: f(w > l) = log sigma(beta * [(pi_w - ref_w) - (pi_l - ref_l)])."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inbol_ray.train.losses import cadpo_loss, dpo_stats, dpo_term, response_nll, sft_loss

KINDS = ("correct", "incorrect", "refusal")
NAN = float("nan")


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def _example() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, list[str]]:
    """Rows: known, mixed (conf 0.3), unknown; NaN where the bucket has no response."""
    logps = {
        "correct": _t(-1.0, -1.0, NAN),
        "incorrect": _t(NAN, -2.0, -1.0),
        "refusal": _t(-3.0, -3.0, -1.0),
    }
    ref = {"correct": _t(-2.0, -2.0, NAN), "incorrect": _t(NAN, -2.0, -1.0), "refusal": _t(-2.0, -2.0, -2.0)}
    return (
        logps,
        {k: v.detach() for k, v in ref.items()},
        torch.tensor([1.0, 0.3, 0.0]),
        ["known", "mixed", "unknown"],
    )


def test_dpo_term_by_hand() -> None:
    """pi_w=-1, pi_l=-2, ref_w=ref_l=-1.5, beta=1: margin (0.5)-(-0.5)=1, f = log sigma(1) = -0.3132617."""
    out = dpo_term(torch.tensor(-1.0), torch.tensor(-2.0), torch.tensor(-1.5), torch.tensor(-1.5), beta=1.0)
    assert out.item() == pytest.approx(-0.3132617, abs=1e-6)


def test_known_row_prefers_correct_over_refusal_in_every_variant() -> None:
    """Known row, beta=1: margin = (-1+2) - (-3+2) = 2, loss = -log sigma(2) = 0.1269280, conf irrelevant."""
    logps, ref, _, _ = _example()
    for variant in ("cadpo", "dpo1", "dpo2", "dpo3"):
        for conf in (1.0, 0.2):
            rows = cadpo_loss(
                logps,
                ref,
                torch.tensor([conf, 0.3, 0.0]),
                ["known", "mixed", "unknown"],
                1.0,
                variant,
                "none",
            )
            assert rows[0].item() == pytest.approx(0.1269280, abs=1e-6)


@pytest.mark.parametrize(
    ("variant", "expected"),
    [("cadpo", 0.824077), ("dpo1", 0.974077), ("dpo2", 0.474077), ("dpo3", 0.724077)],
)
def test_mixed_row_weights_per_variant(variant: str, expected: float) -> None:
    """Mixed row, beta=0.5, refs all -2: f(c>i) = log sigma(0.5*[1-0]) = -0.474077,
    f(r>i) = log sigma(0.5*[-1-0]) = -0.974077. conf=0.3:
    cadpo = 0.3*0.474077 + 0.7*0.974077 = 0.824077; dpo1 = 0.974077 (refusal>incorrect only);
    dpo2 = 0.474077 (correct>incorrect only); dpo3 = (0.474077 + 0.974077)/2 = 0.724077."""
    logps, ref, conf, bucket = _example()
    rows = cadpo_loss(logps, ref, conf, bucket, beta=0.5, variant=variant, reduction="none")
    assert rows[1].item() == pytest.approx(expected, abs=1e-6)


def test_unknown_row_prefers_refusal_over_incorrect() -> None:
    """Unknown row, beta=1: margin = (-1+2) - (-1+1) = 1, loss = -log sigma(1) = 0.3132617 in every variant."""
    logps, ref, conf, bucket = _example()
    for variant in ("cadpo", "dpo1", "dpo2", "dpo3"):
        assert cadpo_loss(logps, ref, conf, bucket, 1.0, variant, "none")[2].item() == pytest.approx(
            0.3132617, abs=1e-6
        )


def test_reductions_and_finite_loss_despite_nan_in_unused_entries() -> None:
    logps, ref, conf, bucket = _example()
    rows = cadpo_loss(logps, ref, conf, bucket, 1.0, reduction="none")
    assert torch.isfinite(rows).all()
    assert cadpo_loss(logps, ref, conf, bucket, 1.0).item() == pytest.approx(rows.mean().item())
    assert cadpo_loss(logps, ref, conf, bucket, 1.0, reduction="sum").item() == pytest.approx(
        rows.sum().item()
    )
    cadpo_loss(logps, ref, conf, bucket, 1.0).backward()
    assert logps["correct"].grad[2] == 0 and logps["incorrect"].grad[0] == 0
    assert all(torch.isfinite(v.grad).all() for v in logps.values())


def _naive(logps: dict, ref: dict, conf: list[float], bucket: list[str], beta: float, variant: str) -> float:
    """Per-row Python transcription of DESIGN.md 1.2, the reference the vectorised loss must equal."""

    def f(win: str, lose: str, i: int) -> float:
        return _logsig(beta * ((logps[win][i] - ref[win][i]) - (logps[lose][i] - ref[lose][i])))

    total = 0.0
    for i, b in enumerate(bucket):
        if b == "known":
            total -= f("correct", "refusal", i)
        elif b == "unknown":
            total -= f("refusal", "incorrect", i)
        else:
            w1, w2 = {"cadpo": (conf[i], 1 - conf[i]), "dpo1": (0, 1), "dpo2": (1, 0), "dpo3": (0.5, 0.5)}[
                variant
            ]
            total -= w1 * f("correct", "incorrect", i) + w2 * f("refusal", "incorrect", i)
    return total / len(bucket)


_ROW = st.tuples(
    st.sampled_from(["known", "mixed", "unknown"]),
    st.floats(0.05, 0.95),
    st.lists(st.floats(-30, 0), min_size=6, max_size=6),
)
_GARBAGE = st.one_of(st.just(NAN), st.just(math.inf), st.just(-math.inf), st.floats(-1e30, 1e30))


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(_ROW, min_size=1, max_size=8), variant=st.sampled_from(["cadpo", "dpo1", "dpo2", "dpo3"])
)
def test_vectorised_loss_equals_the_naive_reference(rows: list, variant: str) -> None:
    bucket = [b for b, _, _ in rows]
    conf = [c if b == "mixed" else (1.0 if b == "known" else 0.0) for b, c, _ in rows]
    logps = {k: [v[j] for _, _, v in rows] for j, k in enumerate(KINDS)}
    ref = {k: [v[j + 3] for _, _, v in rows] for j, k in enumerate(KINDS)}
    got = cadpo_loss(
        {k: torch.tensor(v, dtype=torch.float64) for k, v in logps.items()},
        {k: torch.tensor(v, dtype=torch.float64) for k, v in ref.items()},
        torch.tensor(conf, dtype=torch.float64),
        bucket,
        beta=0.3,
        variant=variant,
    )
    assert got.item() == pytest.approx(_naive(logps, ref, conf, bucket, 0.3, variant), rel=1e-9, abs=1e-12)


def _unused(bucket: str, variant: str) -> set[str]:
    if bucket == "known":
        return {"incorrect"}
    if bucket == "unknown":
        return {"correct"}
    return {"correct"} if variant == "dpo1" else set()  # dpo1 ignores correct>incorrect on mixed rows


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(_ROW, min_size=1, max_size=6),
    garbage=st.lists(_GARBAGE, min_size=12, max_size=12),
    variant=st.sampled_from(["cadpo", "dpo1", "dpo2", "dpo3"]),
)
def test_unused_entries_change_neither_loss_nor_gradient(rows: list, garbage: list, variant: str) -> None:
    bucket = [b for b, _, _ in rows]
    conf = torch.tensor([c for _, c, _ in rows], dtype=torch.float64)

    def run(fill: list[float] | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, ref = {}, {}
        for j, kind in enumerate(KINDS):
            pi_vals, ref_vals = [], []
            for i, (b, _, values) in enumerate(rows):
                unused = kind in _unused(b, variant)
                pi_vals.append(fill[(2 * i) % 12] if unused and fill else 0.0 if unused else values[j])
                ref_vals.append(
                    fill[(2 * i + 1) % 12] if unused and fill else 0.0 if unused else values[j + 3]
                )
            logps[kind] = torch.tensor(pi_vals, dtype=torch.float64, requires_grad=True)
            ref[kind] = torch.tensor(ref_vals, dtype=torch.float64)
        loss = cadpo_loss(logps, ref, conf, bucket, beta=0.5, variant=variant)
        loss.backward()
        return loss.detach(), {k: v.grad for k, v in logps.items()}

    clean_loss, clean_grads = run(None)
    dirty_loss, dirty_grads = run(garbage)
    assert torch.equal(clean_loss, dirty_loss)
    for kind in KINDS:
        assert torch.equal(clean_grads[kind], dirty_grads[kind])
        for i, (b, _, _) in enumerate(rows):
            if kind in _unused(b, variant):
                assert dirty_grads[kind][i] == 0.0


def test_nan_in_a_used_entry_is_not_hidden() -> None:
    logps, ref, conf, bucket = _example()
    logps["refusal"] = _t(NAN, -3.0, -1.0)  # the known row needs its refusal
    assert torch.isnan(cadpo_loss(logps, ref, conf, bucket, 1.0))


def test_missing_kind_is_fine_only_when_no_row_needs_it() -> None:
    only_known = {"correct": _t(-1.0), "refusal": _t(-2.0)}
    ref = {
        "correct": torch.tensor([-1.0], dtype=torch.float64),
        "refusal": torch.tensor([-1.0], dtype=torch.float64),
    }
    # margin = (-1+1) - (-2+1) = 1, loss = -log sigma(1)
    assert cadpo_loss(only_known, ref, torch.tensor([1.0]), ["known"], 1.0).item() == pytest.approx(
        -_logsig(1.0)
    )
    with pytest.raises(ValueError, match="incorrect"):
        cadpo_loss(only_known, ref, torch.tensor([0.0]), ["unknown"], 1.0)


def test_bad_bucket_variant_or_reduction_is_rejected() -> None:
    logps, ref, conf, bucket = _example()
    with pytest.raises(ValueError, match="unknown bucket"):
        cadpo_loss(logps, ref, conf, ["known", "mixed", "unanswerable"], 1.0)
    with pytest.raises(ValueError, match="unknown variant"):
        cadpo_loss(logps, ref, conf, bucket, 1.0, variant="dpo4")
    with pytest.raises(ValueError, match="reduction"):
        cadpo_loss(logps, ref, conf, bucket, 1.0, reduction="max")
    codes = torch.tensor([0, 1, 2])
    assert cadpo_loss(logps, ref, conf, codes, 1.0).item() == pytest.approx(
        cadpo_loss(logps, ref, conf, bucket, 1.0).item()
    )


def test_cadpo_gradcheck() -> None:
    conf = torch.tensor([1.0, 0.4, 0.0], dtype=torch.float64)
    ref = {k: torch.randn(3, dtype=torch.float64) for k in KINDS}

    def fn(c: torch.Tensor, i: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return cadpo_loss(
            {"correct": c, "incorrect": i, "refusal": r}, ref, conf, ["known", "mixed", "unknown"], 0.7
        )

    inputs = tuple(torch.randn(3, dtype=torch.float64, requires_grad=True) for _ in KINDS)
    assert torch.autograd.gradcheck(fn, inputs)


def test_dpo_stats_by_hand() -> None:
    """beta=1: known c>r margin 2; mixed c>i margin 1, r>i margin -1; unknown r>i margin 1.
    refusal>incorrect: mean margin (−1 + 1)/2 = 0, accuracy 1/2."""
    logps, ref, _, bucket = _example()
    stats = dpo_stats(logps, ref, bucket, beta=1.0)
    assert stats["correct>refusal/margin"] == pytest.approx(2.0) and stats["correct>refusal/accuracy"] == 1.0
    assert stats["correct>incorrect/margin"] == pytest.approx(1.0) and stats["correct>incorrect/n"] == 1
    assert (
        stats["refusal>incorrect/margin"] == pytest.approx(0.0) and stats["refusal>incorrect/accuracy"] == 0.5
    )
    only_known = dpo_stats(logps, ref, ["known"] * 3, beta=1.0)
    assert math.isnan(only_known["correct>incorrect/margin"]) and only_known["correct>incorrect/n"] == 0


def test_response_nll_by_hand() -> None:
    """Tokens (-1, -3 | -4) in responses 0 and 1: NLL means (1+3)/2 = 2 and 4; d(sum)/d logp = -1/count."""
    token_logps = torch.tensor([-1.0, -3.0, -4.0], requires_grad=True)
    nll = response_nll(token_logps, torch.tensor([0, 0, 1]), 2)
    assert nll.tolist() == [2.0, 4.0]
    nll.sum().backward()
    assert token_logps.grad.tolist() == [-0.5, -0.5, -1.0]


def test_response_nll_rejects_empty_responses_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match=">= 1 token"):
        response_nll(torch.tensor([-1.0]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="must be"):
        response_nll(torch.tensor([-1.0, -2.0]), torch.tensor([0]), 1)


def test_sft_loss_is_a_token_mean_that_accumulates_exactly() -> None:
    """(-1, -2, -3, -6): mean NLL 3. Split 1+3 tokens with num_tokens=4: 1/4 + 11/4 = 3, as one batch."""
    tokens = torch.tensor([-1.0, -2.0, -3.0, -6.0])
    assert sft_loss(tokens).item() == 3.0
    assert (sft_loss(tokens[:1], num_tokens=4) + sft_loss(tokens[1:], num_tokens=4)).item() == 3.0
    with pytest.raises(ValueError):
        sft_loss(torch.tensor([]))


def test_every_dpo_method_has_a_loss_variant_and_an_objective() -> None:
    """The method table is the one list of DPO methods: each is a `cadpo_loss` variant, and the trainer's
    objective lookup goes through it (unknown and untrained methods fail with a clear error)."""
    from inbol_ray import methods as M
    from inbol_ray.train.losses import MIXED_WEIGHTS
    from inbol_ray.train.objectives import OBJECTIVES, dpo_objective, objective_for, sft_objective

    assert set(MIXED_WEIGHTS) == set(M.DPO)
    assert set(OBJECTIVES) == {M.method(m).objective for m in M.TRAINED}
    for name in M.TRAINED:
        assert objective_for(name)[1] is (dpo_objective if name in M.DPO else sft_objective)
    for bad in ("base", "nope"):
        with pytest.raises(ValueError):
            objective_for(bad)
