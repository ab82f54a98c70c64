"""The benchmark scripts' timer for a piece of work run many times."""

from __future__ import annotations

import statistics
import time

import torch


# About 3 ms of GPU time on an H100: longer than the host takes to queue a timed call's kernels.
_SLEEP_CYCLES = 5_000_000


def median_ms(fn, repeats: int, device: torch.device | str = "cuda", warmup: int = 0,
              gpu_only: bool = False) -> float:
    """The median milliseconds of `fn()` over `repeats` calls, after `warmup` calls left untimed.

    On a GPU, CUDA events recorded around each call and waited on before the next. The GPU is idle
    when the start event is recorded, so the time runs from the call's start on the host to its
    last kernel's end: the host's time to queue the kernels counts, as it does in a training step.
    `gpu_only` queues a sleep kernel first, so that the call's kernels are all queued before the GPU
    reaches them: the GPU's time alone (for kernels shorter than their launch). On the CPU, the
    host's clock.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if gpu_only:
                torch.cuda._sleep(_SLEEP_CYCLES)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)
