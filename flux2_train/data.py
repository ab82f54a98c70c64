"""The dataset folder: images, captions, aspect buckets and image loading.

`scan_dataset` checks everything it can before a model is loaded, so a bad
file costs the user seconds instead of a failed run: every problem in the
folder is collected and raised as ONE `DatasetError` whose lines each name a
file and say what to do. Things that only lower quality (an upscale, an empty
caption file) become warnings on the report instead.

`load_image` turns one scanned image into the float tensor the VAE encodes.
It applies the same EXIF orientation the scan used, so an image always lands
in the bucket the scan chose for it.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ConfigError, DatasetError

if TYPE_CHECKING:  # torch is only needed by load_image; a scan stays light
    import torch

    from .config import TrainConfig

SUPPORTED_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")

# Files that look like images we cannot use get a warning instead of silence,
# so a folder of .heic photos does not silently train on half the set.
_OTHER_IMAGE_EXTENSIONS = frozenset(
    ".gif .bmp .tif .tiff .heic .heif .avif .jxl .jp2 .j2k .jfif .ico .tga .psd .dng "
    ".cr2 .cr3 .nef .arw .raf .orf .rw2 .exr .hdr .svg".split()
)
_MIN_RESOLUTION = 64  # the smallest --resolution TrainConfig accepts; never suggest less
_ORIENTATION = 0x0112  # EXIF tag
_CROP_WARNING = 0.15  # warn when the centre crop drops more than this share of an image
_MAX_LINES = 100  # problems listed in one error; the rest are counted
_MAX_SUMMARY_WARNINGS = 20
_READ_ADVICE = "re-save it as PNG/JPEG or remove it"
_DOWNSCALE_ADVICE = "downscale it (e.g. to 4096 px on the long side)"


@dataclass(frozen=True)
class ImageItem:
    """One usable image of the dataset, with everything training needs to know."""

    path: Path
    caption: str  # final caption (trigger rules applied)
    caption_source: str  # "file", "default" or "trigger"
    width: int  # size after EXIF orientation
    height: int
    bucket: tuple[int, int]  # (width, height) of its bucket


@dataclass
class DatasetReport:
    """The result of a successful scan: the items in file-name order and any warnings."""

    folder: Path
    items: list[ImageItem]
    warnings: list[str]
    resolution: int

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Images per bucket, buckets in sorted order."""
        counts = Counter(item.bucket for item in self.items)
        return dict(sorted(counts.items()))

    def summary(self, max_warnings: int | None = None) -> str:
        """A few human-readable lines: count, buckets, caption sources, warnings (the first
        `max_warnings`, default a screenful; 0 for all)."""
        shown = max_warnings if max_warnings is not None else _MAX_SUMMARY_WARNINGS
        n = len(self.items)
        lines = [f"{n} image{'s' if n != 1 else ''} in {self.folder} (resolution {self.resolution})"]
        lines.append("buckets:")
        lines += [f"  {w}x{h}: {c}" for (w, h), c in self.bucket_counts.items()]
        sources = Counter(item.caption_source for item in self.items)
        names = {"file": "from caption files", "default": "default caption", "trigger": "trigger word only"}
        lines.append("captions: " + ", ".join(f"{sources[s]} {names[s]}" for s in names if sources[s]))
        if self.warnings:
            lines.append(f"warnings ({len(self.warnings)}):")
            shown = shown or len(self.warnings)
            lines += [f"  - {w}" for w in self.warnings[:shown]]
            if len(self.warnings) > shown:
                lines.append(f"  ... and {len(self.warnings) - shown} more")
        return "\n".join(lines)


# --------------------------------------------------------------------------
# aspect buckets
# --------------------------------------------------------------------------


def bucket_sizes(resolution: int, max_aspect_ratio: float = 3.0) -> list[tuple[int, int]]:
    """All (width, height) buckets of about resolution**2 pixels, sorted.

    Sides are multiples of 16 (FLUX.2's VAE downsamples 8x and the transformer
    packs 2x2 latents), the area never exceeds resolution**2, and the long
    side is at most max_aspect_ratio times the short one. Each bucket is
    maximal: neither side can grow by 16 within the area bound, so every width
    has exactly one height. The set is symmetric and contains the square.
    """
    return list(_bucket_sizes(int(resolution), float(max_aspect_ratio)))


@lru_cache(maxsize=256)
def _bucket_sizes(resolution: int, max_aspect_ratio: float) -> tuple[tuple[int, int], ...]:
    if resolution < 16 or resolution % 16:
        raise ConfigError(f"--resolution must be a multiple of 16 (got {resolution}); try {max(_MIN_RESOLUTION, resolution // 16 * 16)}")
    if not max_aspect_ratio >= 1.0:
        raise ConfigError(f"--max-aspect-ratio must be at least 1 (got {max_aspect_ratio})")
    area = resolution * resolution
    found = set()
    # Walk the short side up to the square and mirror. Taking the largest
    # height for every width of both orientations instead would add
    # near-duplicate buckets (592x1728 next to 592x1760) that only split
    # batches; this way each width has one, maximal, height.
    for short in range(16, resolution + 1, 16):
        long = area // short // 16 * 16
        if long / short <= max_aspect_ratio:
            found.add((short, long))
            found.add((long, short))
    return tuple(sorted(found))


def assign_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to width/height in log space (ties: larger area).

    Log space makes 2:1 and 1:2 equally far from square, so portrait and
    landscape images are treated alike.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not buckets:
        raise ValueError("no buckets to choose from")
    target = math.log(width / height)
    # Rounding makes float noise count as a tie, so the larger bucket wins it.
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - target), 9), -b[0] * b[1]))


def _upscale(width: int, height: int, bucket: tuple[int, int]) -> float:
    """Scale that makes the image cover the bucket (what load_image will apply)."""
    return max(bucket[0] / width, bucket[1] / height)


def _suggest_resolution(width: int, height: int, resolution: int, max_aspect_ratio: float, max_upscale: float) -> int | None:
    """The largest smaller resolution at which this image needs no more than max_upscale, if any."""
    for r in range(resolution - 16, _MIN_RESOLUTION - 1, -16):
        bucket = assign_bucket(width, height, _bucket_sizes(r, max_aspect_ratio))
        if _upscale(width, height, bucket) <= max_upscale + 1e-9:
            return r
    return None


def _factor(x: float) -> str:
    # Round up so a reported upscale is never smaller than the real one.
    return f"{math.ceil(x * 100 - 1e-6) / 100:.2f}\u00d7"


# --------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------


class _Unreadable(Exception):
    """Internal: an image file failed a check; the message is the reason."""


def scan_dataset(
    folder: str | os.PathLike,
    *,
    caption_ext: str = ".txt",
    trigger_word: str = "",
    default_caption: str = "",
    prepend_trigger: bool = True,
    resolution: int = 1024,
    max_aspect_ratio: float = 3.0,
    max_upscale: float = 2.0,
) -> DatasetReport:
    """Check every image and caption in `folder` (not its sub-folders) and assign buckets.

    Raises one DatasetError listing every problem found; returns a report
    (items sorted by file name, plus warnings) when there are none.
    """
    folder_path = _check_folder(folder)
    buckets = _bucket_sizes(int(resolution), float(max_aspect_ratio))  # bad options fail before any file is read
    caption_ext = caption_ext.strip()
    if caption_ext and not caption_ext.startswith("."):
        caption_ext = "." + caption_ext
    trigger = _clean_text(trigger_word)
    default = _clean_text(default_caption)

    names, subfolders, broken = _list_folder(folder_path)
    images = sorted(n for n in names if _ext(n) in SUPPORTED_EXTENSIONS)
    broken_images = sorted(n for n in broken if _ext(n) in SUPPORTED_EXTENSIONS)
    if not images and not broken_images:
        raise DatasetError(_no_images_message(folder_path, names, subfolders))

    # Broken links take part in caption matching, so a.txt linking nowhere is
    # reported as such rather than as a missing caption.
    name_set = set(names) | set(broken)
    # Caption files are matched case-insensitively as a fallback, so a.TXT
    # works on Linux as it does on Windows and macOS.
    lower_names: dict[str, str] = {}
    for n in names + broken:
        lower_names.setdefault(n.lower(), n)

    # An image linking nowhere is an unreadable image: dropping it would train on less than the user gave.
    problems: list[str] = [_broken_link(folder_path, n) for n in broken_images]
    warns: list[str] = []
    uncaptioned: list[str] = []
    items: list[ImageItem] = []
    by_stem: dict[str, list[str]] = {}
    for n in images:
        by_stem.setdefault(os.path.splitext(n)[0], []).append(n)
    suggestions: dict[tuple[int, int], int | None] = {}

    with warnings.catch_warnings():
        # Pillow warns from 1x its pixel limit (89.5 MP), where real photos are
        # (a 102 MP camera frame is resized to its bucket like any other); its
        # error from 2x still stops bombs. Its global limit stays: ComfyUI shares it.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        for name in images:
            stem = os.path.splitext(name)[0]
            same_stem = by_stem[stem]
            if len(same_stem) > 1 and same_stem[0] == name:
                problems.append(
                    f"{' and '.join(same_stem)} share the name {stem!r}, so the caption {stem}{caption_ext} would be "
                    f"ambiguous: rename or remove all but one"
                )

            size = None
            try:
                size = _probe_image(folder_path / name)
            except Image.DecompressionBombError:
                problems.append(f"{name} is too large to open ({_bomb_reason()}): {_DOWNSCALE_ADVICE}")
            except Exception as e:  # Pillow raises many types for corrupt data
                problems.append(f"{name} is not a readable image ({_describe(e)}): {_READ_ADVICE}")

            caption, source = _caption_for(
                folder_path, name, stem, caption_ext, name_set, lower_names, trigger, default,
                problems, warns, uncaptioned,
            )
            if caption is not None and prepend_trigger and trigger and not _contains_word(caption, trigger):
                caption = f"{trigger}, {caption}"

            if size is None:
                continue
            w, h = size
            bucket = assign_bucket(w, h, buckets)
            scale = _upscale(w, h, bucket)
            bw, bh = bucket
            if scale > max_upscale + 1e-9:
                if size not in suggestions:
                    suggestions[size] = _suggest_resolution(w, h, int(resolution), float(max_aspect_ratio), max_upscale)
                r = suggestions[size]
                ratio = max(w, h) / min(w, h)
                if r:
                    fix = f"use a larger image or a lower resolution (e.g. {r})"
                elif ratio > max_aspect_ratio:  # the bucket's short side is what asks for the upscale
                    fix = (f"crop it nearer to square: its sides are {ratio:.0f}:1, and the widest bucket "
                           f"(--max-aspect-ratio {max_aspect_ratio:g}) needs its short side upscaled")
                else:
                    fix = f"use a larger image (it is too small even at resolution {_MIN_RESOLUTION})"
                problems.append(
                    f"{name} is {w}x{h}; at resolution {resolution} its bucket is {bw}x{bh}, an upscale of "
                    f"{_factor(scale)} (max {max_upscale:g}\u00d7): {fix}"
                )
                continue
            if scale > 1.0 + 1e-9:
                warns.append(f"{name} is {w}x{h} and is upscaled {_factor(scale)} to its bucket {bw}x{bh}; a larger image would be sharper")
            kept = (bw * bh) / (w * h * scale * scale)
            if 1.0 - kept > _CROP_WARNING:
                warns.append(
                    f"{name} is {w}x{h}; its bucket {bw}x{bh} crops away {round((1 - kept) * 100)}% of it "
                    f"(raise --max-aspect-ratio or crop it yourself to keep what matters)"
                )
            if caption is not None:
                items.append(ImageItem(folder_path / name, caption, source, w, h, bucket))

    if problems:
        err = DatasetError(_problems_message(folder_path, problems))
        err.problems = problems  # the full list, for callers that show it their own way
        raise err

    if uncaptioned:
        n = len(uncaptioned)
        fallback = "the default caption" if default else "the trigger word"
        example = f"{os.path.splitext(uncaptioned[0])[0]}{caption_ext}"
        # First, so a long list of per-image warnings cannot push it out of the summary.
        warns.insert(0, f"{n} image{'s have' if n != 1 else ' has'} no caption file and use{'' if n != 1 else 's'} "
                        f"{fallback} instead: {_short_list(uncaptioned)}; add a caption file of the same name "
                        f"({example}{' and so on' if n != 1 else ''}) to describe {'them' if n != 1 else 'it'}")
    image_stems = set(by_stem)
    orphans = sorted(n for n in names if caption_ext and n.lower().endswith(caption_ext.lower())
                     and n[: len(n) - len(caption_ext)] not in image_stems and _ext(n) not in SUPPORTED_EXTENSIONS)
    if orphans:
        warns.append(f"{len(orphans)} caption file(s) have no image of the same name and are ignored: {_short_list(orphans)}")
    others = Counter(_ext(n) for n in names if _ext(n) in _OTHER_IMAGE_EXTENSIONS)
    if others:
        found = ", ".join(f"{e} ({c})" for e, c in sorted(others.items()))
        warns.append(f"ignored {sum(others.values())} image file(s) in unsupported formats: {found}; convert them to PNG or JPEG to use them")
    if broken:  # those of images and captions were problems above; the rest are ignored, as their files would be
        warns.append(f"ignored {len(broken)} broken link(s) whose target does not exist: {_short_list(sorted(broken))}")
    return DatasetReport(folder=folder_path, items=items, warnings=warns, resolution=int(resolution))


def scan_dataset_for(cfg: "TrainConfig") -> DatasetReport:
    """scan_dataset with the folder, caption and bucket options of a TrainConfig."""
    return scan_dataset(
        cfg.dataset,
        caption_ext=cfg.caption_ext,
        trigger_word=cfg.trigger_word,
        default_caption=cfg.default_caption,
        prepend_trigger=cfg.prepend_trigger,
        resolution=cfg.resolution,
        max_aspect_ratio=cfg.max_aspect_ratio,
        max_upscale=cfg.max_upscale,
    )


def _check_folder(folder: str | os.PathLike) -> Path:
    # An empty string would become Path(".") and scan whatever the current folder is.
    if folder is None or not str(folder).strip():
        raise DatasetError("no dataset folder was given: set --dataset to the folder that holds the training images")
    path = Path(str(folder).strip()).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset folder {path} does not exist: check the path (it must be a folder of images)")
    if not path.is_dir():
        raise DatasetError(f"dataset path {path} is a file, not a folder: give the folder that holds the images")
    return path


def _list_folder(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """Visible regular files (symlinks followed), visible sub-folders and visible broken links of `folder`."""
    files, subfolders, broken = [], [], []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if entry.name.startswith("."):  # .DS_Store, editor swap files, ._ resource forks
                    continue
                try:
                    if entry.is_file():
                        files.append(entry.name)
                    elif entry.is_dir():
                        subfolders.append(entry.name)
                    elif entry.is_symlink():  # a link to nothing: reported, so no image goes missing unseen
                        broken.append(entry.name)
                except OSError:  # a link loop, or a file removed while listing
                    if os.path.islink(entry.path):
                        broken.append(entry.name)
    except OSError as e:
        raise DatasetError(f"dataset folder {folder} cannot be listed ({e.strerror or e}): check its permissions") from None
    return files, subfolders, broken


def _ext(name: str) -> str:
    return os.path.splitext(name)[1].lower()


def _no_images_message(folder: Path, names: list[str], subfolders: list[str]) -> str:
    msg = f"dataset folder {folder} has 0 images; supported: {' '.join(SUPPORTED_EXTENSIONS)}"
    if names:
        found = sorted({_ext(n) or "(no extension)" for n in names})
        msg += f" (found only: {', '.join(found)})"
    if subfolders:
        msg += f"; sub-folders are not searched, move the images into {folder} itself (found: {_short_list(sorted(subfolders))})"
    return msg


def _problems_message(folder: Path, problems: list[str]) -> str:
    n = len(problems)
    lines = [f"dataset folder {folder} has {n} problem{'s' if n != 1 else ''}; fix {'them' if n != 1 else 'it'} and scan again:"]
    lines += [f"  - {p}" for p in problems[:_MAX_LINES]]
    if n > _MAX_LINES:
        lines.append(f"  ... and {n - _MAX_LINES} more")
    return "\n".join(lines)


def _short_list(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _broken_link(folder: Path, name: str) -> str:
    try:
        target = os.readlink(folder / name)
    except OSError:
        return f"{name} is a broken link: restore the file it points to, or remove the link"
    return f"{name} is a broken link: its target {target} does not exist; restore it, or remove the link"


def _bomb_reason() -> str:
    # Pillow refuses from twice MAX_IMAGE_PIXELS; read it now, a caller may have changed it.
    limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return f"over {limit:,} pixels, Pillow's limit against decompression bombs"


def _describe(e: BaseException) -> str:
    """A short reason for a failed read, without Pillow's repetition of the full path."""
    if isinstance(e, _Unreadable):
        return str(e)
    if isinstance(e, UnidentifiedImageError):
        return "not an image file Pillow can identify"
    text = str(e)
    if "truncated" in text.lower():
        return "the file is truncated"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = text or type(e).__name__
    return text if len(text) <= 120 else text[:117] + "..."


def _probe_image(path: Path) -> tuple[int, int]:
    """The image's (width, height) after EXIF orientation; raises if the file is broken.

    Cheap on purpose: no full-size decode. JPEG is decoded at 1/8 scale, which
    still reads every byte and so catches truncation; PNG is checked by
    Pillow's verify (chunk CRCs up to IEND).
    """
    if path.stat().st_size == 0:
        raise _Unreadable("empty file, 0 bytes")
    with Image.open(path) as img:
        width, height = img.size
        if img.format in ("JPEG", "MPO"):
            img.draft(img.mode, (max(1, width // 8), max(1, height // 8)))
            img.load()
        elif img.format != "PNG":  # WebP (and anything mislabelled) has no verify: decode it
            img.load()
        orientation = _orientation(img, path)
    with Image.open(path) as img:  # verify() leaves the image unusable, hence a second open
        img.verify()
    if width <= 0 or height <= 0:
        raise _Unreadable(f"it declares a size of {width}x{height}")
    if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
        width, height = height, width
    return width, height


def _orientation(img: Image.Image, path: Path) -> int:
    """The EXIF orientation (1-8), 1 when absent or unreadable."""
    try:
        if img.format == "PNG" and "exif" not in img.info:
            # Pillow's PNG getexif() decodes the whole image to look for an eXIf
            # chunk after the pixel data; look for the chunk name first.
            if b"eXIf" not in path.read_bytes():
                return 1
            img.load()
        value = img.getexif().get(_ORIENTATION, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    except Exception:  # broken EXIF is not a broken image; exif_transpose then also does nothing
        return 1


def _clean_text(text: str | None) -> str:
    """Strip, and join lines with spaces: a caption is one prompt line."""
    if not text:
        return ""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def _contains_word(text: str, word: str) -> bool:
    # Look-arounds instead of \b so triggers like "<sks>" or "ohwx-man" also match as whole words.
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def _caption_for(
    folder: Path,
    image: str,
    stem: str,
    caption_ext: str,
    name_set: set[str],
    lower_names: dict[str, str],
    trigger: str,
    default: str,
    problems: list[str],
    warns: list[str],
    uncaptioned: list[str],
) -> tuple[str | None, str]:
    """The image's caption and its source, or (None, "") after adding a problem.

    An image without a caption file that falls back is added to `uncaptioned`,
    for one warning naming them all."""
    wanted = f"{stem}{caption_ext}"
    cap_name = wanted if wanted in name_set else lower_names.get(wanted.lower())
    if cap_name is not None and _ext(cap_name) in SUPPORTED_EXTENSIONS:
        cap_name = None  # a caption extension equal to an image extension would read the image
    empty_file = False
    if cap_name is not None:
        try:
            data = (folder / cap_name).read_bytes()
        except OSError as e:
            if os.path.islink(folder / cap_name) and not (folder / cap_name).exists():
                problems.append(f"caption {_broken_link(folder, cap_name)}")
            else:
                problems.append(f"caption {cap_name} cannot be read ({e.strerror or e}): check its permissions")
            return None, ""
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            hint = " (it is UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
            problems.append(f"caption {cap_name} is not UTF-8 text{hint}: re-save it as UTF-8")
            return None, ""
        caption = _clean_text(text)
        if caption:
            return caption, "file"
        empty_file = True
        if default or trigger:  # without a fallback this is a problem below, not a warning
            fallback = "the default caption" if default else "the trigger word"
            warns.append(f"caption {cap_name} is empty; {image} uses {fallback} instead")
    if (default or trigger) and not empty_file:
        uncaptioned.append(image)
    if default:
        return default, "default"
    if trigger:
        return trigger, "trigger"
    if empty_file:
        problems.append(f"{image} has an empty caption file {cap_name}: write its caption there, or set a trigger word or default caption")
    else:
        problems.append(f"{image} has no caption: add {wanted}, or set a trigger word or default caption")
    return None, ""


# --------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------

_HIGH_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(path: str | os.PathLike, bucket: tuple[int, int], flip: bool = False) -> "torch.Tensor":
    """Decode an image to a float32 (3, height, width) tensor in [-1, 1] sized to `bucket`.

    EXIF orientation is applied, any colour mode becomes RGB (transparency
    over white, embedded ICC profiles to sRGB, 16-bit grey kept at full
    range), the image is scaled with LANCZOS to cover the bucket and
    centre-cropped, then mirrored left-right when `flip` is set.
    """
    import torch

    path = Path(path)
    bw, bh = int(bucket[0]), int(bucket[1])
    if bw <= 0 or bh <= 0:
        raise ValueError(f"bucket must be a positive (width, height), got {bucket}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # accepted by the scan, see there
            with Image.open(path) as img:
                img.load()
                img = _exif_transposed(img)
                img, full_scale = _to_rgb(img)
        w, h = img.size
        scale = _upscale(w, h, (bw, bh))
        # Resizing only the centred source box that covers the bucket is the
        # cover-resize plus centre-crop in one step, without rounding the
        # intermediate size and without resampling pixels that get cropped.
        cw, ch = bw / scale, bh / scale
        left, top = (w - cw) / 2, (h - ch) / 2
        img = img.resize((bw, bh), Image.Resampling.LANCZOS, box=(left, top, left + cw, top + ch))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        raw = bytearray(img.tobytes())
        mode = img.mode
    except Image.DecompressionBombError:
        raise DatasetError(f"{path} is too large to open ({_bomb_reason()}): {_DOWNSCALE_ADVICE}") from None
    except Exception as e:  # Pillow raises many types for corrupt data
        raise DatasetError(f"{path} is not a readable image ({_describe(e)}): {_READ_ADVICE}") from None

    if mode == "F":
        t = torch.frombuffer(raw, dtype=torch.float32).view(1, bh, bw).expand(3, bh, bw)
    else:
        t = torch.frombuffer(raw, dtype=torch.uint8).view(bh, bw, 3).permute(2, 0, 1)
    # LANCZOS overshoots at edges in float mode; clamp keeps the promised range.
    return (t.float() * (2.0 / full_scale) - 1.0).clamp_(-1.0, 1.0).contiguous()


def _exif_transposed(img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # broken EXIF: the scan measured it unrotated too (see _orientation)
        return img


def _to_rgb(img: Image.Image) -> tuple[Image.Image, float]:
    """An "RGB" image (8-bit, full scale 255) or, for 16-bit grey, an "F" image (full scale 65535)."""
    mode = img.mode
    if mode in _HIGH_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255, so everything above 1/256
        # of full scale would turn white; keep the whole range as float.
        return img.convert("I").convert("F"), 65535.0
    if mode == "F":
        return img, 255.0
    img = _to_srgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        # Transparent pixels keep arbitrary colour values (often black); show
        # them over white, as viewers do, instead of training on hidden colour.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), 255.0
    return (img if img.mode == "RGB" else img.convert("RGB")), 255.0


def _to_srgb(img: Image.Image) -> Image.Image:
    """Apply an embedded ICC profile (CMYK print profiles, Display P3 photos); unchanged without one."""
    icc = img.info.get("icc_profile")
    if not icc or img.mode not in ("RGB", "RGBA", "CMYK"):
        return img
    try:
        from PIL import ImageCms

        out_mode = "RGBA" if img.mode == "RGBA" else "RGB"
        src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        converted = ImageCms.profileToProfile(img, src, _srgb_profile(), outputMode=out_mode)
        return converted if converted is not None else img
    except Exception:  # a broken profile or no littlecms: the plain conversion is still usable
        return img


@lru_cache(maxsize=1)
def _srgb_profile():
    from PIL import ImageCms

    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
