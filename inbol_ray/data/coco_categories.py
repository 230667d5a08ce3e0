"""COCO's 80 object categories, the referent words that name them, and a streaming reader of instance files.

Why: on COCO images (VQAv2's, A-OKVQA's) an object that none of an image's ~5 questions mentions is still
often there, so the mismatch recipe's text-only evidence (`inbol_ray.data.mismatch`) is weak for common
things. COCO's instance annotations are strong evidence: its annotators boxed every instance of the 80
categories, so an image with no `dog` box shows no dog. With `DatasetSpec.instances` set, a question whose
referent names a category only goes onto an image of that data set with no box of it.

The category list (ids 1..90 with gaps, 80 names) is the `categories` field of COCO's
`instances_train2014.json` / `instances_val2017.json` (cocodataset.org; the 2014 and 2017 releases share it),
as also listed by facebookresearch/detectron2 `detectron2/data/datasets/builtin_meta.py` (`COCO_CATEGORIES`,
entries with `isthing: 1`).

Which words map (`WORDS`): each category's own name (multi-word names need all their words among the
referent's, "hot dog" <- {hot, dog}) plus synonyms and irregular plurals, only where *every* thing the word
names would be boxed under that category: "man" -> person and "puppy" -> dog, but not "table" (a coffee
table is no `dining table`), "phone" (a landline is no `cell phone`), "glove" (a ski glove is no `baseball
glove`), "plant" (a tree is no `potted plant`), "keyboard" (a piano's is no computer keyboard) or "light".
A word that maps wrongly would make an image look free of something it shows; a word left out only falls
back to the text rule. Plurals: each word's regular or irregular plural form (`plural`), matched exactly.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from inbol_ray.data import io as dio
from inbol_ray.data.loaders.common import DataFormatError

CATEGORIES: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus", 7: "train", 8: "truck",
    9: "boat", 10: "traffic light", 11: "fire hydrant", 13: "stop sign", 14: "parking meter", 15: "bench",
    16: "bird", 17: "cat", 18: "dog", 19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear",
    24: "zebra", 25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie", 33: "suitcase",
    34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball", 38: "kite", 39: "baseball bat",
    40: "baseball glove", 41: "skateboard", 42: "surfboard", 43: "tennis racket", 44: "bottle",
    46: "wine glass", 47: "cup", 48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog", 59: "pizza", 60: "donut",
    61: "cake", 62: "chair", 63: "couch", 64: "potted plant", 65: "bed", 67: "dining table", 70: "toilet",
    72: "tv", 73: "laptop", 74: "mouse", 75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave",
    79: "oven", 80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}  # fmt: skip
"""COCO category id -> name (the instance files' `categories`)."""

_BY_NAME = {name: cid for cid, name in CATEGORIES.items()}
# Category names whose word alone names other things too: they map only through synonyms or all their words.
_AMBIGUOUS_NAMES = {"keyboard"}
# Synonyms and irregular plurals: word -> category names (several: the word may name any of them).
_SYNONYMS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ["people", "man", "men", "woman", "women", "boy", "girl", "child", "children", "kid", "guy",
         "lady", "ladies", "baby", "babies", "toddler", "player", "skier", "surfer", "skateboarder",
         "snowboarder", "batter", "catcher", "umpire", "pedestrian", "persons"],
        ("person",),
    ),
    "bike": ("bicycle", "motorcycle"), "bikes": ("bicycle", "motorcycle"), "motorbike": ("motorcycle",),
    "taxi": ("car",), "plane": ("airplane",), "aeroplane": ("airplane",), "jet": ("airplane",),
    "airliner": ("airplane",), "aircraft": ("airplane",), "locomotive": ("train",), "lorry": ("truck",),
    "ship": ("boat",), "sailboat": ("boat",), "canoe": ("boat",), "kayak": ("boat",), "yacht": ("boat",),
    "stoplight": ("traffic light",), "hydrant": ("fire hydrant",),
    "pigeon": ("bird",), "seagull": ("bird",), "gull": ("bird",), "duck": ("bird",), "goose": ("bird",),
    "geese": ("bird",), "parrot": ("bird",), "swan": ("bird",), "owl": ("bird",),
    "kitten": ("cat",), "kitty": ("cat",), "puppy": ("dog",), "pup": ("dog",), "pony": ("horse",),
    "foal": ("horse",), "lamb": ("sheep",), "cattle": ("cow",), "bull": ("cow",), "calf": ("cow",),
    "calves": ("cow",), "rucksack": ("backpack",), "parasol": ("umbrella",), "purse": ("handbag",),
    "necktie": ("tie",), "luggage": ("suitcase",), "ski": ("skis",), "ball": ("sports ball",),
    "bat": ("baseball bat",), "mitt": ("baseball glove",), "racket": ("tennis racket",),
    "racquet": ("tennis racket",), "mug": ("cup",), "hotdog": ("hot dog",), "doughnut": ("donut",),
    "cupcake": ("cake",), "sofa": ("couch",), "houseplant": ("potted plant",), "television": ("tv",),
    "fridge": ("refrigerator",), "cellphone": ("cell phone",), "smartphone": ("cell phone",),
    "iphone": ("cell phone",), "teddy": ("teddy bear",), "hairdryer": ("hair drier",),
}  # fmt: skip

_IRREGULAR = {"knife": "knives", "mouse": "mice", "calf": "calves", "man": "men", "woman": "women",
              "child": "children", "goose": "geese", "person": "people", "sheep": "sheep", "skis": "skis",
              "scissors": "scissors", "cattle": "cattle", "people": "people", "men": "men", "women": "women",
              "children": "children", "geese": "geese", "calves": "calves", "luggage": "luggage"}  # fmt: skip


def plural(word: str) -> str:
    """The plural English forms a noun takes ("bus" -> buses, "pony" -> ponies, "knife" -> knives)."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in ("a", "e", "i", "o", "u"):
        return word[:-1] + "ies"
    return word + "s"


WORDS: dict[str, frozenset[int]] = {}
"""Referent word (singular or plural) -> the category ids it names: a one-word name, a synonym, an
irregular plural. Exact words only: a general de-pluraliser would map "skies" to skis."""
PHRASES: list[tuple[frozenset[str], frozenset[str], int]] = []
"""Multi-word category names ("hot dog"): (words but the last, the last word's singular and plural forms,
id); matched when all are among the referent's words."""


def _add_word(word: str, cid: int) -> None:
    for form in (word, plural(word)):
        WORDS[form] = WORDS.get(form, frozenset()) | {cid}


def _add_phrase(name: str, cid: int) -> None:
    *first, last = name.split()
    PHRASES.append((frozenset(first), frozenset({last, plural(last)}), cid))


for _cid, _name in CATEGORIES.items():
    if " " in _name:
        _add_phrase(_name, _cid)
    elif _name not in _AMBIGUOUS_NAMES:
        _add_word(_name, _cid)
for _word, _names in _SYNONYMS.items():
    for _n in _names:
        _add_word(_word, _BY_NAME[_n])
for _phrase, _n in (("hair dryer", "hair drier"), ("mobile phone", "cell phone"),
                    ("computer keyboard", "keyboard")):  # fmt: skip
    _add_phrase(_phrase, _BY_NAME[_n])


def categories_of(terms: Iterable[str]) -> tuple[frozenset[int], frozenset[str]]:
    """(category ids the referent words name, the referent words that name none).

    A multi-word name counts when all its words are among `terms` ("hot dog" <- {hot, dogs}); its words
    then count as mapped.
    """
    terms = frozenset(terms)
    cats: set[int] = set()
    mapped: set[str] = set()
    for t in terms:
        if t in WORDS:
            cats |= WORDS[t]
            mapped.add(t)
    for first, last, cid in PHRASES:
        if first <= terms and last & terms:
            cats.add(cid)
            mapped |= first | (last & terms)
    return frozenset(cats), terms - mapped


_COCO_FILE = re.compile(r"^(?:COCO_[A-Za-z0-9]+_)?(\d+)\.(?:jpe?g|png)$", re.IGNORECASE)


def image_id_from_path(path: str | None) -> int | None:
    """COCO image id from a file name: `COCO_train2014_000000123456.jpg` (2014) or `000000123456.jpg`
    (2017) -> 123456; None for any other name."""
    if not path:
        return None
    match = _COCO_FILE.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


# --- instance annotations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CocoInstances:
    """Which categories each image of an instance file has a box of: image ids (sorted) and a 128-bit mask
    per image as two uint64 words (bit c set: a box of category c; COCO ids are < 128).

    Memory: 24 bytes per image (instances_train2014.json: 82,783 images -> ~2 MB). Images in the file
    with no annotation at all have an empty mask; images not in the file are `None` (no evidence).
    """

    ids: np.ndarray
    low: np.ndarray
    high: np.ndarray
    uri: str = ""

    def categories(self, image_id: int | None) -> frozenset[int] | None:
        """Category ids with a box on the image; None when the image is not in the file."""
        if image_id is None or not len(self.ids):
            return None
        i = int(np.searchsorted(self.ids, image_id))
        if i == len(self.ids) or int(self.ids[i]) != image_id:
            return None
        lo, hi = int(self.low[i]), int(self.high[i])
        return frozenset(c for c in range(128) if (lo if c < 64 else hi) >> (c % 64) & 1)


def read_instances(uri: str, chunk_bytes: int = 1 << 20) -> CocoInstances:
    """Read a COCO instance file (`instances_<split>.json`, ~450 MB for train2014) keeping only image id ->
    categories boxed.

    Streaming: the file is decoded one array element at a time (`iter_top_level`), so the peak is the read
    buffer (`chunk_bytes`, plus the largest single annotation) and the result, never the parsed file (which
    `json.load` would hold as several GB of Python objects). train2014: ~2 MB of result, ~20 MB of
    transient dict while reading (one entry per annotated image).
    """
    images: list[int] = []
    masks: dict[int, int] = {}
    for key, element in iter_top_level(uri, {"images", "annotations"}, chunk_bytes):
        if not isinstance(element, dict):
            continue
        if key == "images" and "id" in element:
            images.append(int(element["id"]))
        elif key == "annotations" and "image_id" in element and "category_id" in element:
            image, category = int(element["image_id"]), int(element["category_id"])
            if not 0 <= category < 128:
                raise DataFormatError(f"{uri}: category_id {category} outside COCO's 1..90")
            masks[image] = masks.get(image, 0) | (1 << category)
    ids = np.unique(np.array(images + list(masks), dtype=np.int64))
    full = [masks.get(int(i), 0) for i in ids]
    low = np.array([m & (2**64 - 1) for m in full], dtype=np.uint64)
    high = np.array([m >> 64 for m in full], dtype=np.uint64)
    return CocoInstances(ids, low, high, uri)


def write_instances(
    uri: str,
    image_ids: Iterable[int],
    boxes: Mapping[int, Iterable[int]] | None = None,
    split: str = "train2014",
) -> str:
    """A minimal COCO instance file: `images` (id, file name `COCO_<split>_<id:012d>.jpg`), one whole-image
    box per (image, category) in `boxes`, and the 80 `categories`. For exports whose pictures hold no COCO
    object (ShapesWorld: `boxes` empty, so every category is absent, which is true), so the instances path
    of a config runs end to end. Returns `uri`."""
    boxes = boxes or {}
    images = [{"id": int(i), "file_name": f"COCO_{split}_{int(i):012d}.jpg"} for i in image_ids]
    annotations = [
        {"id": n, "image_id": int(i), "category_id": int(c), "bbox": [0, 0, 1, 1], "area": 1, "iscrowd": 0}
        for n, (i, c) in enumerate(((i, c) for i, cats in sorted(boxes.items()) for c in sorted(cats)), 1)
    ]
    categories = [{"id": cid, "name": name} for cid, name in CATEGORIES.items()]
    body = {"info": {"description": "written by inbol_ray"}, "images": images, "annotations": annotations,
            "categories": categories}  # fmt: skip
    dio.write_bytes(uri, json.dumps(body).encode())
    return uri


class _Reader:
    """A text buffer over a byte stream that `json.JSONDecoder.raw_decode` parses from, refilled on demand."""

    def __init__(self, stream: Any, chunk_bytes: int) -> None:
        self.stream, self.chunk = stream, chunk_bytes
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.json = json.JSONDecoder()

    def more(self) -> bool:
        if self.eof:
            return False
        data = self.stream.read(self.chunk)
        self.eof = not data
        self.buf = self.buf[self.pos :] + self.decoder.decode(data, final=self.eof)
        self.pos = 0
        return True

    def peek(self) -> str:
        """The next non-space character ('' at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf) or not self.more():
                return self.buf[self.pos : self.pos + 1]

    def expect(self, char: str, uri: str) -> None:
        if self.peek() != char:
            raise DataFormatError(f"{uri}: expected {char!r} at a top-level position, found {self.peek()!r}")
        self.pos += 1

    def value(self, uri: str) -> Any:
        """One JSON value; a number that ends the buffer is re-read with more text (it may go on)."""
        self.peek()
        while True:
            try:
                value, end = self.json.raw_decode(self.buf, self.pos)
                if end < len(self.buf) or self.eof:
                    self.pos = end
                    return value
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise DataFormatError(f"{uri}: not valid JSON ({exc})") from exc
            self.more()


def iter_top_level(uri: str, arrays: set[str], chunk_bytes: int = 1 << 20) -> Iterator[tuple[str, Any]]:
    """(key, element) for each element of the top-level object's arrays named in `arrays`, in file order;
    every other value is skipped (arrays also an element at a time), so memory is one element plus the
    buffer."""
    fs, path = dio.resolve(uri)
    with fs.open_input_stream(path) as stream:
        r = _Reader(stream, chunk_bytes)
        r.expect("{", uri)
        if r.peek() == "}":
            return
        while True:
            key = r.value(uri)
            r.expect(":", uri)
            if r.peek() == "[":
                r.pos += 1
                if r.peek() == "]":
                    r.pos += 1
                else:
                    while True:
                        element = r.value(uri)
                        if key in arrays:
                            yield key, element
                        if r.peek() == "]":
                            r.pos += 1
                            break
                        r.expect(",", uri)
            else:
                r.value(uri)
            if r.peek() == "}":
                return
            r.expect(",", uri)
