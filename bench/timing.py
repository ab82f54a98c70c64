"""The benchmark scripts' timer for a piece of work run many times."""

from __future__ import annotations

import statistics
import time

import torch


def median_ms(fn, repeats: int, device: torch.device | str = "cuda", warmup: int = 0) -> float:
    """The median milliseconds of `fn()` over `repeats` calls, after `warmup` calls left untimed.

    On a GPU, CUDA events recorded around each call and waited on before the next: the time from
    the call's first queued kernel to its last finished one, any wait for the host in between
    included. On the CPU, the host's clock.
    """
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
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
