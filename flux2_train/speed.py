"""Step-time settings that leave the result alone: attention kernel, regional compile, selective
checkpointing, and where a block keeps its activations.

Each works on any `Flux2Backbone` through its `blocks`, so the diffusers model and
ComfyUI's model get the same treatment.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .config import ATTENTION_BACKENDS
from .errors import ConfigError

_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH,
         "fa4": SDPBackend.FLASH_ATTENTION}  # with FlashAttention 4 behind it (`attention_implementation`)
# "auto": PyTorch's own order, pinned, so a checkpoint's recomputation picks the kernel its forward
# pass picked (cuDNN and FlashAttention keep different tensors, and the checkpoint checks them).
# cuDNN is faster on an H100/H200 (a [klein] 4B step: 0.151 s against 0.195 s with FlashAttention 2,
# bench/README.md) but stays opt-in (--attention cudnn): the tiny test model's loss turned NaN with
# it in some GPU runs (fp16, and bf16 at 48 tokens).
_AUTO_ORDER = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH,
               SDPBackend.CUDNN_ATTENTION]


# The kernels the running step allows (set by `attention_kernels`), for `pinned_attention`.
_allowed: list | None = None
# Outside a training step (validation, previews): no cuDNN, whose saved tensors a checkpoint's
# recomputation by FlashAttention would not match.
_WITHOUT_CUDNN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@contextlib.contextmanager
def attention_kernels(name: str, device: torch.device):
    """Context for a training step's forward and backward passes: SDPA restricted to `name`'s kernel."""
    global _allowed
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown --attention {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if device.type != "cuda":  # the CPU has one SDPA kernel
        yield
        return
    backends = _AUTO_ORDER if name == "auto" else [_SDPA[name]]
    before, _allowed = _allowed, backends
    try:
        with sdpa_kernel(backends, set_priority=True):
            yield
    finally:
        _allowed = before


def pinned_attention():
    """SDPA on the kernels the running step allows, in its order.

    For attention that runs inside model code with its own SDPA habits (the ComfyUI
    path's training attention, in place of ComfyUI's, which sets a priority per call):
    the step's choice holds, and a checkpoint's recomputation picks the kernel its
    forward pass picked.
    """
    return sdpa_kernel(_allowed or _WITHOUT_CUDNN, set_priority=True)


@contextlib.contextmanager
def attention_implementation(name: str, device: torch.device):
    """Context for a whole run: with --attention fa4, SDPA's FlashAttention kernels (forward and
    backward) are FlashAttention 4's (the `flash-attn-4` package) until it ends, and PyTorch's own
    after it, for the process that hosts the run (ComfyUI samples with them)."""
    if name != "fa4" or device.type != "cuda":
        yield
        return
    try:
        from torch.nn.attention import _fa4
    except ImportError:
        _fa4 = None
    if not hasattr(_fa4, "_FA4Handle"):  # the registration whose handle lets it go (PyTorch 2.11)
        raise ConfigError(f"--attention fa4 needs PyTorch 2.11 or newer (this is {torch.__version__}); "
                          "use auto or cudnn")
    if torch.version.hip or torch.cuda.get_device_capability(device)[0] not in (9, 10):
        raise ConfigError("--attention fa4 runs on NVIDIA Hopper (H100, H200) and data-center Blackwell (B200, "
                          "B300) GPUs only; use auto or cudnn")
    try:
        import flash_attn.cute.interface  # noqa: F401
    except Exception as e:  # not installed, or installed for another CUDA
        raise ConfigError(f"--attention fa4 needs the flash-attn-4 package, which did not load ({e}): "
                          "pip install --pre flash-attn-4; or use auto or cudnn") from e
    with warnings.catch_warnings():  # PyTorch says it overrides its own FlashAttention kernels: that is the point
        warnings.simplefilter("ignore", UserWarning)
        # PyTorch's registration reads the package through this module's two functions below.
        registration = _fa4.register_flash_attention_fa4(module_path=__name__)
    try:
        yield
    finally:
        registration.remove()  # the kernels it registered go with it


def _flash_attn_fwd(*args, **kwargs):
    """The package's forward; it returns more than the output and log-sum-exp PyTorch reads."""
    from flash_attn.cute.interface import _flash_attn_fwd as forward

    out, lse, *_ = forward(*args, **kwargs)
    return out, lse


def _flash_attn_bwd(*args, **kwargs):
    from flash_attn.cute.interface import _flash_attn_bwd as backward

    return backward(*args, **kwargs)


def check_attention(name: str, device: torch.device, head_dim: int, dtype: torch.dtype) -> None:
    """Refuse before any work a kernel this GPU cannot run for this model, naming the ones it can."""
    if device.type != "cuda" or name in ("auto", "math"):
        return
    q = torch.zeros(1, 1, 64, head_dim, device=device, dtype=dtype)

    def runs(kernel: str) -> bool:
        try:
            with attention_implementation(kernel, device), sdpa_kernel([_SDPA[kernel]]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
            return True
        except ConfigError:
            if kernel == name:  # what is missing for it: the package, the PyTorch, the GPU
                raise
            return False
        except Exception:
            return False

    if runs(name):
        return
    usable = [other for other in _SDPA if other not in (name, "fa4") and runs(other)]
    raise ConfigError(f"--attention {name} does not run on this GPU for this model; use auto or one of "
                      f"{', '.join(usable)}")


def checkpoint_blocks(blocks: list[nn.Module], count: int) -> None:
    """Recompute the first `count` blocks in the backward pass instead of keeping their activations."""
    for block in blocks[:count]:
        block.forward = functools.partial(_checkpointed_call, block.forward)


def offload_activations(blocks: list[nn.Module], indices: list[int], offload) -> None:
    """Blocks `indices` keep their activations where `offload` (an `offload.ActivationOffload`) puts them."""
    for i in indices:
        if is_checkpointed(blocks[i]):
            raise ConfigError(f"block {i} is checkpointed: it keeps no activations to offload")
        blocks[i].forward = functools.partial(_offloaded_call, offload, i, blocks[i].forward)


def is_checkpointed(block: nn.Module) -> bool:
    wrapper = _wrapper(block)
    return wrapper is not None and wrapper.func is _checkpointed_call


def _wrapper(block: nn.Module) -> functools.partial | None:
    """What a block's forward runs inside (a checkpoint, an activation offload), or None; the
    block's own forward is its last argument."""
    own = block.__dict__.get("forward")
    wraps = isinstance(own, functools.partial) and own.func in (_checkpointed_call, _offloaded_call)
    return own if wraps else None


def _checkpointed_call(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def _offloaded_call(offload, index, forward, *args, **kwargs):
    with offload.saving(index):
        return forward(*args, **kwargs)


def checkpointed_count(blocks: int, gradient_checkpointing: bool, checkpoint_blocks: int) -> int:
    """Blocks recomputed by a run: none without checkpointing, else `checkpoint_blocks` (0: all)."""
    if not gradient_checkpointing:
        return 0
    return blocks if checkpoint_blocks <= 0 else min(checkpoint_blocks, blocks)


def compile_unavailable(device: torch.device) -> str | None:
    """Why `torch.compile` cannot build kernels for `device` on this machine, or None.

    On CUDA, Inductor writes its kernels in Triton: without it the first step would fail.
    """
    if device.type != "cuda":
        return None
    from torch.utils._triton import has_triton_package

    if not has_triton_package():
        return ("torch.compile builds its GPU kernels with Triton, which is not installed "
                "(pip install triton; on Windows, triton-windows)")
    if torch.cuda.get_device_capability(device) < (7, 0):
        return "torch.compile's GPU kernels need a GPU of compute capability 7.0 or newer"
    return None


def compile_blocks(blocks: list[nn.Module]) -> None:
    """Regional compile: each transformer block on its own, so every block of a kind shares one graph.

    Call it after `checkpoint_blocks` and `offload_activations`, so checkpoints and offload hooks
    stay outside the compiled code.

    Compiling the blocks rather than the model keeps the first step's compile to tens of seconds
    and removes what dominates the eager step besides the matmuls: casts, copies, norms and
    elementwise glue. Inductor's FX graph cache keeps the result for the next run.
    """
    for block in blocks:
        wrapper = _wrapper(block)
        if wrapper is not None:
            # The checkpoint stays outside the compiled code: inside it, the compiler's partitioner
            # keeps part of the block's activations, a third of what no checkpointing keeps. The
            # offload's hooks, too, see the compiled block's saved tensors from outside.
            *outer, forward = wrapper.args
            block.forward = functools.partial(wrapper.func, *outer, torch.compile(forward))
        else:
            block.compile()
