"""Loss curves as PNG files, drawn with Pillow only (no matplotlib).

`save_loss_plot` draws raw training loss as a thin light line, its smoothed
version as a bold line and optional validation losses as dots, with axes, tick
labels, a title and a legend. `smooth` is the debiased exponential moving
average that TensorBoard's smoothing slider uses; the trainer shows it as the
displayed loss.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Sequence

from PIL import Image, ImageDraw, ImageFont

from .fsutil import atomic_write

WIDTH, HEIGHT = 800, 450
# Plot area (the frame the curves are drawn in); the top margin holds the title
# row and the legend row, so nothing but data is drawn inside the frame.
PLOT_LEFT, PLOT_TOP, PLOT_RIGHT, PLOT_BOTTOM = 72, 58, WIDTH - 24, HEIGHT - 48

BACKGROUND = (255, 255, 255)
TEXT_COLOR = (30, 30, 30)
AXIS_COLOR = (60, 60, 60)
GRID_COLOR = (228, 228, 228)
RAW_COLOR = (160, 190, 230)  # thin, light
SMOOTH_COLOR = (20, 70, 170)  # bold, dark
VAL_COLOR = (230, 110, 20)

RAW_WIDTH = 1
SMOOTH_WIDTH = 3
VAL_RADIUS = 4


def smooth(values: Iterable[float], alpha: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (TensorBoard's smoothing).

    out[i] = ema_i / (1 - alpha**n), where ema is the plain EMA started at 0 and n
    the number of finite values seen so far, so the first output equals the first
    value instead of being dragged towards 0. Non-finite values are passed through
    unchanged and do not disturb the average. `alpha` is the weight of the past,
    0 <= alpha < 1 (0 means no smoothing).
    """
    smoother = Smoother(alpha)
    return [smoother.add(v) for v in values]


class Smoother:
    """`smooth`, one value at a time: the training loop adds each step's loss in O(1)."""

    def __init__(self, alpha: float = 0.9):
        self.alpha = float(alpha)
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"smooth: alpha must be in [0, 1), got {alpha}")
        self.ema = 0.0
        self.n = 0

    def add(self, value: float) -> float:
        v = float(value)
        if not math.isfinite(v):
            return v
        self.ema = self.ema * self.alpha + (1.0 - self.alpha) * v
        self.n += 1
        return self.ema / (1.0 - self.alpha**self.n)


def save_loss_plot(
    path: str | Path,
    steps: Sequence[int],
    losses: Sequence[float],
    smoothed: Sequence[float] | None = None,
    title: str = "",
    val_steps: Sequence[int] | None = None,
    val_losses: Sequence[float] | None = None,
) -> Path:
    """Draw a loss-curve PNG (about 800x450) at `path`, written atomically; returns the path.

    Points whose step or value is NaN or infinite are skipped (a line breaks
    there). When `smoothed` is None the raw loss is drawn as the bold line.
    Series of unequal length are cut to the shorter one.
    """
    raw = _points(steps, losses)
    layers = []
    if smoothed is not None:
        if raw:
            layers.append(Layer("loss", raw, RAW_COLOR, RAW_WIDTH))
        layers.append(Layer("smoothed", _points(steps, smoothed), SMOOTH_COLOR, SMOOTH_WIDTH))
    else:
        layers.append(Layer("loss", raw, SMOOTH_COLOR, SMOOTH_WIDTH))
    if val_steps is not None and val_losses is not None:
        val = _points(val_steps, val_losses)
        if val:
            layers.append(Layer("validation", val, VAL_COLOR, 1, dots=True))
    return _draw(path, title, layers)


RUN_COLORS = [(20, 70, 170), (200, 80, 20), (30, 140, 60), (150, 40, 150)]


def save_runs_plot(path: str | Path, runs: Sequence[tuple[str, Sequence[int], Sequence[float], Sequence[int],
                                                          Sequence[float]]], title: str = "") -> Path:
    """Several runs in one PNG: each run's smoothed loss (a line) and validation loss (dots) in its colour.

    `runs`: (label, steps, smoothed losses, validation steps, validation losses) per run.
    """
    layers = []
    for (label, steps, smoothed, val_steps, val_losses), color in zip(runs, RUN_COLORS * len(runs)):
        layers.append(Layer(label, _points(steps, smoothed), color, SMOOTH_WIDTH))
        val = _points(val_steps, val_losses)
        if val:
            layers.append(Layer(f"{label} validation", val, color, 1, dots=True))
    return _draw(path, title, layers)


class Layer:
    """One series: a line (`width` pixels) or, with `dots`, points joined by a thin line."""

    def __init__(self, label: str, segments, color, width: int, dots: bool = False):
        self.label, self.segments, self.color, self.width, self.dots = label, segments, color, width, dots


def _draw(path: str | Path, title: str, layers: list[Layer]) -> Path:
    img = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(img)
    font = _font(12)

    # title row
    if title:
        title_font = _font(15)
        _text(draw, (WIDTH // 2, 6), _fit(draw, title, title_font, WIDTH - 20), title_font, anchor="ma")

    # legend row (right-aligned, between the title and the plot frame)
    _legend(draw, [(layer.label, layer.color, layer.width, layer.dots) for layer in layers], font,
            right=PLOT_RIGHT, y=32)

    all_pts = [p for layer in layers for s in layer.segments for p in s]
    box = (PLOT_LEFT, PLOT_TOP, PLOT_RIGHT, PLOT_BOTTOM)
    if not all_pts:
        _frame(draw, box)
        _text(draw, ((PLOT_LEFT + PLOT_RIGHT) // 2, (PLOT_TOP + PLOT_BOTTOM) // 2), "no finite data", font, anchor="mm")
        return _save(img, path)

    xs = [p[0] for p in all_pts]
    ys = [p[1] for p in all_pts]
    x0, x1 = _x_range(min(xs), max(xs))
    y0, y1 = _y_range(min(ys), max(ys))

    def to_px(x: float, y: float) -> tuple[float, float]:
        px = PLOT_LEFT + (x - x0) / (x1 - x0) * (PLOT_RIGHT - PLOT_LEFT)
        py = PLOT_BOTTOM - (y - y0) / (y1 - y0) * (PLOT_BOTTOM - PLOT_TOP)
        return px, py

    # grid and tick labels
    xticks = [t for t in _nice_ticks(x0, x1, 7, integer=True) if x0 <= t <= x1]
    yticks = [t for t in _nice_ticks(y0, y1, 6) if y0 <= t <= y1]
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else abs(y1 - y0) / 5
    for t in xticks:
        px, _ = to_px(t, y0)
        draw.line([(px, PLOT_TOP), (px, PLOT_BOTTOM)], fill=GRID_COLOR)
        draw.line([(px, PLOT_BOTTOM), (px, PLOT_BOTTOM + 4)], fill=AXIS_COLOR)
        _text(draw, (px, PLOT_BOTTOM + 7), _fmt_step(t), font, anchor="ma")
    for t in yticks:
        _, py = to_px(x0, t)
        draw.line([(PLOT_LEFT, py), (PLOT_RIGHT, py)], fill=GRID_COLOR)
        draw.line([(PLOT_LEFT - 4, py), (PLOT_LEFT, py)], fill=AXIS_COLOR)
        _text(draw, (PLOT_LEFT - 7, py), _fmt_value(t, ystep), font, anchor="rm")
    _frame(draw, box)
    _text(draw, ((PLOT_LEFT + PLOT_RIGHT) // 2, HEIGHT - 8), "step", font, anchor="md")
    _text(draw, (8, PLOT_TOP - 10), "loss", font, anchor="ls")

    # in order: thin lines under bold ones, dots last
    for layer in layers:
        _polyline(draw, layer.segments, to_px, layer.color, layer.width)
        if layer.dots:
            for seg in layer.segments:
                for x, y in seg:
                    px, py = to_px(x, y)
                    r = VAL_RADIUS
                    draw.ellipse([px - r, py - r, px + r, py + r], fill=layer.color, outline=_darker(layer.color))
    return _save(img, path)


def _darker(color) -> tuple[int, int, int]:
    return tuple(c // 2 for c in color)


# ----------------------------------------------------------------------------- helpers


def _points(xs: Sequence | None, ys: Sequence | None) -> list[list[tuple[float, float]]]:
    """Split (x, y) pairs into runs of finite points; a non-finite point ends a run."""
    segments: list[list[tuple[float, float]]] = []
    cur: list[tuple[float, float]] = []
    for x, y in zip(xs or [], ys or []):
        try:
            x, y = float(x), float(y)
        except (TypeError, ValueError):
            x = y = math.nan
        if math.isfinite(x) and math.isfinite(y):
            cur.append((x, y))
        elif cur:
            segments.append(cur)
            cur = []
    if cur:
        segments.append(cur)
    return segments


def _x_range(lo: float, hi: float) -> tuple[float, float]:
    if hi - lo <= 0:
        return lo - 1.0, hi + 1.0
    pad = (hi - lo) * 0.015  # keep end points (and validation dots) off the frame
    return lo - pad, hi + pad


def _y_range(lo: float, hi: float) -> tuple[float, float]:
    span = hi - lo
    if span <= 0 or span < 1e-12 * max(abs(lo), abs(hi)):
        pad = abs(hi) * 0.1 if hi != 0 else 1.0
        return lo - pad, hi + pad
    pad = span * 0.06
    return lo - pad, hi + pad


def _nice_step(span: float, target: int) -> float:
    raw = span / max(1, target)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _nice_ticks(lo: float, hi: float, target: int, integer: bool = False) -> list[float]:
    span = hi - lo
    if not (span > 0 and math.isfinite(span)):
        return [lo]
    step = _nice_step(span, target)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9 and len(ticks) < 50:
        ticks.append(0.0 if abs(t) < step * 1e-9 else t)
        t = first + len(ticks) * step
    return ticks


def _fmt_step(t: float) -> str:
    t = round(t)
    if abs(t) >= 1_000_000:
        return f"{t / 1e6:g}M"
    if abs(t) >= 100_000:
        return f"{t / 1e3:g}k"
    return str(int(t))


def _fmt_value(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or (step > 0 and step < 1e-4):
        return f"{v:.3g}"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 3
    if step > 0 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1  # steps like 0.25
    return f"{v:.{decimals}f}"


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, xy, text: str, font, anchor: str = "la") -> None:
    try:
        draw.text(xy, text, fill=TEXT_COLOR, font=font, anchor=anchor)
    except ValueError:  # bitmap fonts do not support anchors
        draw.text(xy, text, fill=TEXT_COLOR, font=font)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    l, _, r, _ = draw.textbbox((0, 0), text, font=font)
    return r - l


def _fit(draw: ImageDraw.ImageDraw, text: str, font, max_width: int) -> str:
    if _text_width(draw, text, font) <= max_width:
        return text
    while text and _text_width(draw, text + "...", font) > max_width:
        text = text[:-1]
    return text + "..."


def _legend(draw: ImageDraw.ImageDraw, entries, font, right: int, y: int) -> None:
    swatch, gap, pad = 22, 6, 16
    widths = [swatch + gap + _text_width(draw, label, font) for label, *_ in entries]
    x = right - (sum(widths) + pad * (len(entries) - 1))
    for (label, color, width, dot), w in zip(entries, widths):
        if dot:
            cx, r = x + swatch // 2, VAL_RADIUS
            draw.ellipse([cx - r, y - r, cx + r, y + r], fill=color, outline=_darker(color))
        else:
            draw.line([(x, y), (x + swatch, y)], fill=color, width=width)
        _text(draw, (x + swatch + gap, y), label, font, anchor="lm")
        x += w + pad


def _frame(draw: ImageDraw.ImageDraw, box) -> None:
    draw.rectangle(box, outline=AXIS_COLOR, width=1)


def _polyline(draw: ImageDraw.ImageDraw, segments, to_px, color, width: int) -> None:
    for seg in segments:
        # whole pixels: Pillow draws wide lines from fractional points unevenly
        pts = [(round(px), round(py)) for px, py in (to_px(x, y) for x, y in seg)]
        if len(pts) == 1:
            (px, py), r = pts[0], width + 1
            draw.ellipse([px - r, py - r, px + r, py + r], fill=color)
        else:
            draw.line(pts, fill=color, width=width)


def _save(img: Image.Image, path: str | Path) -> Path:
    # the temporary file's name ends in .tmp, so the format must be named
    return atomic_write(path, lambda tmp: img.save(tmp, format="PNG", optimize=True))
