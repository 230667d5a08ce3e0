"""The fast base-training step computes what `model(**batch).loss` computes.

`train_base` encodes the rows once, runs a frozen vision tower once per image and applies the lm_head at
answer positions only; each piece must give the plain forward's batch, features, loss and gradients.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from inbol_ray import schema as S
from inbol_ray.checkpoint import load_model
from inbol_ray.config import BaseTrainConfig, ModelConfig, ShapesConfig
from inbol_ray.data import shapes
from inbol_ray.model.base_train import (
    _can_cut_last_layer,
    batch_loss_backward,
    batch_rows,
    encode_rows,
    length_groups,
    response_loss,
    train_base,
)
from inbol_ray.model.batching import pixel_values
from inbol_ray.model.frozen_features import precompute_vision_features, vision_features

SMALL = dataclasses.replace(
    ShapesConfig(), n_pretrain=24, n_train=0, n_val=0, n_id_test=0, n_ood_test=0, n_unanswerable_test=0
)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These ops are tiny: on a loaded shared machine two spinning threads make them ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def items():
    return shapes.generate_items(SMALL, ModelConfig().image_size)


@pytest.fixture(scope="module")
def rows(tiny_checkpoint: Path, items):
    """(processor, pixel values, questions, answers) of the pretrain rows."""
    _, processor = load_model(str(tiny_checkpoint))
    pv = pixel_values(processor, items[S.IMAGE].to_pylist())
    return processor, pv, items[S.QUESTION].to_pylist(), [a[0] for a in items[S.ANSWERS].to_pylist()]


def _plain_batch(rows, idx: np.ndarray) -> dict[str, torch.Tensor]:
    """What the per-step loop fed `model(**batch)`: this batch encoded on its own."""
    processor, pv, questions, answers = rows
    batch = encode_rows(processor, pv[idx], [questions[i] for i in idx], [answers[i] for i in idx])
    return {**batch, "pixel_values": pv[idx]}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_batches_cut_from_the_encoded_rows_equal_per_batch_encoding(rows) -> None:
    processor, pv, questions, answers = rows
    encoded = encode_rows(processor, pv, questions, answers)
    rng = np.random.default_rng(0)
    for _ in range(4):
        idx = rng.permutation(len(questions))[:5]
        fast, plain = batch_rows(encoded, idx), _plain_batch(rows, idx)
        assert fast.keys() == {"input_ids", "attention_mask", "labels"}
        for key, value in fast.items():
            assert torch.equal(value, plain[key]), key


def test_vision_features_are_the_projector_inputs_of_get_image_features(tiny_checkpoint: Path, rows) -> None:
    model, _ = load_model(str(tiny_checkpoint))
    pv = rows[1][:6]
    with torch.no_grad():
        reference = torch.stack(list(model.model.get_image_features(pixel_values=pv).pooler_output))
        ours = model.model.multi_modal_projector(precompute_vision_features(model, pv, batch_size=4))
    assert ours.shape == reference.shape == (6, 9, model.config.text_config.hidden_size)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_the_tiny_language_model_takes_the_last_layer_cut(tiny_checkpoint: Path) -> None:
    """Otherwise `answer_hidden` silently falls back to the full (slower) last layer."""
    model, _ = load_model(str(tiny_checkpoint))
    assert _can_cut_last_layer(model.model.language_model)


@pytest.mark.parametrize(("frozen_vision", "cut_last_layer"), [(True, True), (True, False), (False, True)])
def test_response_loss_and_gradients_equal_the_full_forward(
    tiny_checkpoint: Path, rows, frozen_vision: bool, cut_last_layer: bool
) -> None:
    """Loss and every gradient: frozen tower (cached features) or trained tower (features with grad),
    last layer at answer positions only or at all positions."""
    model, _ = load_model(str(tiny_checkpoint))
    model.train()
    if frozen_vision:
        model.model.vision_tower.requires_grad_(False)
    idx = np.array([3, 0, 7, 11, 5, 19, 2, 8])
    batch = _plain_batch(rows, idx)

    full = model(**batch).loss
    full.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    pv = batch.pop("pixel_values")
    features = precompute_vision_features(model, pv) if frozen_vision else vision_features(model, pv)
    ours = response_loss(model, **batch, features=features, cut_last_layer=cut_last_layer)
    ours.backward()
    got = _grads(model)

    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-6)
    assert got.keys() == expected.keys()
    assert any(n.startswith("model.vision_tower.") for n in got) is not frozen_vision
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_length_groups_partition_the_batch_by_length() -> None:
    lengths = np.array([30, 58, 29, 30, 61, 27, 30, 29])
    # one group: 8 x 61 + 50 = 538; short / long: 6 x 30 + 2 x 61 + 2 x 50 = 402; three groups >= 449
    groups = length_groups(lengths, cost_per_group=50)
    assert [sorted(g.tolist()) for g in groups] == [[0, 2, 3, 5, 6, 7], [1, 4]]
    assert [len(g) for g in length_groups(lengths, cost_per_group=1e9)] == [8]
    every_length = length_groups(lengths, cost_per_group=0)
    assert sorted(np.concatenate(every_length).tolist()) == list(range(8))
    assert [sorted(set(lengths[g].tolist())) for g in every_length] == [[27], [29], [30], [58], [61]]


def test_grouped_backward_gives_the_full_batch_loss_and_gradients(tiny_checkpoint: Path, rows) -> None:
    """The batch in length groups (one per distinct length here), each backpropagating its share."""
    model, _ = load_model(str(tiny_checkpoint))
    model.train()
    model.model.vision_tower.requires_grad_(False)
    processor, pv, questions, answers = rows
    idx = np.array([3, 0, 7, 11, 5, 19, 2, 8, 14, 21])
    full = model(**_plain_batch(rows, idx)).loss
    full.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)

    encoded = encode_rows(processor, pv, questions, answers)
    lengths = encoded["attention_mask"][torch.as_tensor(idx)].sum(1).numpy()
    assert len(length_groups(lengths, cost_per_group=0)) > 1
    features = precompute_vision_features(model, pv)
    loss = batch_loss_backward(model, encoded, idx, lambda r: features[r], cost_per_group=0)
    got = _grads(model)

    assert loss == pytest.approx(full.item(), rel=1e-5)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_train_base_keeps_a_frozen_tower_and_trains_the_rest(tiny_checkpoint: Path, items, tmp_path) -> None:
    cfg = BaseTrainConfig(steps=2, batch_size=8, warmup_steps=1, threads=1)
    out = train_base(str(tiny_checkpoint), items, str(tmp_path / "base"), cfg, log=lambda _: None)
    before, after = load_model(str(tiny_checkpoint))[0].state_dict(), load_model(out)[0].state_dict()
    for name, value in before.items():
        same = torch.equal(value, after[name])
        assert same is name.startswith("model.vision_tower."), name
