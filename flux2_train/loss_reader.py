"""Each step's loss, read by the host without stalling the GPU where that can be done safely.

Reading a loss on the host waits for the GPU to finish everything queued before it: the
whole backward pass. Between that wait and the next step's first kernels the GPU idles
while the host steps the optimizer, reports the step and prepares the next one.

Where the optimizer can skip its update on the device (torch's fused Adam/AdamW take a
`found_inf` flag, as GradScaler uses), a step's loss is read one step late instead, while
the GPU runs the next step. A loss that is not finite sets the flag for good: that update
and every later one are skipped on the device, so when the host reads the loss the weights
are still those of the step before it, as if it had been read at once.
"""

from __future__ import annotations

from collections import deque

import torch


def skips_updates_on_device(optimizer) -> bool:
    """Whether `optimizer` (or the one inside accelerate's wrapper) can skip a step on the device
    with nothing else setting its flag: torch's fused Adam/AdamW without a gradient scaler."""
    if getattr(optimizer, "scaler", None) is not None:  # fp16: the scaler sets found_inf itself
        return False
    inner = getattr(optimizer, "optimizer", optimizer)
    # Every group: a resumed optimizer state brings its groups' settings (a run saved unfused).
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups)


class LateLossReader:
    """The mean loss of each step, on the host one step after the step was queued."""

    def __init__(self, optimizer, device: torch.device):
        self.device = device
        self._bad = torch.zeros((), dtype=torch.float32, device=device)
        # The fused optimizer reads the flag on the device at every step.
        getattr(optimizer, "optimizer", optimizer).found_inf = self._bad
        self._micro: list[torch.Tensor] = []
        self._pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()

    def add(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss, queued before its step's optimizer update."""
        loss = loss.detach().float()
        torch.maximum(self._bad, (~torch.isfinite(loss)).float(), out=self._bad)  # 0 or 1, as the optimizer reads it
        self._micro.append(loss)

    def end_step(self, step: int) -> None:
        """Start copying the mean loss of `step` (all its micro-batches) to the host."""
        mean = torch.stack(self._micro).mean() if len(self._micro) > 1 else self._micro[0]
        self._micro = []
        if self.device.type == "cuda":
            host = torch.empty((), dtype=torch.float32, pin_memory=True)
            host.copy_(mean, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the run's GPU, which may not be the current one
            self._pending.append((step, host, event))
        else:
            self._pending.append((step, mean, None))

    def oldest(self) -> int | None:
        """The oldest step not read yet, or None."""
        return self._pending[0][0] if self._pending else None

    def read(self) -> tuple[int, float]:
        """(step, mean loss) of the oldest step not read yet; waits for the GPU to reach its end."""
        step, value, event = self._pending.popleft()
        if event is not None:
            event.synchronize()
        return step, float(value)

    def drop(self) -> None:
        """Forget what is queued (a run that stops on an error)."""
        self._micro, self._pending = [], deque()
