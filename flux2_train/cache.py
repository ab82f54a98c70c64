"""On-disk cache of VAE latents and text embeddings (safetensors).

A latent is keyed by the image file's content, its bucket, the flip and the
VAE's identity; a text embedding by the caption, the token length and the
text encoder's identity. Each file records its key and a hash of its tensor;
a file that fails either check is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .data import DatasetReport, load_image
from .encoders import FeatureEncoder
from .errors import DatasetError
from .fsutil import save_safetensors_atomic

log = logging.getLogger(__name__)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _key(*parts) -> str:
    return hashlib.sha256("|".join(str(p) for p in parts).encode()).hexdigest()


def _tensor_hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class FeatureCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / key[:2] / f"{key}.safetensors"

    def get(self, kind: str, key: str) -> torch.Tensor | None:
        path = self._path(kind, key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                t = f.get_tensor("value").clone()  # not backed by the file's memory map
            if meta.get("key") != key or meta.get("sha256") != _tensor_hash(t):
                raise ValueError("key or content hash does not match")
            return t
        except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as e:
            log.warning("cache file %s failed its check (%s); rebuilding it", path, e)
            path.unlink(missing_ok=True)
            return None

    def put(self, kind: str, key: str, value: torch.Tensor) -> None:
        value = value.detach().contiguous().cpu()
        save_safetensors_atomic({"value": value}, self._path(kind, key),
                                metadata={"key": key, "sha256": _tensor_hash(value)})

    def load(self, kind: str, key: str) -> torch.Tensor:
        """A cached tensor that `prepare_cache` verified in this run: read once, not hashed again."""
        try:
            return load_file(str(self._path(kind, key)))["value"].clone()
        except (SafetensorError, OSError, KeyError):
            raise DatasetError(f"cached {kind} {key[:12]} vanished or was damaged during training; "
                               "run again to rebuild the cache") from None


@dataclass(frozen=True)
class Sample:
    """One training image, as cache keys."""

    path: Path
    caption: str
    bucket: tuple[int, int]
    latent_keys: tuple[str, ...]  # (plain,) or (plain, mirrored)
    text_key: str
    file_sha256: str
    file_stat: tuple[int, int]  # (size, mtime_ns) when cached: a cheap per-step change check


@dataclass
class CachedDataset:
    samples: list[Sample]
    empty_text_key: str  # embedding of "" for caption dropout
    cache: FeatureCache

    @property
    def buckets(self) -> list[tuple[int, int]]:
        return sorted({s.bucket for s in self.samples})


def prepare_cache(
    report: DatasetReport,
    encoder: FeatureEncoder,
    cache: FeatureCache,
    *,
    max_sequence_length: int,
    flip: bool,
    on_progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    share: tuple[int, int] = (0, 1),
) -> CachedDataset:
    """Encode every image and caption not yet cached; returns the keys the loop reads.

    With `share=(rank, processes)` only every processes-th image from `rank` on is looked at
    (the processes of a multi-GPU run split the encoding), and the result holds those alone.
    """
    rank, processes = share
    vae_id = getattr(encoder, "vae_identity", encoder.identity)
    text_id = getattr(encoder, "text_identity", encoder.identity)
    samples: list[Sample] = []
    total = len(report.items)
    truncated = []
    for i, item in enumerate(report.items):
        if i % processes != rank:
            continue
        if should_stop and should_stop():
            from .errors import TrainingCancelled

            raise TrainingCancelled("cancelled while caching; nothing was trained yet, the cache built so far is kept",
                                    step=0, checkpoint=None)
        sha = file_sha256(item.path)
        flips = (False, True) if flip else (False,)
        keys = tuple(_key("latent", sha, item.bucket, f, vae_id) for f in flips)
        for f, key in zip(flips, keys):
            if cache.get("latents", key) is None:
                pixels = load_image(item.path, item.bucket, flip=f).unsqueeze(0)
                cache.put("latents", key, encoder.encode_images(pixels)[0].float())
        tkey = _key("text", item.caption, max_sequence_length, text_id)
        if cache.get("text", tkey) is None:
            if hasattr(encoder, "caption_tokens") and encoder.caption_tokens(item.caption) > max_sequence_length:
                truncated.append(item.path.name)
            cache.put("text", tkey, encoder.encode_text([item.caption], max_sequence_length)[0])
        st = item.path.stat()
        samples.append(Sample(item.path, item.caption, item.bucket, keys, tkey, sha, (st.st_size, st.st_mtime_ns)))
        if on_progress:
            on_progress(i + 1, total, item.path.name)
    if truncated:
        log.warning("%d caption(s) are longer than %d tokens and were truncated: %s",
                    len(truncated), max_sequence_length, ", ".join(truncated[:5]))
    empty_key = _key("text", "", max_sequence_length, text_id)
    if rank == 0 and cache.get("text", empty_key) is None:
        cache.put("text", empty_key, encoder.encode_text([""], max_sequence_length)[0])
    return CachedDataset(samples, empty_key, cache)


def check_unchanged(sample: Sample) -> None:
    """Refuse to train on an image that changed after it was cached."""
    try:
        st = sample.path.stat()
    except OSError:
        st = None
    if st is not None and (st.st_size, st.st_mtime_ns) == sample.file_stat:
        return
    if st is None or file_sha256(sample.path) != sample.file_sha256:
        raise DatasetError(f"{sample.path} changed or disappeared after it was cached; "
                           "run again (resume works) so it is re-encoded")

