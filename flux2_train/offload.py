"""Block offload: the frozen weights of some transformer blocks live in pinned CPU memory.

Each offloaded block's frozen tensors (base weights, biases, norms, fp8 scales) are
packed into one pinned buffer. Two GPU slots, each the size of the largest such
block, take turns: while one block computes, the next offloaded block in the pass's
direction is copied into the other slot on a side stream, so the copy overlaps the
compute of the blocks in between. The offloaded blocks are spread evenly over the
model, which gives each copy the most compute to hide behind.

Offloaded blocks must be checkpointed: their forward pass keeps no tensor, so their
weights can leave the GPU as soon as the block has run, and come back for the
recomputation in the backward pass. LoRA weights stay on the GPU (they train).
A [dev] step moves each offloaded block twice: forward, and recompute.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .errors import ConfigError
from .speed import checkpointed_count, is_checkpointed

log = logging.getLogger(__name__)

_ALIGN = 256  # bytes: each tensor starts where cuBLAS and Inductor's kernels want it


def spread(count: int, candidates: int) -> list[int]:
    """`count` indices spread evenly over range(candidates), the last one included."""
    if count <= 0:
        return []
    if count >= candidates:
        return list(range(candidates))
    step = candidates / count
    return sorted({min(candidates - 1, int((k + 1) * step) - 1) for k in range(count)})


def offloaded_indices(blocks: int, cfg) -> list[int]:
    """The blocks a run offloads: `cfg.offload_blocks` spread over its checkpointed blocks."""
    return spread(cfg.offload_blocks, checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks))


def check_offload(count: int, backbone, blocks: int, quantize_base: str, checkpointed: int | None = None) -> None:
    """Refuse before any work an offload this model's host or the other settings cannot run.

    `checkpointed` is known once the memory plan has settled checkpointing; before, it is not checked.
    """
    if count <= 0:
        return
    if not hasattr(backbone, "offload"):
        raise ConfigError("--offload-blocks: ComfyUI places this model's weights itself (it streams what does not "
                          "fit the GPU); leave offload_blocks at 0 here, or train with the CLI")
    if quantize_base in ("int8", "nf4"):
        raise ConfigError(f"--offload-blocks streams plain and fp8 weights; with --quantize-base {quantize_base} "
                          "use --quantize-base fp8, or no offload")
    if count > blocks:
        raise ConfigError(f"--offload-blocks {count}: this model has {blocks} blocks")
    if checkpointed is not None and count > checkpointed:
        raise ConfigError(f"--offload-blocks {count}: only checkpointed blocks can be offloaded, and this run "
                          f"checkpoints {checkpointed}; add --gradient-checkpointing (all blocks) or raise "
                          "--checkpoint-blocks")


class _Packed:
    """One block's frozen tensors, packed into a (pinned) CPU buffer, and where each goes back.

    It holds the block's tensor objects and swaps their `.data`: a later `module.to()`, which
    replaces some of them, would cut them loose, so nothing moves an offloaded block after this.
    """

    def __init__(self, block: nn.Module, pin: bool):
        self.entries = []  # (tensor, offset, nbytes): each tensor is swapped in and out through .data
        seen, offset = set(), 0
        for module in block.modules():
            tensors = [p for p in module._parameters.values() if p is not None and not p.requires_grad]
            tensors += [b for b in module._buffers.values() if b is not None]
            for t in tensors:
                if id(t) in seen:
                    continue
                seen.add(id(t))
                nbytes = t.numel() * t.element_size()
                self.entries.append((t, offset, nbytes))
                offset += -(-nbytes // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.home = torch.empty(offset, dtype=torch.uint8, pin_memory=pin)
        for t, off, n in self.entries:
            self.home[off:off + n].copy_(_bytes(t.data))
        self.shapes = [(t.dtype, t.shape) for t, _, _ in self.entries]

    def point_to(self, buffer: torch.Tensor) -> None:
        for (t, off, n), (dtype, shape) in zip(self.entries, self.shapes):
            t.data = buffer[off:off + n].view(dtype).view(shape)

    def release(self, device: torch.device) -> None:
        # Empty stand-ins: a block run without its weights fails loudly instead of computing on stale ones.
        for (t, _, _), (dtype, _) in zip(self.entries, self.shapes):
            t.data = torch.empty(0, dtype=dtype, device=device)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).cpu()


class _Slot:
    def __init__(self, nbytes: int, device: torch.device, cuda: bool):
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.block: int | None = None
        self.ready = torch.cuda.Event() if cuda else None  # the copy into it is done (side stream)
        self.free = torch.cuda.Event() if cuda else None  # its last tenant's last use is done (compute stream)


class BlockOffload:
    """Streams the frozen weights of `indices` among `blocks` from pinned CPU memory, one block ahead.

    Install after checkpointing (and compiling) the blocks: it goes between a block's
    checkpoint and its forward, so the checkpoint's recomputation loads the weights too.
    """

    def __init__(self, blocks: list[nn.Module], indices: list[int], device: torch.device):
        self.indices = sorted(indices)
        self.device = device
        for i in self.indices:  # before any block gives up its weights
            if not is_checkpointed(blocks[i]):
                raise ConfigError(f"block {i} is offloaded but not checkpointed; checkpoint it first")
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.packed: dict[int, _Packed] = {}
        for i in self.indices:
            self.packed[i] = _Packed(blocks[i], pin=cuda)
            self.packed[i].release(device)
            if cuda:
                torch.cuda.empty_cache()  # the block's GPU copy, if it had one, goes back now
            forward = blocks[i].forward
            blocks[i].forward = functools.partial(forward.func, functools.partial(self._run, i, forward.args[0]))
        largest = max(p.nbytes for p in self.packed.values())
        # Two slots take turns; one or two offloaded blocks simply stay in theirs (and save nothing).
        self.slots = [_Slot(largest, device, cuda) for _ in range(min(2, len(self.indices)))]
        self._clock, self._used = 0, {}
        log.info("offload: %d blocks (%.2f GiB) in %sCPU memory, %d slot(s) of %.2f GiB on %s", len(self.indices),
                 self.offloaded_bytes / 2**30, "pinned " if cuda else "", len(self.slots), largest / 2**30, device)
        if len(self.indices) <= 2:
            log.warning("--offload-blocks %d: with two slots, up to two offloaded blocks stay on the GPU and no "
                        "memory is saved; offload 3 or more", len(self.indices))

    @property
    def offloaded_bytes(self) -> int:
        return sum(p.nbytes for p in self.packed.values())

    def _run(self, index: int, forward, *args, **kwargs):
        # Inside a backward pass this call is the checkpoint's recomputation: the pass runs backwards.
        backward = torch._C._current_graph_task_id() != -1
        slot = self._slot_of(index) or self._load(index, keep=None)
        if slot.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        self._clock += 1
        self._used[index] = self._clock
        following = self._following(index, backward)
        if following is not None and self._slot_of(following) is None:
            self._load(following, keep=index)
        return forward(*args, **kwargs)

    def _following(self, index: int, backward: bool) -> int | None:
        k = self.indices.index(index) + (-1 if backward else 1)
        return self.indices[k] if 0 <= k < len(self.indices) else None

    def _slot_of(self, index: int) -> _Slot | None:
        return next((s for s in self.slots if s.block == index), None)

    def _load(self, index: int, keep: int | None) -> _Slot:
        """Copy block `index` into the slot not holding `keep` whose tenant ran longest ago."""
        slot = min((s for s in self.slots if s.block is None or s.block != keep),
                   key=lambda s: -1 if s.block is None else self._used.get(s.block, 0))
        if slot.block is not None:
            self.packed[slot.block].release(self.device)
        packed = self.packed[index]
        if self.stream is None:
            slot.buffer[:packed.nbytes].copy_(packed.home)
        else:
            # Every use of the old tenant is queued on the compute stream by now.
            slot.free.record(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(slot.free)
                slot.buffer[:packed.nbytes].copy_(packed.home, non_blocking=True)
                slot.ready.record(self.stream)
        packed.point_to(slot.buffer)
        slot.block = index
        return slot
