"""The benchmark's own diagnostics: where the GPU idles in a profile, the host's time per part of the loop,
the LoRA-cost variants agreeing with PEFT's forward, and the layers the step floor times."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.autograd import DeviceType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from train_speed import HostTimes, gpu_idle  # noqa: E402


def activity(start: float, end: float, name: str, device=DeviceType.CUDA):
    return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), name=name, device_type=device)


def test_gpu_idle_merges_overlapping_kernels_and_names_the_largest_gap():
    events = [activity(0, 10, "a"), activity(2, 12, "b"), activity(15, 20, "c"), activity(200, 210, "d"),
              activity(0, 500, "a host op", DeviceType.CPU)]  # host time is not GPU time
    text = gpu_idle(events, steps=1).splitlines()
    # busy 12 + 5 + 10 us of a 210 us window; gaps of 3 us (b -> c) and 180 us (c -> d)
    assert text[0] == "GPU busy 0.0 ms of 0.2 ms per step (87.1% idle, 4 GPU activities per step)"
    assert "gaps 0-5 us: 1 per step" in text[1] and "gaps 100-inf us: 1 per step, 0.18 ms" in text[4]
    assert text[6].split() == ["180", "c", "->", "d"] and text[7].split() == ["3", "b", "->", "c"]
    assert gpu_idle([activity(0, 5, "x", DeviceType.CPU)], steps=1) == "no GPU activity recorded"


def test_host_times_count_between_the_warm_up_and_the_last_step_and_put_the_calls_back():
    original_clip, original_backward = torch.nn.utils.clip_grad_norm_, torch.autograd.backward
    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([p])

    def step():
        (p * 2).sum().backward()  # through torch.autograd.backward
        torch.nn.utils.clip_grad_norm_([p], 1.0)
        optimizer.step()
        optimizer.zero_grad()

    with pytest.raises(RuntimeError, match="stop"), HostTimes(warmup=2) as times:
        step()  # during the warm-up: not counted
        times.step(2, total=5)
        step()
        step()
        times.step(4, total=5)
        step()  # the last step's flush: not counted
        raise RuntimeError("stop")
    assert torch.nn.utils.clip_grad_norm_ is original_clip and torch.autograd.backward is original_backward
    counted = {name: len(ts) for name, ts in times.spent.items() if ts}
    assert counted == {"queue the backward pass": 2, "clip the gradients": 2, "optimizer step": 2}
    assert set(times.report("tiny")) == set(counted)
    times.counting = True
    optimizer.step()  # the step hooks are gone too
    assert len(times.spent["optimizer step"]) == 2


def test_compare_says_which_targets_a_run_meets_and_by_how_much_it_misses():
    from compare import verdicts

    def row(tool, label, seconds, gib=60.0, **extra):
        return dict(tool=tool, label=label, median_s_per_step=seconds, peak_allocated_gib=gib, **extra)

    klein = [row("peer", "diffusers default targets + compile", 0.24), row("peer", "diffusers all block linears", 0.37),
             row("peer", "ComfyUI TrainLoraNode", 0.54), row("ours, engine (CLI)", "fp8", 0.16),
             row("ours, engine (CLI)", "nf4 capped", 0.10, memory_cap_gib=7.5)]  # a capped run is not the speed
    assert verdicts("klein-4b", klein) == [
        "target, engine: ≤ 0.15 s/step: 0.160 s: missed by 6.7%",
        "target, engine: ≥ 3.5× ComfyUI TrainLoraNode: 3.38× (ComfyUI TrainLoraNode): missed by 3.6%",
        "target, engine: ≥ 1.5× diffusers: 1.50× (diffusers default targets + compile): met",
    ]
    dev = [row("peer", "diffusers default targets + compile, checkpointing", 1.6, gib=65.2),
           row("ours, engine (CLI)", "fp8", 0.97, gib=66.0), row("ours, ComfyUI node", "fp8", 0.99)]
    assert verdicts("dev", dev) == [
        "target, engine: ≤ 1.0 s/step: 0.970 s: met",
        "target, ComfyUI node: ≤ 1.0 s/step: 0.990 s: met",
        "target, engine: ≥ 1.5× the fastest peer at no more memory: "
        "1.65× (diffusers default targets + compile, checkpointing, at more memory): missed",
    ]
    assert verdicts("klein-9b", [row("ours, engine (CLI)", "fp8", None, status="oom")]) == [
        "target, engine: ≤ 0.3 s/step: not measured"]


def test_lora_cost_variants_give_peft_forwards_output_and_gradients(capsys):
    """A CPU smoke run of bench/lora_cost.py: each adapter variant, compiled, is checked against PEFT's forward."""
    import lora_cost

    assert lora_cost.main(["--device", "cpu", "--shrink", "32", "--repeat", "1",
                           "--shape", "[klein] 4B single-block input (3072 → 27648)"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].split("|")
    assert len(row) == 14 and row[1].strip().startswith("[klein] 4B single-block input")
    # The adapter inside the fp8 product is fp8 too: near PEFT's forward, not equal (out, grad x, A, B).
    out, grad_x, grad_a, grad_b = (float(v.strip(" %")) / 100 for v in row[-2].split(","))
    assert max(out, grad_x, grad_b) < 0.03 and grad_a < 0.1, row[-2]


def test_the_step_floor_counts_the_fp8_products_a_klein_4b_step_runs():
    """bench/step_floor.py's layer list from the real model class: 100 forward products (12 Linears in each
    of 5 double blocks, 2 in each of 20 single blocks), and the 94 input gradients a profiled step runs
    (the first block's image and text q/k/v read only the frozen embedders)."""
    from step_floor import IMAGE_TOKENS, TEXT_TOKENS, block_matmuls

    forward, backward = block_matmuls("klein-4b")
    assert sum(forward.values()) == 100 and sum(backward.values()) == 94
    assert forward[(IMAGE_TOKENS + TEXT_TOKENS, 3072, 27648)] == 20 and forward[(TEXT_TOKENS, 3072, 3072)] == 20
    assert backward[(IMAGE_TOKENS, 3072, 3072)] == backward[(TEXT_TOKENS, 3072, 3072)] == 17
