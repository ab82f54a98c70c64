"""SDPA's attention kernels on FLUX.2's joint attention, forward and backward, one GPU.

Each family's attention at 1024x1024 (4096 image + 512 text tokens, batch 1, its head count,
head size 128, bf16), timed with CUDA events, median of `--repeats` after warm-up:
FlashAttention 2 ("flash"), cuDNN ("cudnn"), memory-efficient ("efficient"), and
FlashAttention 4 ("fa4": the `flash-attn-4` package behind SDPA's FlashAttention
kernel, Hopper and Blackwell) where it is installed. The outputs and gradients of each
kernel are compared with cuDNN's where cuDNN runs first (the default order).

    python3 bench/attention_speed.py --families klein-4b klein-9b dev

FLOPs: 4 x tokens^2 x heads x 128 forward (QK^T and PV), 2.5 times that backward.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flux2_train.model import KNOWN_FAMILIES  # noqa: E402
from flux2_train.speed import attention_implementation, attention_kernels  # noqa: E402
from timing import median_ms  # noqa: E402

HEAD_DIM = 128


def measure(kernel: str, heads: int, tokens: int, repeats: int, reference: dict | None) -> tuple[dict, dict]:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
               .requires_grad_() for _ in range(3))
    grad = torch.randn(1, heads, tokens, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=gen)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with attention_implementation(kernel, device), attention_kernels(kernel, device):
        out = sdpa(q, k, v)
        out.backward(grad)
        result = dict(out=out.detach(), grads=[t.grad.detach().clone() for t in (q, k, v)])
        forward = median_ms(lambda: sdpa(q, k, v), repeats, warmup=3)

        def both():
            q.grad = k.grad = v.grad = None
            sdpa(q, k, v).backward(grad)

        forward_backward = median_ms(both, repeats, warmup=3)
    flops = 4 * tokens * tokens * heads * HEAD_DIM
    row = dict(kernel=kernel, heads=heads, tokens=tokens, forward_ms=round(forward, 3),
               backward_ms=round(forward_backward - forward, 3), step_ms=round(forward_backward, 3),
               forward_tflops=round(flops / forward / 1e9, 1),
               backward_tflops=round(2.5 * flops / (forward_backward - forward) / 1e9, 1))
    if reference is not None:
        row["max_abs_diff_out"] = float((result["out"] - reference["out"]).abs().max())
        row["max_abs_diff_grads"] = [float((a - b).abs().max()) for a, b in zip(result["grads"], reference["grads"])]
    return row, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["klein-4b", "klein-9b", "dev"])
    parser.add_argument("--kernels", nargs="+", default=["cudnn", "flash", "efficient", "fa4"])
    parser.add_argument("--tokens", type=int, default=4096 + 512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for family in args.families:
        heads = KNOWN_FAMILIES[family]["num_attention_heads"]
        reference = None
        for kernel in args.kernels:
            try:
                row, result = measure(kernel, heads, args.tokens, args.repeats, reference)
            except Exception as e:  # a kernel this GPU or install lacks: say so, time the others
                print(f"| {family} | {kernel} | failed: {type(e).__name__}: {str(e)[:300]} |")
                continue
            if kernel == "cudnn":
                reference = result
            row["family"] = family
            rows.append(row)
            print(f"| {family} | {kernel} | fwd {row['forward_ms']:.2f} ms ({row['forward_tflops']} TFLOP/s) | "
                  f"bwd {row['backward_ms']:.2f} ms ({row['backward_tflops']} TFLOP/s) | "
                  f"fwd+bwd {row['step_ms']:.2f} ms | diff vs cudnn {row.get('max_abs_diff_out')} "
                  f"{row.get('max_abs_diff_grads')} |", flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "attention.json", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
