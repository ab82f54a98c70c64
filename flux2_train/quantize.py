"""Frozen base weights in fewer bytes: scaled fp8 with fp8 matmuls, or bitsandbytes 8-bit / NF4 (QLoRA).

Only the Linear layers of the transformer blocks are converted: they hold all but
a few hundred MB of every FLUX.2. LoRA adapters go on the converted layers as on
plain ones (PEFT knows bitsandbytes' layers; `Float8Linear` is an `nn.Linear`).

fp8: each weight row is scaled into float8 e4m3's range (one float32 scale per
output feature), as ComfyUI's "fp8 scaled" checkpoints store [dev]. The forward
pass quantizes each input row the same way and multiplies in fp8
(`torch._scaled_mm`, rowwise scales, bf16 out); the backward pass folds the weight
scale into the output gradient and multiplies in fp8 again. Where the GPU has no
fp8 matmul (before Ada / Hopper) the weight is dequantized per layer instead, in
both passes, so the memory saving stays and the speed-up goes. `fp8_linear` is
the one entry point; ComfyUI's fp8 weights go through it too. A LoRA adapter on a
`Float8Linear` adds its up-projection into the fp8 product in place
(`lora_fp8.add_adapters_into_fp8_matmuls`).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .config import BASE_FORMATS
from .errors import ConfigError

log = logging.getLogger(__name__)

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


# Eager, quantizing a whole activation at once holds float32 copies of it: GBs for FLUX.2's largest
# layers. Rows go in slices of this many instead (compiled code fuses the steps, whole).
_ROWS_AT_ONCE = 1024


def _rowwise_fp8(x: torch.Tensor, column_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) -> e4m3 values (row-major) and the float32 scale of each row, (M, 1), of x, or of
    x * column_scale ((1, K)) where given."""
    if torch.compiler.is_compiling() or x.shape[0] <= _ROWS_AT_ONCE:
        values, scales = _rowwise_fp8_rows(x, column_scale)
        return values.contiguous(), scales  # an input may be a transposed view
    values = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(x.shape[0], 1, dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[0], _ROWS_AT_ONCE):
        rows = slice(start, start + _ROWS_AT_ONCE)
        values[rows], scales[rows] = _rowwise_fp8_rows(x[rows], column_scale)
    return values, scales


def _rowwise_fp8_rows(x: torch.Tensor, column_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.float() if column_scale is None else x.float() * column_scale
    scale = x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / E4M3_MAX
    return (x / scale).to(torch.float8_e4m3fn), scale


def compute_dtype_of(x: torch.Tensor) -> torch.dtype:
    """The dtype an op on `x` computes in: autocast's where it is on, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def has_fp8_matmul(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and _cpu_matmul_takes_row_scales()


@functools.cache
def _cpu_matmul_takes_row_scales() -> bool:
    """Older torch builds' CPU `_scaled_mm` takes one scale per tensor only (and asserts on row scales)."""
    a = torch.zeros(16, 16, dtype=torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except (RuntimeError, ValueError):  # torch builds differ in which they raise
        return False
    return True


@torch.library.custom_op("flux2_train::fp8_mm_add_lora", mutates_args=())
def _fp8_mm_add_lora(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     h: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """The fp8 matmul with an adapter's up-projection added into its output in place (bf16).

    cuBLAS adds `scale * h B^T` while it reads the output back once; PEFT's forward writes the
    adapter's product and then the sum, each as large as the output. An op of its own because the
    compiler would turn the in-place add back into a new tensor and an add.
    """
    # bf16 only: `fp8_linear` multiplies in fp8 for a bf16 output alone.
    out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.t(), out_dtype=torch.bfloat16)
    return out.addmm_(h, lora_b.t(), alpha=scale)


@_fp8_mm_add_lora.register_fake
def _(xq, xs, weight, weight_scale, h, lora_b, scale):
    return xq.new_empty((xq.shape[0], weight.shape[0]), dtype=torch.bfloat16)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b (+ scale * h B^T) for a 2-D x, with W in e4m3 (row scales); gradients for x, and
    for an adapter's down-projected input h and up-projection B where given (W is frozen).

    The backward pass makes a transposed copy of the layer's fp8 weight (`_scaled_mm` takes its
    second operand column-major): one layer at a time, a byte per weight.
    """

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, out_dtype, h=None, lora_b=None, scale=1.0):
        xq, xs = _rowwise_fp8(x)
        if h is None:
            out = torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale.t(), out_dtype=out_dtype)
        else:
            out = _fp8_mm_add_lora(xq, xs, weight, weight_scale, h, lora_b, scale)
        if bias is not None:
            out = out + bias.to(out_dtype)
        ctx.save_for_backward(weight, weight_scale, h, lora_b)
        ctx.x_dtype, ctx.scale = x.dtype, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale, h, lora_b = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # not where a block's input comes from frozen layers alone
            # g @ (s * W8) == (g * s^T) @ W8: the weight's row scale moves onto the gradient's columns.
            gq, gs = _rowwise_fp8(grad, column_scale=weight_scale.t())
            ones = torch.ones(1, weight.shape[1], device=weight.device, dtype=torch.float32)
            # _scaled_mm takes its second operand column-major: a transposed copy of one layer's fp8 weight.
            grad_x = torch._scaled_mm(gq, weight.t().contiguous().t(), scale_a=gs, scale_b=ones,
                                      out_dtype=torch.bfloat16).to(ctx.x_dtype)
        # The scale goes on the rank-wide products, not on the output-wide gradient.
        grad_h = grad @ (lora_b * ctx.scale) if ctx.needs_input_grad[5] else None
        grad_b = (grad.t() @ h) * ctx.scale if ctx.needs_input_grad[6] else None
        return grad_x, None, None, None, None, grad_h, grad_b, None


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized for the op, again in the backward pass: the
    compute-dtype copy of a frozen weight lives one op, not until the backward pass."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias, out_dtype):
        ctx.save_for_backward(weight, weight_scale)
        ctx.x_dtype, ctx.out_dtype = x.dtype, out_dtype
        bias = None if bias is None else bias.to(out_dtype)
        return nn.functional.linear(x.to(out_dtype), _dequantize(weight, weight_scale, out_dtype), bias)

    @staticmethod
    def backward(ctx, grad):
        weight, weight_scale = ctx.saved_tensors
        grad_x = grad.to(ctx.out_dtype) @ _dequantize(weight, weight_scale, ctx.out_dtype)
        return grad_x.to(ctx.x_dtype), None, None, None, None


def _dequantize(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if scale is None:
        return weight.to(dtype)
    # One compute-dtype copy, scaled in place (in float32 internally): no float32 copy of the layer.
    return weight.to(dtype, copy=True).mul_(scale)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None, bias: torch.Tensor | None,
               out_dtype: torch.dtype, fp8_matmul: bool, lora: tuple[torch.Tensor, torch.Tensor, float] | None = None
               ) -> torch.Tensor:
    """x W^T + b for a frozen weight stored in fewer bytes, in `out_dtype`; gradients for x (W is frozen).

    `weight` e4m3 with `weight_scale` (one float32 per output feature, (N, 1)) multiplies in
    fp8 where `fp8_matmul` (see `has_fp8_matmul`) and `out_dtype` is bfloat16. Otherwise the
    weight (any dtype; `weight_scale` None for none) is cast for each op and dropped after it.

    `lora`: (h, B, scale), an adapter's down-projected input (..., r) and up-projection weight
    (N, r): `scale * h B^T` is added, into the fp8 matmul's output in place where it runs, with
    gradients for h and B. Its product is taken in `out_dtype` (PEFT's is in autocast's dtype, the
    same while training; without autocast PEFT keeps a float32 adapter's product in float32).
    """
    # No rows (an empty batch): `_scaled_mm` refuses the empty scales; the plain path gives the empty result.
    if fp8_matmul and out_dtype == torch.bfloat16 and weight_scale is not None and x.numel() > 0:
        # Shaped outside the Function: callers add into the output in place (ComfyUI's blocks do),
        # which autograd refuses on a view made inside one.
        shape = x.shape
        h, lora_b, scale = (None, None, 1.0) if lora is None else lora
        if h is not None:
            h, lora_b = h.reshape(-1, h.shape[-1]).to(out_dtype), lora_b.to(out_dtype)
        out = _Fp8Linear.apply(x.reshape(-1, shape[-1]), weight, weight_scale, bias, out_dtype, h, lora_b, scale)
        return out.reshape(*shape[:-1], out.shape[-1])
    out = _DequantizedLinear.apply(x, weight, weight_scale, bias, out_dtype)
    if lora is not None:
        h, lora_b, scale = lora
        out = out + (h @ lora_b.t().to(h.dtype) * scale).to(out.dtype)
    return out


def fp8_matmul_fits(in_features: int, out_features: int) -> bool:
    """`_scaled_mm` needs both sides of each product in multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


class Float8Linear(nn.Linear):
    """A frozen Linear stored as e4m3 with one float32 scale per output feature."""

    def __init__(self, linear: nn.Linear, fp8_matmul: bool = True):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = _rowwise_fp8(linear.weight.detach())
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.fp8_matmul = fp8_matmul and fp8_matmul_fits(self.in_features, self.out_features)

    def _apply(self, fn, recurse=True):
        # A model-wide .to(dtype) moves these but keeps them e4m3 and float32: cast, they would be
        # other numbers to `_scaled_mm`.
        weight, scale = self.weight.data, self.weight_scale
        super()._apply(fn, recurse)
        self.weight.data = weight.to(self.weight.device)
        self.weight_scale = scale.to(self.weight.device)
        return self

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        return _dequantize(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale, self.bias, compute_dtype_of(x), self.fp8_matmul, lora)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 (row scales)"


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("--quantize-base int8 and nf4 need bitsandbytes: pip install bitsandbytes "
                          "(or use --quantize-base fp8, which needs nothing extra)") from None
    return bitsandbytes


def _bnb_linear(linear: nn.Linear, fmt: str, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    bnb = _bnb()
    bias = linear.bias is not None
    w = linear.weight.detach()
    if fmt == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=bias, compute_dtype=compute_dtype,
                              quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
        q.weight = q.weight._quantize(device)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=bias, has_fp16_weights=False,
                                threshold=0.0, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        q.weight = q.weight._quantize(device) if hasattr(q.weight, "_quantize") else q.weight.to(device)
    if bias:
        q.bias = nn.Parameter(linear.bias.detach().to(device, compute_dtype), requires_grad=False)
    return q


def check_quantize(fmt: str, backbone) -> None:
    """Refuse before any work a format this host or machine cannot store."""
    if fmt == "none":
        return
    if not hasattr(backbone, "quantize"):
        raise ConfigError(f"--quantize-base {fmt}: this model's host stores its own weights; in ComfyUI choose the "
                          "weight dtype in the model loader (e.g. fp8_e4m3fn) and leave quantize_base at none")
    if fmt in ("int8", "nf4"):
        _bnb()


def plain_linears(module: nn.Module) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every plain Linear inside `module`."""
    return [(parent, name) for parent in module.modules() for name, child in parent.named_children()
            if type(child) is nn.Linear]


def quantize_base(block: nn.Module, fmt: str, device: torch.device, compute_dtype: torch.dtype) -> int:
    """Convert a block's Linear layers to `fmt` one at a time on `device`; return how many.

    A layer at a time, so the device never holds more than one unconverted layer
    beyond the converted ones: [dev] quantizes from CPU memory onto a 24 GB card.
    """
    if fmt not in BASE_FORMATS:
        raise ConfigError(f"unknown --quantize-base {fmt!r}; choose one of {', '.join(BASE_FORMATS)}")
    if fmt == "none":
        return 0
    if fmt == "fp8" and compute_dtype != torch.bfloat16:
        raise ConfigError("--quantize-base fp8 computes in bfloat16; set --dtype bfloat16")
    if fmt in ("int8", "nf4"):
        _bnb()
    fp8_matmul = has_fp8_matmul(device)
    layers = plain_linears(block)
    for parent, attr in layers:
        # Nothing else holds the layer: its unconverted weight is freed as soon as it is replaced.
        # Quantized from the precision it was stored in, not through the compute dtype first.
        linear = getattr(parent, attr).to(device=device)
        new = Float8Linear(linear, fp8_matmul=fp8_matmul) if fmt == "fp8" else _bnb_linear(linear, fmt, device,
                                                                                            compute_dtype)
        new.quantized_base = fmt
        setattr(parent, attr, new)
        del linear
    return len(layers)
