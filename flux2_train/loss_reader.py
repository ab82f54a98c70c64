"""Each step's loss, read by the host without stalling the GPU where that can be done safely.

Reading a loss on the host waits for the GPU to finish everything queued before it: the
whole backward pass. Between that wait and the next step's first kernels the GPU idles
while the host steps the optimizer, reports the step and prepares the next one.

Where the optimizer can skip its update on the device (torch's fused Adam/AdamW take a
`found_inf` flag, as GradScaler uses), a step's loss is read one step late instead, while
the GPU runs the next step. A loss that is not finite sets the flag for good: that update
and every later one are skipped on the device, so when the host reads the loss the weights
are still those of the step before it, as if it had been read at once.

Several processes must skip the same updates and stop at the same step. Before each update
their flags are all-reduced on the device (one process's NaN skips every process's update);
after it, one all-reduce carries the sum of their losses, how many saw one that is not
finite and how many were asked to stop. Every process reads it at the same point of the loop,
so they agree, and on GPUs (NCCL) the host does not wait on a collective.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch


def skips_updates_on_device(optimizer) -> bool:
    """Whether `optimizer` (or the one inside accelerate's wrapper) can skip a step on the device
    with nothing else setting its flag: torch's fused Adam/AdamW without a gradient scaler."""
    if getattr(optimizer, "scaler", None) is not None:  # fp16: the scaler sets found_inf itself
        return False
    inner = getattr(optimizer, "optimizer", optimizer)
    # Every group: a resumed optimizer state brings its groups' settings (a run saved unfused).
    return isinstance(inner, torch.optim.Adam | torch.optim.AdamW) and all(g.get("fused") for g in inner.param_groups)


class StepLoss(NamedTuple):
    """A step's loss as the host reads it, with what the processes agreed on at that step."""

    step: int
    loss: float  # the mean over the step's micro-batches (and over the processes)
    not_finite_on: int  # how many processes saw a loss that is not finite
    stop_asked: bool  # whether any process was asked to stop


class LateLossReader:
    """The mean loss of each step, on the host one step after the step was queued."""

    def __init__(self, optimizer, device: torch.device, processes: int = 1):
        self.device = device
        self.processes = processes
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

    def agree(self) -> None:
        """Before an update: each process skips it where any process's flag is set."""
        if self.processes > 1:
            torch.distributed.all_reduce(self._bad, op=torch.distributed.ReduceOp.MAX)

    def end_step(self, step: int, stop_asked: bool = False) -> None:
        """Start copying the mean loss of `step` (all its micro-batches) to the host."""
        mean = torch.stack(self._micro).mean() if len(self._micro) > 1 else self._micro[0]
        self._micro = []
        # [loss, not finite here, stop asked here]; filled on the device, so the host does not wait.
        packed = torch.stack([mean, (~torch.isfinite(mean)).float(), mean.new_full((), float(stop_asked))])
        if self.processes > 1:
            torch.distributed.all_reduce(packed)
        if self.device.type == "cuda":
            host = torch.empty(3, dtype=torch.float32, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))  # the run's GPU, which may not be the current one
            self._pending.append((step, host, event))
        else:
            self._pending.append((step, packed, None))

    def oldest(self) -> int | None:
        """The oldest step not read yet, or None."""
        return self._pending[0][0] if self._pending else None

    def read(self) -> StepLoss:
        """The oldest step not read yet; waits for the GPU to reach its end."""
        step, packed, event = self._pending.popleft()
        if event is not None:
            event.synchronize()
        total, not_finite_on, stop_asked = packed.tolist()
        return StepLoss(step, total / self.processes, int(not_finite_on), stop_asked > 0)

    def drop(self) -> None:
        """Forget what is queued (a run that stops on an error)."""
        self._micro, self._pending = [], deque()
