"""Does a generated image show what its prompt asked for? A deterministic analyser, no model.

    image -> background (the colour of the border) -> foreground mask (pixels far from it)
          -> largest connected blob -> colour (majority of its pixels' nearest palette names)
          -> shape (fill ratio and corner occupancy of its bounding box, nearest prototype)

It reads images of the procedural corpus (``pipelines.demo.procedural``) near perfectly and
refuses noise: a border that is not one colour, or no single compact blob, reads as
nothing (``None``) with a reason. ``score_generation`` applies it to a generation
output whose prompts are captions of that corpus ("a red circle on a blue background")
and reports the share of images whose colour and shape match, for combinations seen in
training and for held-out ones separately.
"""

from __future__ import annotations

import io as bytes_io
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from pipelines.demo.procedural import DEFAULT_HELD_OUT, PALETTE, parse_caption
from pipelines.runtime import io
from pipelines.runtime.schemas import ADHERENCE_SCHEMA

PALETTE_NAMES = list(PALETTE)
PALETTE_RGB = np.array([PALETTE[name] for name in PALETTE_NAMES], dtype=np.float64)

BORDER = 2  # pixels of the border ring the background colour is read from
UNIFORM_BORDER_SHARE = 0.7  # of border pixels near the border's median colour, or there is no background
# A pixel belongs to the foreground when it is this far (RGB distance) from the background:
# less than half the smallest colour/background contrast the corpus draws (150), so an
# anti-aliased edge pixel counts when it is mostly shape.
FOREGROUND_DISTANCE = 60.0
MIN_BLOB_SHARE = 0.004  # of the image (16 pixels at 64x64): smaller is no shape
MAX_BLOB_SHARE = 0.9  # larger is a background change, not a shape (the largest corpus square covers 0.88)
MIN_BLOB_OF_FOREGROUND = 0.8  # the largest blob must hold most foreground pixels: one shape, not speckle
MAX_ASPECT = 1.6  # every corpus shape fills a square box; a long thin blob is none of them

# Ideal (fill ratio, top-corner occupancy, bottom-corner occupancy) of each shape in its
# bounding box; a corner is the box's corner square of a quarter side. Circle: pi/4 and
# 0.314 per corner; upright triangle: 1/2, empty top corners, 3/4 full bottom corners.
SHAPE_PROTOTYPES = {
    "square": [(1.0, 1.0, 1.0)],
    "circle": [(0.785, 0.314, 0.314)],
    "triangle": [(0.5, 0.0, 0.75), (0.5, 0.75, 0.0)],  # upright, and upside down
}
# farther from every prototype: no recognisable shape (0.5 still reads a square whose
# corners a 1.5-pixel blur has rounded as a square)
MAX_PROTOTYPE_DISTANCE = 0.5


@dataclass(frozen=True)
class Reading:
    """What the analyser found in one image; ``None`` where it found nothing, ``reason`` says why."""

    color: str | None
    shape: str | None
    background: str | None
    blob_share: float = 0.0  # of the image covered by the shape
    fill_ratio: float = 0.0  # of its bounding box
    reason: str = ""


def nearest_palette_names(pixels: np.ndarray) -> np.ndarray:
    """(..., 3) RGB -> (...) palette colour names."""
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float64) - PALETTE_RGB, axis=-1)
    return np.array(PALETTE_NAMES)[distances.argmin(-1)]


def analyse_image(pixels: np.ndarray) -> Reading:
    """uint8 (height, width, 3) RGB -> the shape's colour and class, and the background colour."""
    pixels = np.asarray(pixels, dtype=np.float64)[..., :3]

    # 1. the background: the colour most of the border ring agrees on
    ring = _border_ring(pixels)
    background_rgb = np.median(ring, axis=0)
    if (np.linalg.norm(ring - background_rgb, axis=1) < FOREGROUND_DISTANCE).mean() < UNIFORM_BORDER_SHARE:
        return Reading(None, None, None, reason="the border is not one colour: no background")
    background = str(nearest_palette_names(background_rgb))

    # 2. the shape: the largest blob of pixels far from the background
    foreground = np.linalg.norm(pixels - background_rgb, axis=-1) > FOREGROUND_DISTANCE
    blob = largest_blob(foreground)
    blob_pixels = int(blob.sum())
    share = blob_pixels / blob.size
    if share < MIN_BLOB_SHARE:
        return Reading(None, None, background, blob_share=share, reason="no foreground shape")
    if share > MAX_BLOB_SHARE or blob_pixels < MIN_BLOB_OF_FOREGROUND * foreground.sum():
        return Reading(None, None, background, blob_share=share, reason="the foreground is not one compact shape")

    # 3. its colour: the palette name most of its pixels are nearest to (edge blends with the
    # background vote for the background's name, so that name is left out)
    names = Counter(nearest_palette_names(pixels[blob]).tolist())
    names.pop(background, None)
    color = names.most_common(1)[0][0] if names else background

    # 4. its class
    shape, fill, reason = classify_blob(blob)
    return Reading(color, shape, background, blob_share=share, fill_ratio=fill, reason=reason)


def _border_ring(pixels: np.ndarray) -> np.ndarray:
    inner = np.ones(pixels.shape[:2], dtype=bool)
    inner[BORDER:-BORDER, BORDER:-BORDER] = False
    return pixels[inner]


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of a boolean mask (first found wins a tie)."""
    seen = np.zeros_like(mask, dtype=bool)
    best: list[tuple[int, int]] = []
    height, width = mask.shape
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        region, queue = [], deque([start])
        while queue:
            y, x = queue.popleft()
            region.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(region) > len(best):
            best = region
    blob = np.zeros_like(mask, dtype=bool)
    if best:
        rows, columns = zip(*best)
        blob[list(rows), list(columns)] = True
    return blob


def shape_features(blob: np.ndarray) -> tuple[float, float, float, float]:
    """(fill ratio, top-corner occupancy, bottom-corner occupancy, aspect ratio) of a blob's bounding box."""
    rows, columns = np.nonzero(blob)
    box = blob[rows.min(): rows.max() + 1, columns.min(): columns.max() + 1]
    height, width = box.shape
    corner_h, corner_w = max(1, round(height / 4)), max(1, round(width / 4))
    top = (box[:corner_h, :corner_w].mean() + box[:corner_h, -corner_w:].mean()) / 2
    bottom = (box[-corner_h:, :corner_w].mean() + box[-corner_h:, -corner_w:].mean()) / 2
    return float(box.mean()), float(top), float(bottom), max(height, width) / min(height, width)


def classify_blob(blob: np.ndarray) -> tuple[str | None, float, str]:
    """(shape name or None, fill ratio, reason): the prototype nearest to the blob's features."""
    fill, top, bottom, aspect = shape_features(blob)
    if aspect > MAX_ASPECT:
        return None, fill, f"the shape is {aspect:.1f} times longer than wide"
    distances = {
        name: min(float(np.linalg.norm(np.subtract((fill, top, bottom), prototype))) for prototype in prototypes)
        for name, prototypes in SHAPE_PROTOTYPES.items()
    }
    shape = min(distances, key=distances.get)
    if distances[shape] > MAX_PROTOTYPE_DISTANCE:
        return None, fill, f"no shape class fits (fill {fill:.2f}, corners {top:.2f}/{bottom:.2f})"
    return shape, fill, ""


def analyse_png(data: bytes) -> Reading:
    return analyse_image(np.asarray(Image.open(bytes_io.BytesIO(data)).convert("RGB")))


# -- scoring a generation run ---------------------------------------------------------------------


def score_rows(rows: list[dict], held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT) -> pa.Table:
    """Rows of ``id``, ``prompt`` and ``pixels`` (uint8 HxWx3) -> one ``ADHERENCE_SCHEMA`` row each.

    Rows whose prompt is not a corpus caption are left out: there is nothing to check them against.
    """
    held_out_pairs = {tuple(pair) for pair in held_out}
    scored = []
    for row in rows:
        expected = parse_caption(row["prompt"])
        if expected is None:
            continue
        color, shape, background = expected
        reading = analyse_image(row["pixels"])
        scored.append({
            "id": str(row["id"]), "prompt": row["prompt"], "held_out": (color, shape) in held_out_pairs,
            "expected_color": color, "expected_shape": shape, "expected_background": background,
            "found_color": reading.color, "found_shape": reading.shape, "found_background": reading.background,
            "color_match": reading.color == color, "shape_match": reading.shape == shape,
            "background_match": reading.background == background, "reason": reading.reason,
        })
    return pa.Table.from_pylist(scored, schema=ADHERENCE_SCHEMA)


def summarize(scored: pa.Table) -> dict:
    """Shares of matching colour, shape, both and background: over all rows, seen and held-out combinations."""
    rows = scored.to_pylist()
    groups = {"all": rows, "seen": [r for r in rows if not r["held_out"]], "held_out": [r for r in rows if r["held_out"]]}
    return {name: _shares(group) for name, group in groups.items()}


def _shares(rows: list[dict]) -> dict:
    count = len(rows)

    def share(test) -> float | None:
        return round(sum(1 for row in rows if test(row)) / count, 4) if count else None

    return {
        "images": count,
        "color_match": share(lambda r: r["color_match"]),
        "shape_match": share(lambda r: r["shape_match"]),
        "color_and_shape_match": share(lambda r: r["color_match"] and r["shape_match"]),
        "background_match": share(lambda r: r["background_match"]),
    }


def score_generation(output_uri: str, held_out: tuple[tuple[str, str], ...] = DEFAULT_HELD_OUT) -> tuple[dict, pa.Table]:
    """A generation output (any fsspec URI) -> (summary, per-image table) of prompt adherence.

    Reads the manifest for each image's prompt and path; the prompts are corpus captions,
    e.g. from ``procedural.evaluation_prompts``.
    """
    manifest = io.read_parquet_folder(io.join(output_uri, "manifest"), ["id", "prompt", "image_path"])
    if manifest is None:
        raise ValueError(f"output: {output_uri!r} has no manifest/ (not a generation output, or nothing generated yet)")
    rows = [
        {"id": row["id"], "prompt": row["prompt"], "pixels": _read_pixels(io.join(output_uri, row["image_path"]))}
        for row in manifest.sort_by("id").to_pylist()
        if parse_caption(row["prompt"]) is not None
    ]
    scored = score_rows(rows, held_out)
    return summarize(scored), scored


def _read_pixels(uri: str) -> np.ndarray:
    return np.asarray(Image.open(bytes_io.BytesIO(io.read_bytes(uri))).convert("RGB"))
