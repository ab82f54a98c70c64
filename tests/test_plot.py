import math

import pytest
from PIL import Image

from flux2_train import plot
from flux2_train.plot import save_loss_plot, smooth


def _bold_rows_by_column(img: Image.Image) -> dict[int, list[int]]:
    """Rows of pixels in the bold line's colour, per column, inside the plot frame only."""
    img = img.convert("RGB")
    px = img.load()
    cols: dict[int, list[int]] = {}
    for x in range(plot.PLOT_LEFT + 1, plot.PLOT_RIGHT):
        for y in range(plot.PLOT_TOP + 1, plot.PLOT_BOTTOM):
            if px[x, y] == plot.SMOOTH_COLOR:
                cols.setdefault(x, []).append(y)
    return cols


def test_png_written_with_size_and_content(tmp_path):
    steps = list(range(1, 201))
    losses = [1.0 / math.sqrt(s) + 0.05 * math.sin(s) for s in steps]
    out = save_loss_plot(tmp_path / "sub" / "loss.png", steps, losses, smooth(losses), title="test run",
                         val_steps=[50, 100, 150, 200], val_losses=[0.2, 0.15, 0.12, 0.1])
    assert out == tmp_path / "sub" / "loss.png"
    assert out.exists()
    assert [p.name for p in out.parent.iterdir()] == ["loss.png"]  # no temporary file left
    with Image.open(out) as img:
        assert img.format == "PNG"
        assert img.size == (plot.WIDTH, plot.HEIGHT)
        assert 700 <= img.width <= 900 and 400 <= img.height <= 500
        rgb = img.convert("RGB")
        colors = rgb.getcolors(maxcolors=1 << 20)
        dark = sum(n for n, c in colors if sum(c) < 300)
        assert dark > 500  # curve, axes and text
        assert any(c == plot.VAL_COLOR for _, c in colors)
        assert any(c == plot.RAW_COLOR for _, c in colors)


def test_decreasing_loss_left_end_higher(tmp_path):
    steps = list(range(0, 300))
    losses = [2.0 * math.exp(-s / 60) + 0.1 for s in steps]
    out = save_loss_plot(tmp_path / "loss.png", steps, losses, smooth(losses, 0.6))
    with Image.open(out) as img:
        cols = _bold_rows_by_column(img)
    assert len(cols) > 0.8 * (plot.PLOT_RIGHT - plot.PLOT_LEFT)  # the line spans the plot
    xs = sorted(cols)
    left = sum(cols[xs[0]]) / len(cols[xs[0]])
    right = sum(cols[xs[-1]]) / len(cols[xs[-1]])
    # image rows grow downwards: a higher loss is a smaller row number
    assert left < right - 100
    # the bold line is bold: several pixels tall in a flat stretch
    assert len(cols[xs[-1]]) >= 2


def test_increasing_loss_right_end_higher(tmp_path):
    steps = list(range(10))
    losses = [0.1 * s for s in steps]
    out = save_loss_plot(tmp_path / "loss.png", steps, losses)  # no smoothed: raw is the bold line
    with Image.open(out) as img:
        cols = _bold_rows_by_column(img)
    xs = sorted(cols)
    assert min(cols[xs[0]]) > max(cols[xs[-1]])


def test_nan_and_inf_points_are_skipped(tmp_path):
    steps = list(range(10))
    losses = [1.0, float("nan"), 0.8, float("inf"), 0.6, 0.5, float("-inf"), 0.4, 0.3, 0.2]
    out = save_loss_plot(tmp_path / "loss.png", steps, losses, smooth(losses),
                         val_steps=[5, 9], val_losses=[float("nan"), 0.25])
    with Image.open(out) as img:
        assert img.size == (plot.WIDTH, plot.HEIGHT)
        assert _bold_rows_by_column(img)


@pytest.mark.parametrize(
    "steps,losses",
    [
        ([7], [0.5]),  # a single point
        ([1, 2, 3, 4], [0.3, 0.3, 0.3, 0.3]),  # constant
        ([5, 5], [0.0, 0.0]),  # one step, zero loss
        ([], []),  # nothing yet
        ([1, 2], [float("nan"), float("nan")]),  # nothing finite
        ([1, 2, 3], [1e6, 2e6, 3e6]),  # large values
        ([1, 2, 3], [1e-7, 2e-7, 1.5e-7]),  # tiny values
    ],
)
def test_edge_cases_do_not_crash(tmp_path, steps, losses):
    out = save_loss_plot(tmp_path / "loss.png", steps, losses, smooth(losses), title="edge")
    with Image.open(out) as img:
        assert img.size == (plot.WIDTH, plot.HEIGHT)
    if any(math.isfinite(v) for v in losses):
        with Image.open(out) as img:
            assert _bold_rows_by_column(img)


def test_overwrites_existing_file(tmp_path):
    path = tmp_path / "loss.png"
    path.write_bytes(b"old")
    save_loss_plot(path, [1, 2], [1.0, 0.5])
    with Image.open(path) as img:
        assert img.size == (plot.WIDTH, plot.HEIGHT)


def test_smooth_constant_is_constant():
    for alpha in (0.0, 0.5, 0.9, 0.99):
        assert smooth([0.37] * 50, alpha) == pytest.approx([0.37] * 50)


def test_smooth_first_value_is_unbiased():
    assert smooth([2.0, 2.0], 0.9)[0] == pytest.approx(2.0)
    assert smooth([]) == []


def test_smooth_lags_a_step_change():
    values = [1.0] * 20 + [0.0] * 20
    out = smooth(values, 0.9)
    assert out[19] == pytest.approx(1.0)
    assert 0.0 < out[20] < 1.0  # the first point after the step is pulled back towards the old level
    # debiased EMA: 0.9 * (1 - 0.9**20) / (1 - 0.9**21), a little under 0.9
    assert out[20] == pytest.approx(0.9 * (1 - 0.9**20) / (1 - 0.9**21))
    assert all(a > b for a, b in zip(out[20:], out[21:]))  # then it keeps decaying
    assert out[-1] < 0.2
    assert smooth(values, 0.0) == values  # alpha 0: no smoothing


def test_smooth_passes_non_finite_through():
    out = smooth([1.0, float("nan"), 1.0], 0.9)
    assert out[0] == pytest.approx(1.0) and math.isnan(out[1]) and out[2] == pytest.approx(1.0)


def test_smooth_rejects_bad_alpha():
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)
    with pytest.raises(ValueError):
        smooth([1.0], -0.1)
