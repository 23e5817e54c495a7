"""Loss curves as a PNG, drawn with Pillow (matplotlib is not a dependency).

One panel per curve, stacked: training step on x, loss on a log10 y axis (losses of
diffusion and autoencoder training fall over orders of magnitude).
"""

from __future__ import annotations

import io as bytes_io
import math

from PIL import Image, ImageDraw

PANEL_WIDTH, PANEL_HEIGHT = 640, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 70, 20, 28, 30
LINE_COLOR, AXIS_COLOR, GRID_COLOR, TEXT_COLOR = (31, 119, 180), (60, 60, 60), (225, 225, 225), (20, 20, 20)


def render_loss_curves(curves: dict[str, list[tuple[int, float]]]) -> bytes:
    """{title: [(step, loss), ...]} -> PNG bytes. Non-positive and non-finite losses are skipped."""
    if not curves:
        raise ValueError("curves: nothing to draw")
    image = Image.new("RGB", (PANEL_WIDTH, PANEL_HEIGHT * len(curves)), "white")
    draw = ImageDraw.Draw(image)
    for index, (title, points) in enumerate(curves.items()):
        _draw_panel(draw, index * PANEL_HEIGHT, title, [(s, v) for s, v in points if v > 0 and math.isfinite(v)])
    buffer = bytes_io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _draw_panel(draw: ImageDraw.ImageDraw, top: int, title: str, points: list[tuple[int, float]]) -> None:
    left, right = MARGIN_LEFT, PANEL_WIDTH - MARGIN_RIGHT
    upper, lower = top + MARGIN_TOP, top + PANEL_HEIGHT - MARGIN_BOTTOM
    draw.text((left, top + 8), title, fill=TEXT_COLOR)
    draw.rectangle((left, upper, right, lower), outline=AXIS_COLOR)
    if not points:
        draw.text((left + 10, upper + 10), "no data", fill=TEXT_COLOR)
        return
    steps = [step for step, _ in points]
    logs = [math.log10(value) for _, value in points]
    first_step, last_step = min(steps), max(steps)
    low, high = math.floor(min(logs)), math.ceil(max(logs))
    high = max(high, low + 1)

    def x_of(step: float) -> float:
        return left + (right - left) * ((step - first_step) / (last_step - first_step) if last_step > first_step else 0.5)

    def y_of(log_value: float) -> float:
        return lower - (lower - upper) * (log_value - low) / (high - low)

    # 1. decades on the y axis
    for decade in range(low, high + 1):
        y = y_of(decade)
        draw.line((left, y, right, y), fill=GRID_COLOR)
        draw.text((8, y - 6), f"1e{decade}", fill=TEXT_COLOR)
    # 2. first and last step on the x axis
    draw.text((left, lower + 8), str(first_step), fill=TEXT_COLOR)
    draw.text((right - 40, lower + 8), str(last_step), fill=TEXT_COLOR)
    # 3. the curve
    coordinates = [(x_of(step), y_of(value)) for step, value in zip(steps, logs)]
    if len(coordinates) == 1:
        x, y = coordinates[0]
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=LINE_COLOR)
    else:
        draw.line(coordinates, fill=LINE_COLOR, width=2)
