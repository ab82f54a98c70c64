"""Draw the small bundled sample dataset in flux2_train/demo_data/.

Six pictures of one made-up subject, a red toy robot (trigger word `r0b0t`),
drawn with simple shapes on plain or gradient backgrounds at varied positions,
scales and aspect ratios. Five get a caption file; the sixth has none so the
trainer falls back to the trigger word. The script is deterministic (no random
numbers, no network) and needs only Pillow:

    python tools/make_demo_data.py [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image, ImageDraw

OUT_DIR = Path(__file__).resolve().parent.parent / "flux2_train" / "demo_data"

RED = (205, 38, 38)
DARK_RED = (140, 20, 24)
LIGHT_RED = (232, 80, 70)
GREY = (70, 70, 78)
WHITE = (250, 250, 250)
BLACK = (20, 20, 24)
YELLOW = (250, 205, 40)

# name, (width, height), background, (centre x, ground y) as fractions, scale, caption
SAMPLES = [
    ("robot_01", (128, 128), ("plain", (70, 110, 200)), (0.50, 0.88), 1.00,
     "r0b0t toy robot standing on a blue background"),
    ("robot_02", (160, 128), ("vgradient", (255, 214, 150), (245, 140, 60)), (0.32, 0.92), 0.85,
     "r0b0t toy robot on the left of an orange sunset gradient"),
    ("robot_03", (128, 160), ("plain", (120, 190, 120)), (0.55, 0.80), 0.80,
     "r0b0t toy robot, small, standing on a green background"),
    ("robot_04", (192, 128), ("hgradient", (40, 40, 70), (120, 60, 140)), (0.72, 0.95), 0.95,
     "r0b0t toy robot on the right side of a dark purple gradient"),
    ("robot_05", (128, 128), ("plain", (235, 235, 225)), (0.50, 0.98), 1.35,
     "close-up of r0b0t toy robot on a plain white background"),
    ("robot_06", (144, 112), ("vgradient", (150, 215, 245), (225, 245, 255)), (0.45, 0.90), 0.75,
     None),  # no caption: the trainer uses the trigger word
]


def background(size: tuple[int, int], spec: tuple) -> Image.Image:
    w, h = size
    kind = spec[0]
    if kind == "plain":
        return Image.new("RGB", size, spec[1])
    a, b = spec[1], spec[2]
    img = Image.new("RGB", size)
    draw = ImageDraw.Draw(img)
    n = h if kind == "vgradient" else w
    for i in range(n):
        t = i / max(1, n - 1)
        c = tuple(round(a[k] + (b[k] - a[k]) * t) for k in range(3))
        if kind == "vgradient":
            draw.line([(0, i), (w - 1, i)], fill=c)
        else:
            draw.line([(i, 0), (i, h - 1)], fill=c)
    return img


def draw_robot(img: Image.Image, cx: float, ground: float, s: float) -> None:
    """Robot about 100*s px tall, standing with its feet on y=ground, centred on x=cx."""
    d = ImageDraw.Draw(img)

    def box(x0, y0, x1, y1, fill, r=0):
        # coordinates in robot units (x relative to cx, y up from the ground)
        xy = [cx + x0 * s, ground - y1 * s, cx + x1 * s, ground - y0 * s]
        if r:
            d.rounded_rectangle(xy, radius=max(1, round(r * s)), fill=fill, outline=DARK_RED if fill in (RED, LIGHT_RED) else None)
        else:
            d.rectangle(xy, fill=fill)

    def disc(x, y, r, fill):
        d.ellipse([cx + (x - r) * s, ground - (y + r) * s, cx + (x + r) * s, ground - (y - r) * s], fill=fill)

    # legs and feet
    box(-14, 8, -6, 26, GREY)
    box(6, 8, 14, 26, GREY)
    box(-18, 0, -4, 8, DARK_RED, r=2)
    box(4, 0, 18, 8, DARK_RED, r=2)
    # arms
    box(-30, 30, -22, 56, GREY)
    box(22, 30, 30, 56, GREY)
    disc(-26, 28, 5, DARK_RED)
    disc(26, 28, 5, DARK_RED)
    # body with a chest panel
    box(-22, 24, 22, 62, RED, r=5)
    box(-10, 34, 10, 50, YELLOW, r=2)
    disc(0, 42, 3, RED)
    # neck and head
    box(-5, 62, 5, 67, GREY)
    box(-18, 66, 18, 92, LIGHT_RED, r=6)
    # eyes
    disc(-8, 81, 5, WHITE)
    disc(8, 81, 5, WHITE)
    disc(-7, 80, 2.2, BLACK)
    disc(9, 80, 2.2, BLACK)
    # mouth
    box(-7, 70, 7, 73, BLACK)
    # antenna
    d.line([cx, ground - 92 * s, cx, ground - 104 * s], fill=GREY, width=max(1, round(2 * s)))
    disc(0, 106, 4, YELLOW)


def make(out_dir: Path = OUT_DIR) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, size, bg, (fx, fy), scale, caption in SAMPLES:
        img = background(size, bg)
        # robot height (~110 units) fills ~70% of the shorter side at scale 1
        s = scale * 0.7 * min(size) / 110
        draw_robot(img, fx * size[0], fy * size[1], s)
        png = out_dir / f"{name}.png"
        img.save(png, format="PNG", optimize=True)
        written.append(png)
        txt = out_dir / f"{name}.txt"
        if caption is not None:
            txt.write_text(caption + "\n", encoding="utf-8")
            written.append(txt)
        elif txt.exists():
            txt.unlink()
    return written


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_DIR
    for p in make(out):
        print(p, p.stat().st_size)
