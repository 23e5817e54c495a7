"""Procedural captioned shapes: the training corpus of the built-in demo model.

Each image is one circle, square or triangle in a named colour on a contrasting named
background, at a random size and position, captioned "a red circle on a blue background".
An image is a function of (seed, index) alone, so a corpus is the same however it is
split into parts, and a configurable set of (colour, shape) combinations never appears
in the training split: the demo model is scored on them separately (see ``adherence``).

The corpus is written as a Parquet image table (``schemas.SHAPES_CORPUS_SCHEMA``: PNG
bytes in ``image``, ``caption``, ``id``), the input format of ``latentray encode``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from PIL import Image, ImageDraw

from pipelines.generation.images import encode_image
from pipelines.runtime import io
from pipelines.runtime.schemas import SHAPES_CORPUS_SCHEMA

# Named colours (sRGB). Hues are far enough apart that the nearest palette colour names
# a jittered or slightly blurred pixel unambiguously (the closest pair is ~80 apart,
# more than twice the largest jitter).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 220, 50),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# A shape is drawn only on backgrounds at least this far from its colour (RGB distance):
# it excludes red/orange, orange/yellow and blue/purple, which blur into each other.
MIN_CONTRAST = 150.0
# Not in the demo prompts of `latentray demo`, one per shape, three different colours.
DEFAULT_HELD_OUT: tuple[tuple[str, str], ...] = (("green", "circle"), ("orange", "square"), ("blue", "triangle"))
SPLITS = ("train", "held_out", "all")
SUPERSAMPLING = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased, deterministic edges
MARGIN = 2  # pixels between a shape and the image border (the analyser reads the background there)


@dataclass(frozen=True, kw_only=True)
class Scene:
    """What one image shows, and where."""

    color: str
    shape: str
    background: str
    left: int
    top: int
    size: int  # side of the shape's square bounding box, pixels
    color_rgb: tuple[int, int, int]  # the palette colour after this image's jitter
    background_rgb: tuple[int, int, int]

    @property
    def caption(self) -> str:
        return caption_for(self.color, self.shape, self.background)


@dataclass(frozen=True, kw_only=True)
class ShapesCorpusConfig:
    """A procedural corpus: ``count`` images drawn from ``seed``."""

    count: int
    seed: int = 0
    split: str = "train"  # train: no held-out combination; held_out: only them; all: everything
    held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT  # (colour, shape) pairs kept out of training
    image_size: int = 64
    min_size: int = 16  # shape bounding-box side, pixels
    max_size: int = 44
    color_jitter: int = 12  # each channel of both colours moves by up to this much per image
    rows_per_part: int = 1000

    def __post_init__(self) -> None:
        object.__setattr__(self, "held_out", tuple(tuple(pair) for pair in self.held_out))
        for name in ("count", "rows_per_part"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed: must be between 0 and 2**63-1, got {self.seed}")
        if self.split not in SPLITS:
            raise ValueError(f"split: must be one of {', '.join(SPLITS)}, got {self.split!r}")
        for color, shape in self.held_out:
            if color not in PALETTE or shape not in SHAPES:
                raise ValueError(f"held_out: ({color!r}, {shape!r}) is not a (colour, shape) pair; colours are "
                                 f"{', '.join(PALETTE)}, shapes {', '.join(SHAPES)}")
        if self.split == "held_out" and not self.held_out:
            raise ValueError("held_out: the held_out split needs at least one held-out combination")
        if self.image_size < 16 or self.image_size % 8:
            raise ValueError(f"image_size: must be a multiple of 8, at least 16, got {self.image_size}")
        if not 4 <= self.min_size <= self.max_size <= self.image_size - 2 * MARGIN:
            raise ValueError(f"min_size, max_size: need 4 <= min_size <= max_size <= {self.image_size - 2 * MARGIN}, "
                             f"got {self.min_size}, {self.max_size}")
        if not 0 <= self.color_jitter <= 30:
            raise ValueError(f"color_jitter: must be between 0 and 30, got {self.color_jitter}")
        if not self.combinations():
            raise ValueError(f"held_out: leaves the {self.split} split no combination to draw")

    def combinations(self) -> list[tuple[str, str, str]]:
        """The (colour, shape, background) triples this corpus draws from, in a fixed order."""
        held_out = set(self.held_out)
        keep = {"train": lambda pair: pair not in held_out, "held_out": lambda pair: pair in held_out, "all": lambda pair: True}[self.split]
        return [(color, shape, background) for color, shape, background in all_combinations() if keep((color, shape))]


def all_combinations() -> list[tuple[str, str, str]]:
    """Every drawable (colour, shape, background): background differs from and contrasts with the colour."""
    return [
        (color, shape, background)
        for color in PALETTE for shape in SHAPES for background in PALETTE
        if background != color and math.dist(PALETTE[color], PALETTE[background]) >= MIN_CONTRAST
    ]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_for(color: str, shape: str, background: str) -> str:
    return f"{article(color)} {color} {shape} on {article(background)} {background} background"


CAPTION_PATTERN = re.compile(r"^\s*an?\s+(\w+)\s+(\w+)\s+on\s+an?\s+(\w+)\s+background\s*$", re.IGNORECASE)


def parse_caption(text: str) -> tuple[str, str, str] | None:
    """"a red circle on a blue background" -> ("red", "circle", "blue"); None for any other text."""
    match = CAPTION_PATTERN.match(text or "")
    if not match:
        return None
    color, shape, background = (word.lower() for word in match.groups())
    if color not in PALETTE or shape not in SHAPES or background not in PALETTE:
        return None
    return color, shape, background


def caption_words() -> list[str]:
    """Every word a caption can hold: the demo model's tokenizer gives each one token."""
    return sorted({word for color, shape, background in all_combinations() for word in caption_for(color, shape, background).split()})


# -- drawing --------------------------------------------------------------------------------------


def sample_scene(config: ShapesCorpusConfig, index: int, combinations: list[tuple[str, str, str]]) -> Scene:
    """Image ``index`` of the corpus: its own generator, seeded by (seed, index), so no image depends on another."""
    rng = np.random.default_rng([config.seed, index])
    color, shape, background = combinations[int(rng.integers(len(combinations)))]
    size = int(rng.integers(config.min_size, config.max_size + 1))
    left = int(rng.integers(MARGIN, config.image_size - MARGIN - size + 1))
    top = int(rng.integers(MARGIN, config.image_size - MARGIN - size + 1))
    return Scene(
        color=color, shape=shape, background=background, left=left, top=top, size=size,
        color_rgb=_jitter(PALETTE[color], rng, config.color_jitter),
        background_rgb=_jitter(PALETTE[background], rng, config.color_jitter),
    )


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, amount: int) -> tuple[int, int, int]:
    moved = np.asarray(rgb) + rng.integers(-amount, amount + 1, size=3)
    return tuple(int(v) for v in np.clip(moved, 0, 255))


def draw_scene(scene: Scene, image_size: int) -> np.ndarray:
    """uint8 (image_size, image_size, 3) pixels of a scene, anti-aliased."""
    scale = SUPERSAMPLING
    canvas = Image.new("RGB", (image_size * scale, image_size * scale), scene.background_rgb)
    draw = ImageDraw.Draw(canvas)
    # Pillow's boxes include their last pixel: the shape covers [left, left + size) exactly
    x0, y0 = scene.left * scale, scene.top * scale
    x1, y1 = (scene.left + scene.size) * scale - 1, (scene.top + scene.size) * scale - 1
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=scene.color_rgb)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=scene.color_rgb)
    else:  # an upright isosceles triangle filling its square box: base at the bottom, apex at the top middle
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=scene.color_rgb)
    return np.array(canvas.reduce(scale), dtype=np.uint8)


# -- the corpus table -----------------------------------------------------------------------------


def corpus_rows(config: ShapesCorpusConfig, start: int, stop: int) -> pa.Table:
    """Rows ``start`` to ``stop`` of a corpus as a table of ``SHAPES_CORPUS_SCHEMA``."""
    combinations = config.combinations()
    scenes = [sample_scene(config, index, combinations) for index in range(start, stop)]
    columns = {
        "id": [f"{config.split}-{index:06d}" for index in range(start, stop)],
        "image": [encode_image(draw_scene(scene, config.image_size), "png", 95) for scene in scenes],
        "caption": [scene.caption for scene in scenes],
        "color": [scene.color for scene in scenes],
        "shape": [scene.shape for scene in scenes],
        "background": [scene.background for scene in scenes],
        "left": [scene.left for scene in scenes],
        "top": [scene.top for scene in scenes],
        "size": [scene.size for scene in scenes],
    }
    return pa.Table.from_pydict(columns, schema=SHAPES_CORPUS_SCHEMA)


def part_ranges(config: ShapesCorpusConfig) -> Iterator[tuple[int, int]]:
    for start in range(0, config.count, config.rows_per_part):
        yield start, min(start + config.rows_per_part, config.count)


def write_corpus(config: ShapesCorpusConfig, folder_uri: str) -> list[str]:
    """Write the corpus as Parquet parts under ``folder_uri`` (any fsspec URI); returns their URIs.

    Part names derive from the positions and ids of their rows, so writing the same corpus
    again replaces the same objects.
    """
    uris = []
    for start, stop in part_ranges(config):
        table = corpus_rows(config, start, stop)
        uris.append(io.join(folder_uri, io.part_name(np.arange(start, stop), table.column("id").to_pylist())))
        io.write_parquet(table, uris[-1])
    return uris


# -- prompts for scoring a model ------------------------------------------------------------------


def evaluation_prompts(held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT, per_combination: int = 4) -> pa.Table:
    """A prompt table (input of ``latentray generate``): ``per_combination`` rows per (colour, shape).

    Backgrounds cycle through the ones each colour may be drawn on, so seen and
    held-out combinations are asked for on the same variety of backgrounds. Extra
    columns (``color``, ``shape``, ``background``, ``held_out``) say what each row asks for.
    """
    if per_combination < 1:
        raise ValueError(f"per_combination: must be >= 1, got {per_combination}")
    held_out_pairs = {tuple(pair) for pair in held_out}
    rows = []
    for color in PALETTE:
        backgrounds = [background for c, s, background in all_combinations() if c == color and s == SHAPES[0]]
        for shape in SHAPES:
            for repeat in range(per_combination):
                background = backgrounds[repeat % len(backgrounds)]
                rows.append({
                    "id": f"{color}-{shape}-{repeat:02d}", "prompt": caption_for(color, shape, background),
                    "color": color, "shape": shape, "background": background,
                    "held_out": (color, shape) in held_out_pairs,
                })
    return pa.Table.from_pylist(rows)
