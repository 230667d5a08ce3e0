"""Image loading, validation and decoding: the rules every stage relies on for "a usable image"."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from inbol_ray.data.images import CHECKED, check_images, decode_image, load_image_bytes, validate_image
from inbol_ray.schema import ID, IMAGE, IMAGE_PATH, ITEMS, REASON

BIG = 10**9


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def png() -> bytes:
    return encode(Image.new("RGB", (8, 6), "red"), "PNG")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP"])
def test_common_formats_are_valid(fmt: str) -> None:
    ok, reason = validate_image(encode(Image.new("RGB", (8, 8), "blue"), fmt), BIG, BIG)
    assert ok and reason == ""


def test_truncated_jpeg_is_caught_by_a_full_decode() -> None:
    """A cut-off JPEG still opens (header intact); only reading the pixels shows the damage."""
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    ok, reason = validate_image(data[: len(data) // 2], BIG, BIG)
    assert not ok and "not a decodable image" in reason


@pytest.mark.parametrize(
    "data", [b"this is not an image", b"\x89PNG\r\n\x1a\n broken", b"GIF89a" + b"\0" * 10]
)
def test_garbage_is_rejected_with_a_reason(data: bytes) -> None:
    ok, reason = validate_image(data, BIG, BIG)
    assert not ok and "not a decodable image" in reason


def test_empty_data() -> None:
    assert validate_image(b"", BIG, BIG) == (False, "empty image data")


def test_byte_limit(png: bytes) -> None:
    ok, reason = validate_image(png, len(png) - 1, BIG)
    assert not ok and "max_image_bytes" in reason
    assert validate_image(png, len(png), BIG)[0]


def test_pixel_limit_is_checked_from_the_header() -> None:
    """25 M pixels compress to a few KB: the limit must reject it without decoding (no memory spent)."""
    data = encode(Image.new("1", (5000, 5000)), "PNG")
    assert len(data) < 100_000
    ok, reason = validate_image(data, BIG, max_pixels=1_000_000)
    assert not ok and "5000x5000" in reason and "max_image_pixels" in reason
    assert validate_image(encode(Image.new("RGB", (8, 6)), "PNG"), BIG, max_pixels=48)[0]
    assert not validate_image(encode(Image.new("RGB", (8, 6)), "PNG"), BIG, max_pixels=47)[0]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_validate_never_raises(data: bytes) -> None:
    ok, reason = validate_image(data, BIG, BIG)
    assert isinstance(ok, bool) and (ok or reason)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "1", "CMYK"])
def test_decode_gives_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    img = decode_image(encode(Image.new(mode, (5, 4)), fmt))
    assert img.mode == "RGB" and img.size == (5, 4)


def test_decode_keeps_pixels(png: bytes) -> None:
    assert decode_image(png).getpixel((0, 0)) == (255, 0, 0)


def test_load_prefers_bytes_over_path(png: bytes, tmp_path) -> None:
    assert load_image_bytes({IMAGE: png, IMAGE_PATH: str(tmp_path / "nope.png")}) == png


def test_load_reads_path_and_uri(png: bytes, tmp_path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png)
    assert load_image_bytes({IMAGE: None, IMAGE_PATH: str(path)}) == png
    assert load_image_bytes({IMAGE: None, IMAGE_PATH: f"file://{path}"}) == png
    assert load_image_bytes({IMAGE: None, IMAGE_PATH: str(path)}, fs=pafs.LocalFileSystem()) == png


def test_load_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image_bytes({IMAGE: None, IMAGE_PATH: str(tmp_path / "missing.jpg")})
    with pytest.raises(ValueError, match="neither"):
        load_image_bytes({IMAGE: None, IMAGE_PATH: None})


def test_check_images_tags_bad_rows_and_keeps_order(png: bytes, tmp_path) -> None:
    """The Ray Data UDF of prepare and sampling: same rows in and out, a reason on each bad one."""
    (tmp_path / "a.png").write_bytes(png)
    base = {name: None for name in ITEMS.names}
    rows = [
        {**base, ID: "bytes", IMAGE: png},
        {**base, ID: "file", IMAGE_PATH: str(tmp_path / "a.png")},
        {**base, ID: "missing", IMAGE_PATH: str(tmp_path / "nope.png")},
        {**base, ID: "garbage", IMAGE: b"not an image"},
        {**base, ID: "text-only"},  # no image at all: a text-only item (its loader allowed it)
        {**base, ID: "empty", IMAGE: b""},  # empty bytes are a broken image, not a text-only item
    ]
    batch = pa.Table.from_pylist(rows, schema=ITEMS)
    out = check_images(batch, "path", BIG, BIG)
    assert out.column(ID).to_pylist() == ["bytes", "file", "missing", "garbage", "text-only", "empty"]
    assert out.schema == CHECKED
    reasons = out.column(REASON).to_pylist()
    assert reasons[:2] == [None, None] and reasons[4] is None and "empty image data" in reasons[5]
    assert "image file not found" in reasons[2] and "not a decodable image" in reasons[3]
    images = out.column(IMAGE).to_pylist()
    assert images[0] == png and images[1] is None  # path storage keeps the file lazy
    assert check_images(batch, "bytes", BIG, BIG).column(IMAGE).to_pylist()[1] == png
    assert check_images(batch, "bytes", BIG, 10).column(REASON).to_pylist()[0].startswith("field 'image'")
