"""SDPA's attention kernels on FLUX.2's joint attention, forward and backward, one GPU.

Each family's attention at 1024x1024 (4096 image + 512 text tokens, batch 1, its head count,
head size 128, bf16), timed with CUDA events, median of `--repeats` after warm-up:
FlashAttention 2 ("flash"), cuDNN ("cudnn"), memory-efficient ("efficient"), and
FlashAttention 4 ("fa4": the `flash-attn-4` package behind SDPA's FlashAttention
kernel, Hopper and Blackwell) where it is installed; and cuDNN's fp8 kernels ("cudnn-fp8",
`cudnn_fp8_attention.py`; the `nvidia-cudnn-frontend` package), timed alone and apart from the
quantization of their inputs. The outputs and gradients of each kernel are compared with
cuDNN's where cuDNN runs first (the default order): the largest difference and the relative
one (the difference's norm over cuDNN's).

    python3 bench/attention_speed.py --families klein-4b klein-9b dev

`--qk-std` scales the random queries and keys: 3 gives each query's attention a few keys, as a
trained model's often does (the scores' spread is 9 instead of 1).

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


def measure(kernel: str, heads: int, tokens: int, repeats: int, reference: dict | None,
            qk_std: float = 1.0) -> tuple[dict, dict]:
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (1, heads, tokens, HEAD_DIM)
    q, k, v = (torch.randn(shape, device=device, generator=gen).mul(std).bfloat16().requires_grad_()
               for std in (qk_std, qk_std, 1.0))
    grad = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
    flops = 4 * tokens * tokens * heads * HEAD_DIM
    if kernel == "cudnn-fp8":
        from cudnn_fp8_attention import CudnnFp8Attention  # noqa: PLC0415 - an optional package

        timed = CudnnFp8Attention(shape, device).run(q.detach(), k.detach(), v.detach(), grad, repeats, median_ms)
        result = dict(out=timed["out"], grads=timed["grads"])
        row = dict(kernel=kernel, heads=heads, tokens=tokens, forward_ms=round(timed["forward_ms"], 3),
                   backward_ms=round(timed["backward_ms"], 3),
                   step_ms=round(timed["forward_ms"] + timed["backward_ms"], 3),
                   quantize_ms=round(timed["quantize_ms"], 3),
                   forward_tflops=round(flops / timed["forward_ms"] / 1e9, 1),
                   backward_tflops=round(2.5 * flops / timed["backward_ms"] / 1e9, 1))
        return _compared(row, result, reference), result
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
    row = dict(kernel=kernel, heads=heads, tokens=tokens, forward_ms=round(forward, 3),
               backward_ms=round(forward_backward - forward, 3), step_ms=round(forward_backward, 3),
               forward_tflops=round(flops / forward / 1e9, 1),
               backward_tflops=round(2.5 * flops / (forward_backward - forward) / 1e9, 1))
    return _compared(row, result, reference), result


def _compared(row: dict, result: dict, reference: dict | None) -> dict:
    if reference is None:
        return row
    pairs = [(result["out"], reference["out"]), *zip(result["grads"], reference["grads"])]
    diffs = [float((a.float() - b.float()).abs().max()) for a, b in pairs]
    relative = [round(float((a.float() - b.float()).norm() / b.float().norm()), 5) for a, b in pairs]
    row.update(max_abs_diff_out=diffs[0], max_abs_diff_grads=diffs[1:],
               relative_diff_out=relative[0], relative_diff_grads=relative[1:])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=["klein-4b", "klein-9b", "dev"])
    parser.add_argument("--kernels", nargs="+", default=["cudnn", "flash", "efficient", "fa4"])
    parser.add_argument("--tokens", type=int, default=4096 + 512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--qk-std", type=float, default=1.0, help="the random queries' and keys' spread")
    args = parser.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows = []
    for family in args.families:
        heads = KNOWN_FAMILIES[family]["num_attention_heads"]
        reference = None
        for kernel in args.kernels:
            try:
                row, result = measure(kernel, heads, args.tokens, args.repeats, reference, args.qk_std)
            except Exception as e:  # a kernel this GPU or install lacks: say so, time the others
                print(f"| {family} | {kernel} | failed: {type(e).__name__}: {str(e)[:300]} |")
                continue
            if kernel == "cudnn":
                reference = result
            row.update(family=family, qk_std=args.qk_std)
            rows.append(row)
            print(f"| {family} | {kernel} | fwd {row['forward_ms']:.2f} ms ({row['forward_tflops']} TFLOP/s) | "
                  f"bwd {row['backward_ms']:.2f} ms ({row['backward_tflops']} TFLOP/s) | "
                  f"fwd+bwd {row['step_ms']:.2f} ms | diff vs cudnn {row.get('max_abs_diff_out')} "
                  f"{row.get('max_abs_diff_grads')}, relative {row.get('relative_diff_out')} "
                  f"{row.get('relative_diff_grads')} |", flush=True)
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "attention.json", "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
