"""Image bytes: where they come from, whether they are usable, and how they become pixels.

Pure functions with no Ray in them: the prepare and sampling stages run `check_images` inside Ray Data CPU
map stages, and the sampling, training and serving stages call `load_image_bytes` + `decode_image` on the
rows they read, so the rules for "a usable image" live in exactly one place. Likewise `to_model_image` is the
one rule for how a decoded picture is shaped for the vision tower (`model.image_aspect`), applied before
every processor call and to what vLLM is given.

An `items` row holds its image in one of two ways (DESIGN.md section 3): encoded bytes in `image`, or a
location in `image_path` (a local path or a pyarrow filesystem URI) read lazily. Bytes win when both are
present, since they are what was validated at prepare time. A row with neither is a text-only item (a
question that needs no picture, e.g. ScienceQA's text problems): valid where its data set allows it
(`DatasetSpec.text_only`, enforced by the loaders), asked without an image by every engine and endpoint.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image, UnidentifiedImageError

from inbol_ray.data import io as dio
from inbol_ray.schema import IMAGE, IMAGE_PATH, ITEMS, REASON

CHECKED = ITEMS.append(pa.field(REASON, pa.string()))
"""`check_images`' output: ITEMS + why the row is bad (null when good)."""


def has_image(item: Mapping[str, Any]) -> bool:
    """False for a text-only item (neither `image` bytes nor an `image_path`)."""
    return item.get(IMAGE) is not None or bool(item.get(IMAGE_PATH))


def load_image_bytes(item: Mapping[str, Any], fs: pafs.FileSystem | None = None) -> bytes:
    """The encoded image of an `items` row: its `image` bytes, else the file at `image_path`.

    `fs`: a filesystem to open `image_path` with (the path is then inside that filesystem); by default the
    path is resolved as a URI or local path. Raises FileNotFoundError when the file does not exist and
    ValueError when the row has neither bytes nor a path.
    """
    data = item.get(IMAGE)
    if data is not None:
        return bytes(data)
    path = item.get(IMAGE_PATH)
    if not path:
        raise ValueError(f"row has neither '{IMAGE}' nor '{IMAGE_PATH}'")
    if fs is None:
        return dio.read_bytes(path)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def validate_image(data: bytes, max_bytes: int, max_pixels: int) -> tuple[bool, str]:
    """Check that `data` is a fully decodable image within the size limits; return (ok, reason).

    The pixel limit is checked from the header *before* decoding, so an oversized image (or a decompression
    bomb) costs nothing; then the whole image is decoded, because a truncated JPEG opens fine and only fails
    when its pixels are read, which would otherwise happen much later, inside a sampler or a training step.
    The reason is empty when ok, else one short phrase (it ends up in the quarantine table).
    """
    if not data:
        return False, "empty image data"
    if len(data) > max_bytes:
        return False, f"image too large: {len(data)} bytes > max_image_bytes {max_bytes}"
    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if width * height > max_pixels:
                return False, f"image too large: {width}x{height} pixels > max_image_pixels {max_pixels}"
            if width == 0 or height == 0:
                return False, f"image has no pixels ({width}x{height})"
            img.load()
    except UnidentifiedImageError:
        return False, "not a decodable image (unknown format)"
    except Image.DecompressionBombError as exc:
        return False, f"image too large: {exc}"
    except (OSError, SyntaxError, ValueError) as exc:  # PIL raises these for truncated or corrupt data
        return False, f"not a decodable image ({exc})"
    return True, ""


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded bytes into an RGB PIL image (what every processor here expects).

    Palette, grey, CMYK and alpha images are converted to plain RGB; EXIF orientation is not applied, matching
    what the HF processors and vLLM do with the same bytes.
    """
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")


def to_model_image(image: Image.Image, aspect: str, background: tuple[int, int, int]) -> Image.Image:
    """The picture the vision tower is shown, before the processor's resize and centre crop.

    `pad` is LLaVA-1.5's `image_aspect_ratio pad` (`expand2square` in llava/mm_utils.py, line for line):
    the image centred on a square of the processor's mean colour, so the crop that follows cuts nothing
    and a wide photo keeps its edges, as LLaVA-1.5 was trained and evaluated. `crop` leaves the image to
    the processor as shipped (short side resized, centre cropped). A square image is the same either way.
    Every engine calls this on the decoded image (`model.image_aspect`), so they all see the same pixels.
    """
    if aspect == "crop":
        return image
    if aspect != "pad":
        raise ValueError(f"image aspect must be 'pad' or 'crop', got {aspect!r}")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def mean_colour(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """The pad colour of a processor's `image_mean`, truncated as LLaVA truncates it (`int(x*255)`), so a
    padded border normalises to (about) zero, the tower's "nothing here"."""
    return tuple(int(x * 255) for x in image_mean)  # type: ignore[return-value]


def processor_background(processor: Any) -> tuple[int, int, int]:
    """The pad colour of a loaded processor (a multimodal processor or its image processor)."""
    return mean_colour(getattr(processor, "image_processor", processor).image_mean)


def checkpoint_background(model_dir: str) -> tuple[int, int, int]:
    """The pad colour of the checkpoint in `model_dir` (a local path or URI), from its processor files,
    without loading the processor or copying the checkpoint: for the places that hand images to a vLLM
    engine, which holds the processor itself. transformers 5 nests the image processor's settings in
    `processor_config.json`; older saves (llava-hf's) keep them in `preprocessor_config.json`."""
    for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        uri = dio.join(model_dir, name)
        if dio.exists(uri):
            found = json.loads(dio.read_bytes(uri))
            found = found.get(key, {}) if key else found
            if "image_mean" in found:
                return mean_colour(found["image_mean"])
    raise FileNotFoundError(f"{model_dir}: no image processor settings (image_mean) in its processor files")


def _check_row(row: dict[str, Any], storage: str, max_bytes: int, max_pixels: int) -> str:
    """Load + validate one row's image in place; return the reason it is bad, or ''."""
    if not has_image(row):
        return ""  # a text-only item: nothing to check (its loader decided it may have no image)
    field_name = IMAGE if row[IMAGE] is not None else IMAGE_PATH
    try:
        data = load_image_bytes(row)
    except FileNotFoundError:
        row[IMAGE] = None
        return f"field '{IMAGE_PATH}': image file not found ({row[IMAGE_PATH]})"
    except (OSError, ValueError) as exc:
        row[IMAGE] = None
        return f"field '{field_name}': cannot read image ({exc})"
    ok, why = validate_image(data, max_bytes, max_pixels)
    if not ok:
        row[IMAGE] = None  # bad rows travel light: only their key and reason are kept
        return f"field '{field_name}': {why}"
    keep_bytes = storage == "bytes" or not row[IMAGE_PATH]
    row[IMAGE] = data if keep_bytes else None
    return ""


def check_images(batch: pa.Table, storage: str, max_bytes: int, max_pixels: int) -> pa.Table:
    """Ray Data UDF: ITEMS rows in, ITEMS rows + `reason` out (row order and count unchanged)."""
    rows = batch.to_pylist()
    reasons = [_check_row(row, storage, max_bytes, max_pixels) or None for row in rows]
    for row, reason in zip(rows, reasons, strict=True):
        row[REASON] = reason
    return pa.Table.from_pylist(rows, schema=CHECKED)
