"""ShapesWorld scenes: the scene graph (objects with shape, colour, size, grid cell) and its rendering.

Why apart from `shapes.py`: a scene knows nothing about questions, names or splits; `shapes.py` asks and
answers questions about scenes and builds the splits. Every image is drawn from its scene graph, so the
questions' gold answers (computed from the graph) are correct by construction.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "diamond")
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout, so "left of" is never ambiguous


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    large: bool
    cell: tuple[int, int]  # (row, col) in the grid


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: tuple[int, int, int]

    def with_shape(self, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.shape == shape]

    def with_colour(self, colour: str) -> list[Obj]:
        return [o for o in self.objects if o.colour == colour]

    def find(self, colour: str, shape: str) -> list[Obj]:
        return [o for o in self.objects if o.colour == colour and o.shape == shape]


@dataclass(frozen=True)
class SceneStyle:
    """Scene statistics of a split: OOD-scene changes these, never the question semantics."""

    min_objects: int = 1
    max_objects: int = 3  # few objects per scene: a tiny LM learns single lookups within minutes
    large_fraction: float = 0.5
    background: tuple[int, int, int] = (245, 245, 245)


ID_STYLE = SceneStyle()
OOD_STYLE = SceneStyle(min_objects=4, max_objects=6, large_fraction=0.0, background=(200, 200, 185))


def sample_scene(rng: np.random.Generator, style: SceneStyle) -> Scene:
    n = int(rng.integers(style.min_objects, style.max_objects + 1))
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    chosen = rng.choice(len(cells), size=n, replace=False)
    colours, shapes = list(COLOURS), list(SHAPES)
    objs = tuple(
        Obj(
            shape=shapes[int(rng.integers(len(shapes)))],
            colour=colours[int(rng.integers(len(colours)))],
            large=bool(rng.random() < style.large_fraction),
            cell=cells[int(i)],
        )
        for i in chosen
    )
    return Scene(objects=objs, background=style.background)


def render(scene: Scene, size: int) -> bytes:
    """Draw the scene as PNG bytes at the model's input resolution (no resampling blur later)."""
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    cell = size / GRID
    for o in scene.objects:
        cy, cx = (o.cell[0] + 0.5) * cell, (o.cell[1] + 0.5) * cell
        r = cell * (0.42 if o.large else 0.30)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse(box, fill=fill)
        elif o.shape == "square":
            draw.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fill)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
