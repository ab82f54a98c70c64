"""Training events and their subscribers (console progress, JSONL metrics, tensorboard).

The loop emits; subscribers never steer the run. The ComfyUI node subscribes
the same way to forward events to the browser.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class StepEvent:
    step: int
    total: int
    loss: float
    smoothed_loss: float
    lr: float
    seconds_per_step: float
    eta_seconds: float
    peak_memory_bytes: int
    epoch: int

    kind: str = field(default="step", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StatusEvent:
    """Phase changes: caching, training, checkpoint, finished, cancelled, failed."""

    kind: str
    message: str
    step: int = 0
    total: int = 0
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Subscriber = Callable[[Any], None]


class EventBus:
    def __init__(self, subscribers: list[Subscriber] | None = None):
        self.subscribers: list[Subscriber] = list(subscribers or [])

    def subscribe(self, fn: Subscriber) -> None:
        self.subscribers.append(fn)

    def emit(self, event) -> None:
        for fn in self.subscribers:
            try:
                fn(event)
            except Exception:  # a broken display must not end a training run
                log.exception("event subscriber %r failed", fn)

    def close(self) -> None:
        for fn in self.subscribers:
            close = getattr(fn, "close", None)
            try:
                if close:
                    close()
            except Exception:  # e.g. a log file on a full disk: the run's own error is the one to show
                log.exception("event subscriber %r failed to close", fn)


class JsonlMetrics:
    """One JSON object per line in <run>/metrics.jsonl; appended on resume."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _drop_partial_line(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def __call__(self, event) -> None:
        d = event.to_dict() | {"time": round(time.time(), 3)}
        d = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}
        self._f.write(json.dumps(d) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a killed run left half-written, so appended lines stay whole."""
    if not path.is_file():
        return
    with open(path, "rb+") as f:
        end = f.seek(0, 2)
        pos = end
        while pos > 0:  # back to the last newline, a block at a time
            start = max(0, pos - 65536)
            f.seek(start)
            block = f.read(pos - start)
            cut = block.rfind(b"\n")
            if cut >= 0:
                if start + cut + 1 < end:
                    f.truncate(start + cut + 1)
                return
            pos = start
        f.truncate(0)


class ConsoleProgress:
    """A tqdm bar with loss, s/step and ETA; status lines above it."""

    def __init__(self, total: int, initial: int = 0):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def __call__(self, event) -> None:
        if isinstance(event, StepEvent):
            self.bar.n = event.step
            self.bar.set_postfix(loss=f"{event.smoothed_loss:.4f}", lr=f"{event.lr:.2e}",
                                 s_step=f"{event.seconds_per_step:.2f}", refresh=False)
            self.bar.refresh()
        elif event.kind in ("checkpoint", "finished", "cancelled", "failed", "training"):
            self.bar.write(f"[{event.kind}] {event.message}")

    def close(self) -> None:
        self.bar.close()


class TensorboardLogger:
    """Scalars (losses, validation loss, lr, s/step, memory, CLIP score) and preview images for
    tensorboard; only built when tensorboard is installed."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def __call__(self, event) -> None:
        if isinstance(event, StepEvent):
            self.writer.add_scalar("loss/train", event.loss, event.step)
            self.writer.add_scalar("loss/smoothed", event.smoothed_loss, event.step)
            self.writer.add_scalar("lr", event.lr, event.step)
            self.writer.add_scalar("seconds_per_step", event.seconds_per_step, event.step)
            self.writer.add_scalar("peak_memory_gib", event.peak_memory_bytes / 2**30, event.step)
        elif isinstance(event, StatusEvent) and event.kind == "validation":
            self.writer.add_scalar("loss/validation", event.data["validation_loss"], event.step)
        elif isinstance(event, StatusEvent) and event.kind == "preview":
            import numpy as np
            from PIL import Image

            for k, entry in enumerate(event.data["images"]):
                with Image.open(entry["path"]) as img:
                    self.writer.add_image(f"preview/{k}", np.asarray(img.convert("RGB")), event.step,
                                          dataformats="HWC")
                if entry.get("clip_score") is not None:
                    self.writer.add_scalar(f"clip_score/{k}", entry["clip_score"], event.step)

    def close(self) -> None:
        self.writer.close()


def tensorboard_logger(log_dir: str | Path) -> TensorboardLogger | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return TensorboardLogger(log_dir)
