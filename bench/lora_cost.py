"""What the LoRA pair costs in a trained layer, and what fusing it could win.

For block Linears of FLUX.2 [klein] 4B and [dev] at 1024² (4096 image + 512 text tokens),
times one forward and backward pass of a compiled function around the layer as training
runs it: PEFT's LoRA layer (rank 16, float32 weights, bf16 matmuls under autocast) over the
engine's fp8 Linear (`Float8Linear`, fp8 matmuls), followed by a pointwise consumer (SiLU)
as in a block. Against:

* the fp8 Linear alone: what the adapter adds, the most any fusion of it could remove;
* the up-projection added into the layer's output by one `addmm` (the fusion cuBLAS
  offers: no separate output for the adapter, no separate add) in the forward pass; the
  backward pass returns the adapter's share of the input gradient as a tensor of its own,
  which autograd adds to the base layer's;
* the engine's forward (`lora_fp8.Fp8AdapterLinear`): the up-projection added into the fp8
  product in place, inside the fp8 layer's own op;
* the adapter inside the fp8 product (`_ConcatFp8Lora`): the down-projected input h appended to
  the quantized input as r more columns, and the up-projection B to the fp8 weight as r more
  columns (`adapter_columns`, once per step outside the compiled code), so that one fp8 matmul of
  depth K + r gives x Wᵀ + s·h Bᵀ, and in the backward pass one gives the input gradient and the
  adapter's g B together. h and B are then fp8 too, in the base's row scales: a precision change
  the other variants do not make, so its difference from PEFT's forward is reported, not checked.

Each variant with the adapter is checked against PEFT's forward for the same output and gradients
(bf16 tolerance).

Example:

    python bench/lora_cost.py            # all shapes, 20 timed passes each
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from torch import nn  # noqa: E402

from timing import median_ms  # noqa: E402
from train_speed import env_info  # noqa: E402

TOKENS = 4608
RANK = 16
# (in_features, out_features) of block Linears: the single-stream blocks' fused input and output
# projections, and a double-stream block's q/k/v projection.
SHAPES = {
    "[klein] 4B single-block input (3072 → 27648)": (3072, 27648),
    "[klein] 4B single-block output (12288 → 3072)": (12288, 3072),
    "[dev] single-block input (6144 → 55296)": (6144, 55296),
    "[dev] single-block output (24576 → 6144)": (24576, 6144),
    "[dev] double-block q/k/v (6144 → 6144)": (6144, 6144),
}


class _AddmmLora(torch.autograd.Function):
    """out + s·(x Aᵀ) Bᵀ with the up-projection accumulated into `out` by cuBLAS (beta = 1). The
    adapter's share of the input gradient goes back as a tensor of its own (autograd adds it)."""

    @staticmethod
    def forward(ctx, out, x, a, b, scale):
        h = x @ a.t()
        ctx.save_for_backward(x, a, b, h)
        ctx.scale = scale
        return torch.addmm(out, h, b.t(), alpha=scale)

    @staticmethod
    def backward(ctx, grad):
        x, a, b, h = ctx.saved_tensors
        grad_h = (grad @ b) * ctx.scale
        grad_b = (grad.t() @ h) * ctx.scale
        grad_a = grad_h.t() @ x
        return grad, grad_h @ a, grad_a, grad_b, None


def adapter_columns(weight_cat: torch.Tensor, b: torch.Tensor, scale: float, weight_scale: torch.Tensor) -> torch.Tensor:
    """Write s·B into the fp8 weight's last r columns, in the weight's row scales; returns the scale of
    each rank column, β (1, r). Once per optimizer step in training (B changes only there)."""
    from flux2_train.quantize import E4M3_MAX

    with torch.no_grad():
        rows = b.float() * scale / weight_scale
        beta = rows.abs().amax(dim=0, keepdim=True).clamp(min=1e-12) / E4M3_MAX
        weight_cat[:, weight_cat.shape[1] - b.shape[1]:] = (rows / beta).to(torch.float8_e4m3fn)
    return beta


class _ConcatFp8Lora(torch.autograd.Function):
    """x Wᵀ + s·h Bᵀ as one fp8 matmul of depth K + r (see the module's docstring); gradients for x,
    h and B. `weight_cat` (N, K + r): the layer's e4m3 weight, then s·B / (ws·β) from `adapter_columns`.

    Scales: out = xs·ws·Σ xq Wq, so h's columns carry h·β / xs (saturated at e4m3's largest value)."""

    @staticmethod
    def forward(ctx, x, h, b, scale, weight_cat, weight_scale, beta):
        from flux2_train.quantize import E4M3_MAX, _rowwise_fp8

        xq, xs = _rowwise_fp8(x)
        hq = (h.float() * beta / xs).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(torch.cat([xq, hq], dim=1), weight_cat.t(), scale_a=xs, scale_b=weight_scale.t(),
                               out_dtype=torch.bfloat16)
        ctx.save_for_backward(weight_cat, weight_scale, h, beta)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        from flux2_train.quantize import _rowwise_fp8

        weight_cat, weight_scale, h, beta = ctx.saved_tensors
        gq, gs = _rowwise_fp8(grad, column_scale=weight_scale.t())
        ones = torch.ones(1, weight_cat.shape[1], device=grad.device, dtype=torch.float32)
        both = torch._scaled_mm(gq, weight_cat.t().contiguous().t(), scale_a=gs, scale_b=ones, out_dtype=torch.bfloat16)
        rank = h.shape[1]
        grad_x = both[:, :-rank]
        grad_h = (both[:, -rank:].float() * beta).to(h.dtype)  # s·g B
        grad_b = (grad.t() @ h) * ctx.scale
        return grad_x, grad_h, grad_b, None, None, None, None


def variants(layer):
    """name -> f(x) for a 2-D bf16 x, under bf16 autocast. `layer`: PEFT's LoRA layer over the fp8
    Linear, as the engine leaves it (`Fp8AdapterLinear`)."""
    from peft.tuners.lora import Linear as LoraLinear

    base = layer.base_layer
    a, b, scale = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]

    def fp8_only(x):
        return nn.functional.silu(base(x))

    def peft(x):
        return nn.functional.silu(LoraLinear.forward(layer, x))

    def addmm(x):
        with torch.autocast(x.device.type, enabled=False):
            out = base(x)
            return nn.functional.silu(_AddmmLora.apply(out, x, a.to(torch.bfloat16), b.to(torch.bfloat16), scale))

    def in_place(x):
        return nn.functional.silu(layer(x))

    rank = a.shape[0]
    weight_cat = torch.zeros(base.out_features, base.in_features + rank, dtype=base.weight.dtype,
                             device=base.weight.device)
    weight_cat[:, :base.in_features] = base.weight

    def in_the_product(x, beta):
        with torch.autocast(x.device.type, enabled=False):
            h = x @ a.to(torch.bfloat16).t()
            out = _ConcatFp8Lora.apply(x, h, b.to(torch.bfloat16), scale, weight_cat, base.weight_scale, beta)
            return nn.functional.silu(out)

    in_the_product.before = lambda: adapter_columns(weight_cat, b, scale, base.weight_scale)

    return {"fp8 Linear alone": fp8_only, "+ LoRA (PEFT's forward)": peft, "+ LoRA, addmm": addmm,
            "+ LoRA, in place": in_place, "+ LoRA, in the fp8 product": in_the_product}


def measure(name: str, k: int, n: int, device, repeat: int, tokens: int = TOKENS) -> dict:
    from flux2_train.lora import add_lora
    from flux2_train.lora_fp8 import add_adapters_into_fp8_matmuls
    from flux2_train.quantize import Float8Linear

    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False, device=device, dtype=torch.bfloat16)
    nn.init.normal_(base.weight, std=k ** -0.5)
    net = nn.Sequential(Float8Linear(base))
    add_lora(net, ["0"], RANK, float(RANK))  # scale 1
    add_adapters_into_fp8_matmuls(net)
    layer = net[0].to(device)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():  # PEFT starts B at zero: the adapter would add nothing
        b.normal_(std=0.01)
    x = torch.randn(tokens, k, device=device, dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, n, device=device, dtype=torch.bfloat16)
    row = {"layer": name, "in": k, "out": n}
    reference = None  # the first variant with the adapter
    for label, fn in variants(layer).items():
        compiled = torch.compile(fn, fullgraph=True)
        before = getattr(fn, "before", None)  # outside the compiled code, counted in the time

        def step():
            x.grad = a.grad = b.grad = None
            extra = () if before is None else (before(),)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = compiled(x, *extra)
            y.backward(g)
            return y

        for _ in range(3):  # compile and warm up
            y = step()
        if a.grad is not None:
            got = [y.float(), x.grad.float(), a.grad, b.grad]
            if reference is None:
                reference = got
            # Relative to PEFT's forward: out, grad x, grad A, grad B (the fp8 product's error shows here).
            row[f"{label}: relative difference"] = [((m - t).norm() / t.norm()).item() for m, t in zip(got, reference)]
            if label != "+ LoRA, in the fp8 product":
                for mine, theirs in zip(got, reference):
                    torch.testing.assert_close(mine, theirs, rtol=0.05, atol=0.05 * theirs.abs().max().item())
        row[label] = median_ms(step, repeat, device)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--shape", action="append", choices=list(SHAPES), help="default: all")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shrink", type=int, default=1, help="divide tokens and features by this (a CPU smoke test)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU with fp8 matmuls (Ada or Hopper)", file=sys.stderr)
        return 2
    rows = [measure(s, SHAPES[s][0] // args.shrink, SHAPES[s][1] // args.shrink, device, args.repeat,
                    TOKENS // args.shrink) for s in (args.shape or SHAPES)]
    labels = ["fp8 Linear alone", "+ LoRA (PEFT's forward)", "+ LoRA, addmm", "+ LoRA, in place",
              "+ LoRA, in the fp8 product"]
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"\n{card}, {TOKENS // args.shrink} tokens, rank {RANK}, forward + backward, compiled, "
          f"median of {args.repeat} (ms)\n")
    print("| layer | " + " | ".join(labels) + " | LoRA's share | addmm against PEFT's | in place against PEFT's "
          "| in the fp8 product against in place | difference from PEFT's (out, grad x, A, B): in place "
          "| in the fp8 product |")
    print("|---|" + "---|" * (len(labels) + 6))

    def differences(row, label):
        return ", ".join(f"{e:.1%}" for e in row[f"{label}: relative difference"])

    for r in rows:
        alone, peft, addmm, in_place, fused = (r[x] for x in labels)
        print(f"| {r['layer']} | {alone:.3f} | {peft:.3f} | {addmm:.3f} | {in_place:.3f} | {fused:.3f} | "
              f"{(peft - alone) / peft:.0%} | {addmm / peft - 1:+.1%} | {in_place / peft - 1:+.1%} | "
              f"{fused / in_place - 1:+.1%} | {differences(r, labels[3])} | {differences(r, labels[4])} |")
    if os.environ.get("OUT"):
        record = dict(env_info(device), tokens=TOKENS // args.shrink, rank=RANK, repeat=args.repeat, rows=rows)
        (Path(os.environ["OUT"]) / "lora_cost.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
