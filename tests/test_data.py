"""Tests of flux2_train.data: buckets, captions, folder checks and image loading.

Every image is made here with PIL in tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import io
import struct
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from flux2_train.config import TrainConfig
from flux2_train.data import (
    SUPPORTED_EXTENSIONS,
    DatasetReport,
    ImageItem,
    assign_bucket,
    bucket_sizes,
    load_image,
    scan_dataset,
    scan_dataset_for,
)
from flux2_train.errors import DatasetError

# Small images and resolution 64 keep every test fast; the rules do not depend on size.
RES = 64


def make_image(path: Path, size=(64, 64), mode="RGB", color=(128, 64, 32), **save_kw) -> Path:
    Image.new(mode, size, color).save(path, **save_kw)
    return path


def noise_bytes(fmt: str, size=(128, 128), **save_kw) -> bytes:
    """An incompressible image, so a truncated copy loses pixel data, not just trailing metadata."""
    buf = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buf, fmt, **save_kw)
    return buf.getvalue()


def scan(folder: Path, **kw) -> DatasetReport:
    kw.setdefault("resolution", RES)
    return scan_dataset(folder, **kw)


def scan_error(folder: Path, **kw) -> str:
    with pytest.raises(DatasetError) as exc:
        scan(folder, **kw)
    return str(exc.value)


# --------------------------------------------------------------------------
# buckets
# --------------------------------------------------------------------------

@pytest.mark.parametrize("resolution", [64, 256, 512, 768, 1024, 1536])
@pytest.mark.parametrize("max_ar", [1.0, 1.5, 2.0, 3.0])
def test_bucket_sizes_obey_the_grid_area_and_aspect_bounds(resolution, max_ar):
    buckets = bucket_sizes(resolution, max_ar)
    assert buckets == sorted(set(buckets)), "sorted, no duplicates"
    assert (resolution, resolution) in buckets
    area = resolution * resolution
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0 and w > 0 and h > 0
        assert w * h <= area
        assert max(w, h) / min(w, h) <= max_ar
        assert (h, w) in buckets, "symmetric"
        # maximal: the largest height for this width, and neither side can grow
        assert w * (h + 16) > area and (w + 16) * h > area


def test_bucket_sizes_have_one_height_per_width_and_reach_the_aspect_limit():
    buckets = bucket_sizes(1024, 3.0)
    widths = [w for w, _ in buckets]
    assert len(widths) == len(set(widths))
    assert max(max(w, h) / min(w, h) for w, h in buckets) > 2.8, "wide buckets exist up to the limit"
    assert bucket_sizes(1024, 1.0) == [(1024, 1024)]


def test_assign_bucket_picks_landscape_portrait_and_square():
    buckets = bucket_sizes(1024, 3.0)
    w, h = assign_bucket(1920, 1080, buckets)
    assert w > h and abs(w / h - 16 / 9) < 0.05
    w, h = assign_bucket(1080, 1920, buckets)
    assert h > w and abs(h / w - 16 / 9) < 0.05
    assert assign_bucket(500, 500, buckets) == (1024, 1024)
    assert assign_bucket(3000, 1000, buckets) == assign_bucket(1000, 3000, buckets)[::-1]
    # beyond the aspect limit: the most extreme bucket of that orientation
    w, h = assign_bucket(10000, 100, buckets)
    assert w / h == max(bw / bh for bw, bh in buckets)


def test_assign_bucket_breaks_aspect_ties_by_larger_area():
    assert assign_bucket(100, 100, [(32, 32), (64, 64), (48, 96)]) == (64, 64)
    assert assign_bucket(100, 100, [(64, 64), (32, 32)]) == (64, 64)


# --------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------

def test_caption_comes_from_the_file_with_newlines_collapsed(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  a red cube\n\non a table \r\n lit from the left  \n", encoding="utf-8")
    item = scan(tmp_path).items[0]
    assert item.caption == "a red cube on a table lit from the left"
    assert item.caption_source == "file"


def test_caption_file_with_utf8_bom_and_custom_extension(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.caption").write_bytes("\ufeffcaf\u00e9 au lait".encode("utf-8"))
    item = scan(tmp_path, caption_ext="caption").items[0]
    assert item.caption == "caf\u00e9 au lait"


@pytest.mark.failure_case("caption missing")
def test_missing_caption_uses_default_caption_then_trigger_word(tmp_path):
    make_image(tmp_path / "a.png")
    item = scan(tmp_path, default_caption="a photo", trigger_word="sks").items[0]
    assert (item.caption, item.caption_source) == ("sks, a photo", "default")
    item = scan(tmp_path, default_caption="a photo", trigger_word="sks", prepend_trigger=False).items[0]
    assert (item.caption, item.caption_source) == ("a photo", "default")
    item = scan(tmp_path, trigger_word="sks").items[0]
    assert (item.caption, item.caption_source) == ("sks", "trigger")


@pytest.mark.failure_case("caption missing")
def test_images_without_a_caption_file_are_named_in_one_warning(tmp_path):
    for stem in "abcdefg":
        make_image(tmp_path / f"{stem}.png")
    make_image(tmp_path / "h.png")
    (tmp_path / "h.txt").write_text("a captioned cube", encoding="utf-8")
    report = scan(tmp_path, trigger_word="sks")
    missing = [w for w in report.warnings if "no caption file" in w]
    assert len(missing) == 1, report.warnings
    assert "7 images have no caption file" in missing[0] and "the trigger word" in missing[0]
    assert "a.png, b.png, c.png, d.png, e.png and 2 more" in missing[0] and "h.png" not in missing[0]
    assert "add a caption file of the same name (a.txt and so on)" in missing[0]
    warning = [w for w in scan(tmp_path, default_caption="a photo").warnings if "no caption file" in w]
    assert len(warning) == 1 and "the default caption" in warning[0]
    assert missing[0] in report.summary()


@pytest.mark.failure_case("caption empty")
def test_empty_caption_file_falls_back_with_a_warning(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text(" \n\n ", encoding="utf-8")
    report = scan(tmp_path, trigger_word="sks")
    assert (report.items[0].caption, report.items[0].caption_source) == ("sks", "trigger")
    assert any("a.txt" in w and "empty" in w for w in report.warnings)


def test_trigger_word_is_prepended_only_when_missing_as_a_word(tmp_path):
    captions = {
        "a": "a photo of a dog",  # missing -> prepended
        "b": "a photo of SKS dog",  # present, other case -> unchanged
        "c": "sksdog on grass",  # only inside a longer word -> prepended
        "d": "portrait of sks.",  # present before punctuation -> unchanged
    }
    for stem, text in captions.items():
        make_image(tmp_path / f"{stem}.png")
        (tmp_path / f"{stem}.txt").write_text(text, encoding="utf-8")
    got = {i.path.stem: i.caption for i in scan(tmp_path, trigger_word="sks").items}
    assert got == {
        "a": "sks, a photo of a dog",
        "b": "a photo of SKS dog",
        "c": "sks, sksdog on grass",
        "d": "portrait of sks.",
    }
    got = {i.path.stem: i.caption for i in scan(tmp_path, trigger_word="sks", prepend_trigger=False).items}
    assert got == captions


def test_trigger_with_punctuation_is_matched_as_a_whole_word(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("<ohwx-man> in a suit", encoding="utf-8")
    assert scan(tmp_path, trigger_word="<ohwx-man>").items[0].caption == "<ohwx-man> in a suit"


@pytest.mark.failure_case("caption missing")
def test_missing_caption_without_fallback_is_an_error_naming_the_caption_file(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("fine", encoding="utf-8")
    msg = scan_error(tmp_path)
    assert "a.png has no caption" in msg and "add a.txt" in msg and "trigger word" in msg
    assert "b.png" not in msg


@pytest.mark.failure_case("caption not UTF-8")
def test_non_utf8_caption_is_an_error(tmp_path):
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    msg = scan_error(tmp_path, trigger_word="sks")
    assert "caption a.txt is not UTF-8 text" in msg and "re-save it as UTF-8" in msg


# --------------------------------------------------------------------------
# the folder
# --------------------------------------------------------------------------

@pytest.mark.failure_case("missing dataset folder")
def test_missing_folder_and_file_instead_of_folder_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan(tmp_path / "nope")
    make_image(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="not a folder"):
        scan(tmp_path / "a.png")
    with pytest.raises(DatasetError, match="no dataset folder"):
        scan_dataset("")


@pytest.mark.failure_case("empty dataset folder")
def test_empty_folder_is_an_error_listing_supported_extensions(tmp_path):
    (tmp_path / ".DS_Store").write_bytes(b"junk")  # hidden files do not count
    msg = scan_error(tmp_path)
    assert f"{tmp_path} has 0 images; supported: .png .jpg .jpeg .webp" in msg
    assert "found" not in msg


@pytest.mark.failure_case("only unsupported files")
def test_folder_of_unsupported_files_lists_the_extensions_found(tmp_path):
    make_image(tmp_path / "a.gif")
    make_image(tmp_path / "b.bmp")
    (tmp_path / "a.txt").write_text("x", encoding="utf-8")
    msg = scan_error(tmp_path)
    assert "has 0 images; supported: .png .jpg .jpeg .webp" in msg
    assert ".gif" in msg and ".bmp" in msg and ".txt" in msg


def test_hidden_files_and_subfolders_are_ignored_and_extensions_match_any_case(tmp_path):
    make_image(tmp_path / "B.PNG")
    make_image(tmp_path / "a.JpEg", format="JPEG")
    (tmp_path / ".hidden.png").write_bytes(b"not an image")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    report = scan(tmp_path, trigger_word="sks")
    assert [i.path.name for i in report.items] == ["B.PNG", "a.JpEg"]


def test_items_are_sorted_by_file_name(tmp_path):
    for name in ["c.png", "a.webp", "b.jpg"]:
        make_image(tmp_path / name)
    report = scan(tmp_path, trigger_word="sks")
    assert [i.path.name for i in report.items] == ["a.webp", "b.jpg", "c.png"]
    assert all(isinstance(i, ImageItem) and i.path.parent == tmp_path for i in report.items)


@pytest.mark.failure_case("corrupt image", "zero-byte image", "truncated PNG or JPEG")
def test_broken_files_are_all_listed_in_one_error(tmp_path):
    make_image(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    png = noise_bytes("PNG")
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    jpg = noise_bytes("JPEG", quality=95)
    (tmp_path / "half.jpg").write_bytes(jpg[: int(len(jpg) * 0.7)])
    (tmp_path / "garbage.webp").write_bytes(bytes(range(256)) * 8)
    (tmp_path / "text.png").write_text("hello, I am not a PNG", encoding="utf-8")
    with pytest.raises(DatasetError) as exc:
        scan(tmp_path, trigger_word="sks")
    msg = str(exc.value)
    for name in ["empty.jpg", "cut.png", "half.jpg", "garbage.webp", "text.png"]:
        assert f"{name} is not a readable image" in msg, name
    assert "good.png" not in msg
    assert msg.count("re-save it as PNG/JPEG or remove it") == 5
    assert "5 problems" in msg
    assert len(exc.value.problems) == 5


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_broken_links_to_an_image_or_a_caption_are_errors_naming_them(tmp_path):
    make_image(tmp_path / "good.png")
    (tmp_path / "gone.png").symlink_to(tmp_path / "moved" / "gone.png")
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").symlink_to(tmp_path / "moved" / "a.txt")
    (tmp_path / "notes.md").symlink_to(tmp_path / "moved" / "notes.md")
    msg = scan_error(tmp_path, trigger_word="sks")
    assert f"gone.png is a broken link: its target {tmp_path / 'moved' / 'gone.png'} does not exist" in msg
    assert "caption a.txt is a broken link" in msg and "restore" in msg and "remove the link" in msg
    assert "2 problems" in msg and "good.png" not in msg and "notes.md" not in msg
    # a folder of nothing but broken links says so, instead of "0 images"
    (tmp_path / "a.txt").unlink()
    for name in ["good.png", "a.png"]:
        (tmp_path / name).unlink()
    msg = scan_error(tmp_path, trigger_word="sks")
    assert "gone.png is a broken link" in msg and "0 images" not in msg
    # other broken links are ignored, like the files they stand for, but named
    (tmp_path / "gone.png").unlink()
    make_image(tmp_path / "good.png")
    report = scan(tmp_path, trigger_word="sks")
    assert any("notes.md" in w and "broken link" in w for w in report.warnings), report.warnings


@pytest.mark.failure_case("two images with the same stem")
def test_duplicate_stems_are_an_error_naming_both_files(tmp_path):
    make_image(tmp_path / "a.png")
    make_image(tmp_path / "a.jpg")
    make_image(tmp_path / "b.png")
    msg = scan_error(tmp_path, trigger_word="sks")
    assert "a.jpg and a.png" in msg and "ambiguous" in msg
    assert "b.png" not in msg


@pytest.mark.failure_case("image smaller than the smallest bucket")
def test_too_small_image_is_an_error_suggesting_a_resolution_that_fits(tmp_path):
    make_image(tmp_path / "small.png", size=(100, 100))
    msg = scan_error(tmp_path, trigger_word="sks", resolution=1024, max_upscale=2.0)
    assert "small.png is 100x100; at resolution 1024 its bucket is 1024x1024, an upscale of 10.24\u00d7 (max 2\u00d7)" in msg
    assert "e.g. 192" in msg  # 192x192 is the largest bucket within 2x of 100 pixels
    # the suggestion really works
    report = scan(tmp_path, trigger_word="sks", resolution=192, max_upscale=2.0)
    assert report.items[0].bucket == (192, 192)


def test_a_strip_too_thin_for_any_bucket_is_told_to_be_cropped(tmp_path):
    make_image(tmp_path / "strip.png", size=(2000, 20))
    msg = scan_error(tmp_path, trigger_word="sks", resolution=64, max_upscale=2.0)
    assert "strip.png is 2000x20" in msg and "crop it nearer to square: its sides are 100:1" in msg


def test_moderate_upscale_is_a_warning_not_an_error(tmp_path):
    make_image(tmp_path / "a.png", size=(48, 48))
    report = scan(tmp_path, trigger_word="sks", resolution=64, max_upscale=2.0)
    assert report.items[0].bucket == (64, 64)
    assert any("a.png" in w and "1.34\u00d7" in w for w in report.warnings)


def _png_with_declared_size(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.mark.failure_case("decompression bomb")
def test_decompression_bomb_is_refused_with_advice_to_downscale(tmp_path):
    make_image(tmp_path / "good.png")
    (tmp_path / "bomb.png").write_bytes(_png_with_declared_size(100_000, 100_000))
    msg = scan_error(tmp_path, trigger_word="sks")
    assert "bomb.png is too large to open" in msg and "decompression bomb" in msg
    assert "downscale it (e.g. to 4096 px on the long side)" in msg and "re-save" not in msg
    with pytest.raises(DatasetError, match=r"bomb\.png is too large to open.*downscale it"):
        load_image(tmp_path / "bomb.png", (64, 64))


@pytest.mark.failure_case("decompression bomb")
def test_a_102_megapixel_camera_photo_is_accepted(tmp_path):
    # 11648x8736 is between 1x and 2x Pillow's MAX_IMAGE_PIXELS, where Pillow only warns.
    # A flat colour at low quality keeps the file small and the test fast.
    Image.new("RGB", (11648, 8736), (120, 110, 100)).save(tmp_path / "camera.jpg", quality=10)
    limit = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nor does Pillow's warning reach the user
        report = scan(tmp_path, trigger_word="sks", resolution=1024)
    assert (report.items[0].width, report.items[0].height) == (11648, 8736)
    assert Image.MAX_IMAGE_PIXELS == limit, "Pillow's global limit is left alone"


@pytest.mark.failure_case("decompression bomb")
def test_images_up_to_twice_pillows_limit_load_and_larger_ones_are_refused(tmp_path, monkeypatch):
    # The same band as a large camera photo, at a cheap size: Pillow warns from 1x, refuses from 2x.
    make_image(tmp_path / "big.png", size=(40, 40))  # 1600 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = scan(tmp_path, trigger_word="sks", max_upscale=100)
        assert load_image(report.items[0].path, report.items[0].bucket).shape == (3, RES, RES)
    assert Image.MAX_IMAGE_PIXELS == 1000
    make_image(tmp_path / "huge.png", size=(50, 50))  # 2500 pixels, over 2x
    msg = scan_error(tmp_path, trigger_word="sks", max_upscale=100)
    assert "huge.png is too large to open" in msg and "downscale it" in msg and "big.png" not in msg
    with pytest.raises(DatasetError, match=r"huge\.png is too large to open"):
        load_image(tmp_path / "huge.png", (64, 64))


def test_report_summary_and_bucket_counts(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"wide{i}.png", size=(128, 64))
    make_image(tmp_path / "square.png", size=(64, 64))
    (tmp_path / "square.txt").write_text("a square", encoding="utf-8")
    report = scan(tmp_path, trigger_word="sks")
    wide = assign_bucket(128, 64, bucket_sizes(RES))
    assert report.bucket_counts == {(64, 64): 1, wide: 3}
    text = report.summary()
    assert "4 images" in text
    assert f"{wide[0]}x{wide[1]}: 3" in text and "64x64: 1" in text
    assert "1 from caption files" in text and "3 trigger word only" in text


def test_scan_dataset_for_reads_the_config_fields(tmp_path):
    make_image(tmp_path / "a.png", size=(96, 96))
    (tmp_path / "a.cap").write_text("a cube", encoding="utf-8")
    cfg = TrainConfig(dataset=str(tmp_path), caption_ext=".cap", trigger_word="sks", resolution=96,
                      max_aspect_ratio=2.0, max_upscale=1.5)
    report = scan_dataset_for(cfg)
    assert report.resolution == 96
    assert report.items[0].caption == "sks, a cube"
    assert report.items[0].bucket == (96, 96)
    cfg.resolution = 512  # 96 -> 512 is more than 1.5x
    with pytest.raises(DatasetError, match="max 1.5"):
        scan_dataset_for(cfg)


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------

@pytest.mark.failure_case("EXIF-rotated image")
def test_exif_rotated_jpeg_swaps_size_and_loads_upright(tmp_path):
    # Stored landscape: left half red, right half blue. Orientation 6 means
    # "rotate 90 degrees clockwise to display", so upright it is portrait with red on top.
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste((0, 0, 255), (64, 0, 128, 64))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    item = scan(tmp_path, trigger_word="sks").items[0]
    assert (item.width, item.height) == (64, 128)
    bw, bh = item.bucket
    assert bh > bw
    t = load_image(item.path, item.bucket)
    assert t.shape == (3, bh, bw)
    top, bottom = t[:, 2, bw // 2], t[:, bh - 3, bw // 2]
    assert top[0] > 0.8 and top[2] < -0.8, "red on top"
    assert bottom[2] > 0.8 and bottom[0] < -0.8, "blue at the bottom"


def _saved(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


@pytest.mark.failure_case("grayscale, RGBA, CMYK, 16-bit and palette images")
def test_every_colour_mode_loads_as_rgb_in_range(tmp_path):
    size = (32, 32)
    p_img = Image.new("P", size, 1)
    p_img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p_trans = Image.new("P", size, 0)
    p_trans.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    cases = {
        # name: (file, expected RGB in [-1, 1])
        "rgba_transparent": (_saved(tmp_path / "rgba.png", Image.new("RGBA", size, (0, 0, 0, 0))), (1, 1, 1)),
        "rgba_opaque": (_saved(tmp_path / "rgbo.png", Image.new("RGBA", size, (255, 0, 0, 255))), (1, -1, -1)),
        "la_transparent": (_saved(tmp_path / "la.png", Image.new("LA", size, (0, 0))), (1, 1, 1)),
        "la_opaque": (_saved(tmp_path / "lao.png", Image.new("LA", size, (0, 255))), (-1, -1, -1)),
        "p": (_saved(tmp_path / "p.png", p_img), (1, -1, -1)),
        "p_transparent": (_saved(tmp_path / "pt.png", p_trans, transparency=0), (1, 1, 1)),
        "l": (_saved(tmp_path / "l.png", Image.new("L", size, 0)), (-1, -1, -1)),
        "cmyk_cyan": (_saved(tmp_path / "cmyk.jpg", Image.new("CMYK", size, (255, 0, 0, 0)), quality=100), (-1, 1, 1)),
        "i16_mid_grey": (_saved(tmp_path / "i16.png", Image.new("I;16", size, 32768)), (0, 0, 0)),
        "i16_dark": (_saved(tmp_path / "i16d.png", Image.new("I;16", size, 6554)), (-0.8, -0.8, -0.8)),
    }
    for name, (path, want) in cases.items():
        t = load_image(path, (16, 32))
        assert t.dtype == torch.float32 and t.shape == (3, 32, 16), name
        assert t.min() >= -1 and t.max() <= 1, name
        got = t.mean(dim=(1, 2))
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float32), atol=0.03), (name, got.tolist())


@pytest.mark.failure_case("grayscale, RGBA, CMYK, 16-bit and palette images")
def test_sixteen_bit_grey_gradient_is_not_clipped(tmp_path):
    img = Image.new("I;16", (256, 16))
    img.putdata([x * 256 for x in range(256)] * 16)
    t = load_image(_saved(tmp_path / "g.png", img), (256, 16))
    row = t[0, 8]
    assert row[0] < -0.99 and row[-1] > 0.98
    assert (row[1:] - row[:-1]).min() > -1e-3, "monotonic ramp, no clipping plateau"
    assert abs(row[128].item()) < 0.02


def test_load_image_covers_the_bucket_and_crops_the_centre(tmp_path):
    # 3 vertical stripes: red | green | blue; a square bucket keeps the green middle.
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    img.paste((0, 255, 0), (100, 0, 200, 100))
    img.paste((0, 0, 255), (200, 0, 300, 100))
    t = load_image(_saved(tmp_path / "s.png", img), (64, 64))
    assert t.shape == (3, 64, 64)
    assert t[1, :, 8:56].min() > 0.9 and t[0, :, 8:56].max() < -0.9


def test_flip_mirrors_left_right(tmp_path):
    img = Image.new("RGB", (64, 64), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 64, 64))
    path = _saved(tmp_path / "h.png", img)
    plain, flipped = load_image(path, (64, 64)), load_image(path, (64, 64), flip=True)
    assert torch.equal(flipped, plain.flip(-1))
    assert plain[0, 0, 0] > 0.9 and flipped[0, 0, 0] < -0.9


@pytest.mark.failure_case("corrupt image")
def test_load_image_on_a_corrupt_file_raises_dataset_error_naming_it(tmp_path):
    png = noise_bytes("PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(png[: len(png) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png is not a readable image .*re-save it as PNG/JPEG or remove it"):
        load_image(path, (64, 64))


# --------------------------------------------------------------------------
# scale
# --------------------------------------------------------------------------

@pytest.mark.failure_case("10,000 images")
def test_ten_thousand_tiny_images_scan_quickly(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    data = buf.getvalue()
    for i in range(10_000):
        (tmp_path / f"img{i:05d}.png").write_bytes(data)
    start = time.perf_counter()
    tracemalloc.start()
    report = scan(tmp_path, trigger_word="sks", resolution=64, max_upscale=100)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    elapsed = time.perf_counter() - start
    assert len(report.items) == 10_000
    assert peak < 32 * 2**20, f"the scan held {peak / 2**20:.0f} MiB"  # no pixels kept: about 1 KiB an image
    assert report.bucket_counts == {(64, 64): 10_000}
    assert len(report.summary().splitlines()) < 40, "the summary stays short with many warnings"
    assert elapsed < 30, f"scan took {elapsed:.1f}s"


def test_supported_extensions_constant():
    assert SUPPORTED_EXTENSIONS == (".png", ".jpg", ".jpeg", ".webp")
