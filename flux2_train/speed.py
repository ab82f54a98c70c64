"""Step-time settings that leave the result alone: attention kernel, regional compile, selective checkpointing.

Each works on any `Flux2Backbone` through its `blocks`, so the diffusers model and
ComfyUI's model get the same treatment.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ATTENTION_BACKENDS
from .errors import ConfigError

_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# "auto": PyTorch's own order, pinned, so a checkpoint's recomputation picks the kernel its forward
# pass picked (cuDNN and FlashAttention keep different tensors, and the checkpoint checks them).
# cuDNN is faster on an H100/H200 (a [klein] 4B step: 0.151 s against 0.195 s with FlashAttention 2,
# bench/README.md) but stays opt-in (--attention cudnn): the tiny test model's loss turned NaN with
# it in some GPU runs (fp16, and bf16 at 48 tokens).
_AUTO_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
               SDPBackend.CUDNN_ATTENTION]


def attention_kernels(name: str, device: torch.device):
    """Context for a training step's forward and backward passes: SDPA restricted to `name`'s kernel."""
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown --attention {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if device.type != "cuda":
        return contextlib.nullcontext()  # the CPU has one SDPA kernel
    if name == "auto":
        return sdpa_kernel(_AUTO_ORDER, set_priority=True)
    return sdpa_kernel([_SDPA[name]])


def pinned_attention():
    """The kernels enabled now (by `attention_kernels`), in the priority order set now.

    For model code that sets its own SDPA priority per call (ComfyUI), so the
    recomputation of a checkpoint still picks the kernel its forward pass picked.
    """
    enabled = {SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled(),
               SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled()}
    current = getattr(torch._C, "_get_sdp_priority_order", None)
    order = [SDPBackend(int(i)) for i in current()] if current else _AUTO_ORDER
    return sdpa_kernel([b for b in order if enabled.get(b)] or [SDPBackend.MATH], set_priority=True)


def check_attention(name: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> None:
    """Refuse before any work a kernel this GPU cannot run for this model, naming the ones it can."""
    if device.type != "cuda" or name in ("auto", "math"):
        return
    q = torch.zeros(1, 1, 64, head_dim, device=device, dtype=dtype)
    usable = []
    for other, backend in _SDPA.items():
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            usable.append(other)
        except RuntimeError:
            pass
    if name not in usable:
        raise ConfigError(f"--attention {name} does not run on this GPU for this model; use auto or one of "
                          f"{', '.join(usable)}")


def check_compile(compile: bool, backbone) -> None:
    if compile and not getattr(backbone, "compiles", True):
        raise ConfigError("--compile: this model's blocks cannot be compiled for training (ComfyUI's FLUX.2 blocks "
                          "write their residuals into their inputs); turn compile off, or train with the CLI")


def checkpoint_blocks(blocks: list[nn.Module], count: int) -> None:
    """Recompute the first `count` blocks in the backward pass instead of keeping their activations."""
    for block in blocks[:count]:
        block.forward = functools.partial(_checkpointed_call, block.forward)


def _checkpointed_call(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpointed_count(blocks: int, gradient_checkpointing: bool, checkpoint_blocks: int) -> int:
    """Blocks recomputed by a run: none without checkpointing, else `checkpoint_blocks` (0: all)."""
    if not gradient_checkpointing:
        return 0
    return blocks if checkpoint_blocks <= 0 else min(checkpoint_blocks, blocks)


def compile_blocks(blocks: list[nn.Module]) -> None:
    """Regional compile: each transformer block on its own, so every block of a kind shares one graph.

    Compiling the blocks rather than the model keeps the first step's compile to tens of seconds
    and removes what dominates the eager step besides the matmuls: casts, copies, norms and
    elementwise glue. Inductor's FX graph cache keeps the result for the next run.
    """
    for block in blocks:
        own = block.__dict__.get("forward")
        if isinstance(own, functools.partial) and own.func is _checkpointed_call:
            # The checkpoint stays outside the compiled code: inside it, the compiler's partitioner
            # keeps part of the block's activations, a third of what no checkpointing keeps.
            block.forward = functools.partial(_checkpointed_call, torch.compile(own.args[0]))
        else:
            block.compile()
