"""`model.image_aspect`: images shaped as LLaVA-1.5 sees them, the same pixels on every path.

LLaVA-1.5 pads a non-square image to a square of the processor's mean colour before its processor
(`expand2square`, `image_aspect_ratio pad`); the processor as shipped centre-crops instead, and a wide
photo loses its edges. Checked with the tiny checkpoint's real processor: what each setting keeps of a
wide image, that the vLLM engine's input holds the transformers engine's pixels, that a square image is
left alone, the ingress' padding for vLLM's OpenAI server, and that the setting reaches the hashes of
every stage that makes pixels.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inbol_ray.checkpoint import load_processor
from inbol_ray.data.images import (
    checkpoint_background,
    decode_image,
    mean_colour,
    processor_background,
    to_model_image,
)
from inbol_ray.model.batching import pixel_values
from inbol_ray.model.chat_format import image_aspect_for
from inbol_ray.sampling.vllm_engine import engine_input

RED = (255, 0, 0)


def expand2square(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """LLaVA's `expand2square` (llava/mm_utils.py) restated in numpy: a square canvas of `background`, the
    image at ((side - width) // 2, (side - height) // 2), i.e. centred, rounding the offset down."""
    width, height = image.size
    side = max(width, height)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = background
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top : top + height, left : left + width] = np.asarray(image)
    return canvas


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def wide_image() -> Image.Image:
    """96x32, white, a red square touching the right edge: outside the centre crop's middle third."""
    image = Image.new("RGB", (96, 32), "white")
    image.paste(RED, (84, 10, 96, 22))
    return image


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):
    return load_processor(str(tiny_checkpoint))


def red_pixels(processor, pixels: torch.Tensor) -> int:
    """Pixels of [1, 3, H, W] processor output that are clearly red once un-normalised."""
    ip = processor.image_processor
    std, mean = torch.tensor(ip.image_std)[:, None, None], torch.tensor(ip.image_mean)[:, None, None]
    rgb = pixels[0] * std + mean
    return int(((rgb[0] > 0.8) & (rgb[1] < 0.3) & (rgb[2] < 0.3)).sum())


def test_crop_cuts_the_edge_of_a_wide_image_and_pad_keeps_it(processor) -> None:
    data = png(wide_image())
    cropped = pixel_values(processor, [data], "crop")
    padded = pixel_values(processor, [data], "pad")
    size = processor.image_processor.crop_size["height"]
    assert cropped.shape == padded.shape == (1, 3, size, size)
    assert red_pixels(processor, cropped) == 0
    assert red_pixels(processor, padded) > 0
    # the padded border is the processor's mean colour: about zero once normalised
    assert padded[0, :, 0, :].abs().max() < 0.02


@pytest.mark.parametrize("size", [(96, 32), (97, 32), (31, 80), (40, 41)])
def test_pad_is_llavas_expand2square(size: tuple[int, int]) -> None:
    image = Image.effect_noise(size, 60).convert("RGB")
    background = mean_colour([0.48145466, 0.4578275, 0.40821073])
    assert background == (122, 116, 104)  # LLaVA's int(x * 255) of CLIP's mean
    ours = to_model_image(image, "pad", background)
    assert ours.size == (max(size), max(size))
    assert np.array_equal(np.asarray(ours), expand2square(image, background))
    assert to_model_image(image, "crop", background) is image


def test_a_square_image_is_unchanged_by_pad(processor) -> None:
    image = Image.effect_noise((40, 40), 60).convert("RGB")
    assert to_model_image(image, "pad", processor_background(processor)) is image
    data = png(image)
    assert torch.equal(pixel_values(processor, [data], "pad"), pixel_values(processor, [data], "crop"))


def test_an_unknown_aspect_is_refused() -> None:
    with pytest.raises(ValueError, match="'pad' or 'crop'"):
        to_model_image(wide_image(), "stretch", (0, 0, 0))


@pytest.mark.parametrize("aspect", ["pad", "crop"])
@pytest.mark.parametrize("size", [(96, 32), (32, 96)])
def test_vllm_is_given_the_pixels_the_transformers_engine_makes(
    processor, tiny_checkpoint: Path, aspect: str, size: tuple[int, int]
) -> None:
    """vLLM runs the checkpoint's own processor on the image in `multi_modal_data`: that image, through the
    processor, must be the transformers path's pixels of the same row (as the generate actor hands both
    engines a decoded row; the transformers training paths start from the row's bytes)."""
    image = wide_image() if size == (96, 32) else wide_image().transpose(Image.Transpose.ROTATE_90)
    data = png(image)
    background = checkpoint_background(str(tiny_checkpoint))
    assert background == processor_background(processor)  # read from the files == the loaded processor's
    request = engine_input(decode_image(data), "What colour is the square?", aspect, background)
    given = request["multi_modal_data"]["image"]
    vllm_pixels = processor.image_processor(images=[given], return_tensors="pt")["pixel_values"]
    assert torch.equal(vllm_pixels, pixel_values(processor, [data], aspect))
    assert torch.equal(vllm_pixels, pixel_values(processor, [decode_image(data)], aspect))
    if aspect == "pad":
        assert given.size == (96, 96)
    assert engine_input(None, "What is a circle?", aspect, background).keys() == {"prompt"}


def test_background_of_a_llava_hf_checkpoint(tmp_path: Path) -> None:
    """llava-hf's checkpoints keep the image processor in `preprocessor_config.json`."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.25, 1.0]}))
    assert checkpoint_background(str(tmp_path)) == (127, 63, 255)
    with pytest.raises(FileNotFoundError, match="image_mean"):
        checkpoint_background(str(tmp_path / "missing"))


def test_other_architectures_keep_their_own_image_handling() -> None:
    assert image_aspect_for(own_template=False, image_aspect="pad") == "pad"
    assert image_aspect_for(own_template=True, image_aspect="pad") == "crop"


def test_the_transformers_engine_samples_from_the_padded_image(
    tiny_checkpoint: Path, processor, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inbol_ray.model import generation
    from inbol_ray.sampling.hf_engine import HFSampler

    seen: list[torch.Tensor] = []

    def spy(*args, **kwargs) -> torch.Tensor:
        seen.append(pixel_values(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(generation, "pixel_values", spy)
    sampler = HFSampler(str(tiny_checkpoint), device="cpu", image_aspect="pad")
    image = wide_image()
    (answer,) = sampler.generate([image], ["What colour is the square?"], max_new_tokens=4)
    padded = to_model_image(image, "pad", processor_background(processor))
    assert len(answer) == 1 and torch.equal(seen[0], pixel_values(processor, [padded]))
    assert red_pixels(processor, seen[0]) > 0


def test_the_llm_ingress_pads_chat_images_for_vllm() -> None:
    from serve.api import Limits
    from serve.chat_rules import pad_chat_images

    image = wide_image()
    url = "data:image/jpeg;base64," + base64.b64encode(png(image)).decode()
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url, "detail": "low"}},
                                     {"type": "text", "text": "What colour is the square?"}]},
    ]  # fmt: skip
    limits = Limits(max_image_bytes=10**6, max_image_pixels=10**6, max_question_chars=1000)
    as_sent = json.loads(json.dumps(messages))
    pad_chat_images(messages, limits, None)
    assert messages == as_sent  # crop: forwarded as sent
    pad_chat_images(messages, limits, (122, 116, 104))
    part, text = messages[0]["content"]
    assert text == as_sent[0]["content"][1] and part["image_url"]["detail"] == "low"
    sent = part["image_url"]["url"]
    assert sent.startswith("data:image/png;base64,")
    received = decode_image(base64.b64decode(sent.split(",", 1)[1]))
    assert np.array_equal(np.asarray(received), expand2square(image, (122, 116, 104)))


def test_image_aspect_reaches_the_hashes_of_every_stage_that_makes_pixels(
    tiny_config, tiny_checkpoint: Path
) -> None:
    from inbol_ray.generation.actor import Decoding
    from inbol_ray.generation.stage import Job, depends_on
    from inbol_ray.pipeline import stage_hashes, stages
    from inbol_ray.train.trainer import run_name

    crop = tiny_config
    pad = dataclasses.replace(crop, model=dataclasses.replace(crop.model, image_aspect="pad"))
    before, after = stage_hashes(crop, stages(crop)), stage_hashes(pad, stages(pad))
    assert before["prepare"] == after["prepare"]  # checks and stores bytes: no pixels made
    changed = {name for name in before if before[name] != after[name]}
    assert changed == set(before) - {"prepare"}  # base_model, sample, train_*, evaluate, report ...
    job = Job("sample", "items", "out", "quarantine", str(tiny_checkpoint), Decoding(), "samples")
    assert depends_on(crop, job) != depends_on(pad, job)
    assert "image_aspect" not in depends_on(crop, job)  # shards made before the setting are still reused
    train = dataclasses.replace(crop.train, method="cadpo")
    assert run_name(train, crop.model, "t", "m") != run_name(train, pad.model, "t", "m")
