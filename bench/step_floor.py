"""The kernels a training step cannot do without, timed alone: the floor under a step's time.

For one family at 1024x1024 (4096 image + 512 text tokens, batch 1) this times, on one GPU:
- every block Linear's fp8 matmuls as the engine issues them (`torch._scaled_mm`, e4m3, row
  scales, bf16 out): the forward product, and the backward product for the input's gradient
  (the layer's weight transposed, its scale folded into the gradient);
- the joint attention, forward and backward, with cuDNN's kernel through SDPA (as
  `bench/attention_speed.py` times it).
Each product is timed in runs of ten back to back, queued behind a sleep kernel so that the
host's launches do not count (a small product takes less time than its launch), with CUDA
events, the median of `--repeats` runs; each is counted as often as a step runs it, the layers
read from the real model class built on the meta device (`spec_linear_shapes`). The sum is what
a step of fp8 matmuls and cuDNN attention costs with nothing else in it: no LoRA, norms,
modulation, activations, quantization of inputs and gradients, optimizer or idle time. With
`--step S` it says how much of a step of S seconds that leaves for the rest.

    python3 bench/step_floor.py --family klein-4b --step 0.114
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attention_speed import measure as measure_attention  # noqa: E402
from flux2_train.model import KNOWN_FAMILIES, family_spec, spec_linear_shapes  # noqa: E402
from timing import median_ms  # noqa: E402

IMAGE_TOKENS, TEXT_TOKENS = 4096, 512
E4M3 = torch.float8_e4m3fn
BURST = 10  # products queued back to back per timed run


def block_matmuls(family: str) -> tuple[Counter, Counter]:
    """How many of each block Linear's products, keyed (tokens, in_features, out_features), a step
    runs forward, and backward for the input's gradient."""
    forward, backward = Counter(), Counter()
    for name, (k, n) in spec_linear_shapes(family_spec(family)).items():
        if name.startswith("single_transformer_blocks."):
            tokens, needs_input_grad = IMAGE_TOKENS + TEXT_TOKENS, True
        elif name.startswith("transformer_blocks."):  # double blocks: image and text streams apart
            text = "add_" in name or "ff_context" in name
            tokens = TEXT_TOKENS if text else IMAGE_TOKENS
            # The first block's q/k/v read the frozen embedders' output alone: no input gradient.
            needs_input_grad = not (name.startswith("transformer_blocks.0.")
                                    and name.endswith(("to_q", "to_k", "to_v", "_proj")))
        else:  # embedders, modulation, the output layer: not block Linears
            continue
        forward[(tokens, k, n)] += 1
        backward[(tokens, k, n)] += needs_input_grad
    return forward, backward


def time_fp8_matmul(tokens: int, k: int, n: int, repeats: int) -> tuple[float, float]:
    """ms of the forward product (tokens x k) @ (k x n) and of the input gradient's (tokens x n) @ (n x k)."""
    device = torch.device("cuda")
    x = torch.randn(tokens, k, device=device).to(E4M3)
    weight = torch.randn(n, k, device=device).to(E4M3)
    grad = torch.randn(tokens, n, device=device).to(E4M3)
    weight_t = weight.t().contiguous()  # the engine's backward makes this copy each step; the floor leaves it out
    x_scale, grad_scale = (torch.rand(tokens, 1, device=device) + 0.5 for _ in range(2))
    weight_scale = torch.rand(1, n, device=device) + 0.5
    ones = torch.ones(1, k, device=device)

    def forward():
        for _ in range(BURST):
            torch._scaled_mm(x, weight.t(), scale_a=x_scale, scale_b=weight_scale, out_dtype=torch.bfloat16)

    def backward():
        for _ in range(BURST):
            torch._scaled_mm(grad, weight_t.t(), scale_a=grad_scale, scale_b=ones, out_dtype=torch.bfloat16)

    return (median_ms(forward, repeats, warmup=1, gpu_only=True) / BURST,
            median_ms(backward, repeats, warmup=1, gpu_only=True) / BURST)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="klein-4b", choices=list(KNOWN_FAMILIES))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--step", type=float, help="a step's time in seconds: print what the floor leaves of it")
    args = parser.parse_args(argv)
    config = KNOWN_FAMILIES[args.family]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.family}")
    rows, matmul_ms = [], 0.0
    print("| tokens x in -> out | per step fwd / bwd | fwd ms | bwd ms | fwd TFLOP/s | bwd TFLOP/s |\n"
          "|---|---|---|---|---|---|")
    forward_counts, backward_counts = block_matmuls(args.family)
    for (tokens, k, n), count in sorted(forward_counts.items()):
        backward_count = backward_counts[(tokens, k, n)]
        forward, backward = time_fp8_matmul(tokens, k, n, args.repeats)
        tflop = 2 * tokens * k * n / 1e9
        rows.append(dict(tokens=tokens, in_features=k, out_features=n, forward_count=count,
                         backward_count=backward_count, forward_ms=forward, backward_ms=backward))
        matmul_ms += count * forward + backward_count * backward
        print(f"| {tokens} x {k} -> {n} | {count} / {backward_count} | {forward:.3f} | {backward:.3f} | "
              f"{tflop / forward:.0f} | {tflop / backward:.0f} |", flush=True)
    attention, _ = measure_attention("cudnn", config["num_attention_heads"], IMAGE_TOKENS + TEXT_TOKENS,
                                     args.repeats, None)
    blocks = config["num_layers"] + config["num_single_layers"]
    attention_ms = blocks * attention["step_ms"]
    floor_ms = matmul_ms + attention_ms
    print(f"fp8 matmuls (forward + input gradient): {matmul_ms:.1f} ms a step")
    print(f"cuDNN attention ({blocks} blocks x {attention['step_ms']:.2f} ms forward + backward): "
          f"{attention_ms:.1f} ms a step")
    print(f"floor: {floor_ms:.1f} ms a step")
    record = dict(family=args.family, device=torch.cuda.get_device_name(), torch=torch.__version__,
                  matmuls=rows, matmul_ms=matmul_ms, attention=attention, attention_ms=attention_ms,
                  floor_ms=floor_ms)
    if args.step:
        left = args.step * 1000 - floor_ms
        record.update(step_s=args.step, left_ms=left)
        print(f"a step of {args.step:.3f} s leaves {left:.1f} ms for everything else")
    if os.environ.get("OUT"):
        with open(Path(os.environ["OUT"]) / "step_floor.json", "a") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
