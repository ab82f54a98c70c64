"""Offload to pinned CPU memory: the frozen weights of some blocks, or the activations of others.

Block offload (`BlockOffload`): each offloaded block's frozen tensors (base weights,
biases, norms, fp8 scales) are packed into one pinned buffer. Two GPU slots, each the
size of the largest such block, take turns: while one block computes, the next
offloaded block in the pass's direction is copied into the other slot on a side
stream, so the copy overlaps the compute of the blocks in between. The offloaded
blocks are spread evenly over the model, which gives each copy the most compute to
hide behind.

Offloaded blocks must be checkpointed: their forward pass keeps no tensor, so their
weights can leave the GPU as soon as the block has run, and come back for the
recomputation in the backward pass. LoRA weights stay on the GPU (they train).
A [dev] step moves each offloaded block twice: forward, and recompute.

Activation offload (`ActivationOffload`): the tensors that a block which is not
checkpointed keeps for its backward pass go to pinned CPU memory as they are saved,
and come back ahead of the block's backward pass, on a side stream both ways. It
recomputes nothing, where a checkpoint recomputes the block's forward pass; the price
is PCIe bandwidth, which is free while the copies hide behind other blocks' compute.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import mmap
from collections.abc import Iterable

import torch
from torch import nn

from .errors import ConfigError
from .speed import checkpointed_count, is_checkpointed

log = logging.getLogger(__name__)

_ALIGN = 256  # bytes: each tensor starts where cuBLAS and Inductor's kernels want it
_PAGE = mmap.PAGESIZE


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


def activation_offload_room(blocks: int, checkpointed: int) -> int:
    """Blocks whose activations can be offloaded: those not checkpointed but the last (the backward
    pass starts there: nothing would hide its copy back)."""
    return max(0, blocks - checkpointed - 1)


def activation_offload_indices(blocks: int, cfg) -> list[int]:
    """The blocks whose activations a run keeps in CPU memory: `cfg.offload_activations` spread
    over its `activation_offload_room`, the first of them included."""
    first = checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
    room = activation_offload_room(blocks, first)
    return [first + room - 1 - i for i in reversed(spread(cfg.offload_activations, room))]


def check_activation_offload(count: int, blocks: int, checkpointed: int) -> None:
    """Refuse before any work more offloaded activations than the blocks that keep any."""
    if count <= 0:
        return
    room = activation_offload_room(blocks, checkpointed)
    if count > room:
        raise ConfigError(f"--offload-activations {count}: this run keeps the activations of {room + 1} blocks "
                          f"and can offload those of {room} (not the last one"
                          + (", nor the checkpointed ones); lower it, or lower --checkpoint-blocks" if checkpointed
                             else "); lower it"))
    if count <= ACTIVATIONS_IN_FLIGHT:
        log.warning("--offload-activations %d: the last %d offloaded blocks keep their activations on the GPU (their "
                    "backward pass comes first), so this saves no memory; offload %d or more", count,
                    ACTIVATIONS_IN_FLIGHT, ACTIVATIONS_IN_FLIGHT + 1)


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


# Smaller saved tensors stay on the GPU: copying them costs more in calls than they hold.
_MIN_OFFLOAD_BYTES = 1 << 20
# Offloaded blocks whose activations may be on the GPU at once: copies still running in the
# forward pass, the block being run and the one brought back ahead of it in the backward pass.
ACTIVATIONS_IN_FLIGHT = 2


class _Stored:
    """The memory of tensors a block saved for its backward pass (one storage), and its copy in CPU memory."""

    __slots__ = ("index", "home", "gpu", "ready", "uses")

    def __init__(self, index: int, home: torch.Tensor, gpu: torch.Tensor):
        self.index, self.home = index, home  # bytes
        # On the GPU (bytes): the block's own memory until the copy out is done, or the copy back.
        self.gpu: torch.Tensor | None = gpu
        self.ready = None  # CUDA event: the copy back is done (None: `gpu` needs no wait)
        self.uses = 0  # saved tensors in it whose backward pass has not read them yet


class PinnedBuffers:
    """CPU buffers for offloaded tensors, pinned at their own size and kept from one step to the next.

    PyTorch's pinned allocator rounds each buffer up to a power of two, up to twice the memory
    asked for. These are plain CPU tensors whose pages CUDA registers (each buffer on pages of its
    own; `pin=False` on a machine without CUDA), so the copies to and from them run asynchronously.
    A buffer given back is taken again for the smallest request it holds: a step takes the buffers
    of the step before (the same bucket saves tensors of the same sizes), and a smaller bucket's
    step those of a larger one. A larger bucket's step after smaller ones adds buffers of its own.
    """

    def __init__(self, pin: bool = True):
        self.pin = pin
        self._regions: dict[int, torch.Tensor] = {}  # address -> a whole page-aligned buffer
        self._free: list[tuple[int, int]] = []  # (size, address) of those no step holds, smallest first

    @property
    def nbytes(self) -> int:
        return sum(r.numel() for r in self._regions.values())

    def take(self, nbytes: int) -> torch.Tensor:
        i = bisect.bisect_left(self._free, (nbytes, 0))
        if i < len(self._free):
            _, address = self._free.pop(i)
            return self._regions[address][:nbytes]
        size = -(-nbytes // _PAGE) * _PAGE
        raw = torch.empty(size + _PAGE, dtype=torch.uint8)
        start = -raw.data_ptr() % _PAGE
        region = raw[start:start + size]
        if self.pin:
            error = torch.cuda.cudart().cudaHostRegister(region.data_ptr(), size, 0)
            if int(error) != 0:
                _take_cuda_error()
                log.warning("could not pin %.2f GiB of CPU memory at its own size (%s); using PyTorch's pinned "
                            "allocator, which may take up to twice that", size / 2**30,
                            torch.cuda.cudart().cudaGetErrorString(error))
                return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)  # not kept: freed by PyTorch
        self._regions[region.data_ptr()] = region
        return region[:nbytes]

    def give_back(self, buffer: torch.Tensor) -> None:
        """A buffer `take` gave, for a later `take`: the copies through it must be queued by then."""
        region = self._regions.get(buffer.data_ptr())
        if region is not None:
            bisect.insort(self._free, (region.numel(), buffer.data_ptr()))

    def release(self) -> None:
        """Unregister every buffer (their copies must be done); the memory goes back to the system as
        the last reference to it goes."""
        if self.pin:
            for address, region in self._regions.items():
                error = torch.cuda.cudart().cudaHostUnregister(address)
                if int(error) != 0:  # a courtesy to the host process: never the run's failure
                    _take_cuda_error()
                    log.warning("could not unpin %.2f GiB of CPU memory (%s)", region.numel() / 2**30,
                                torch.cuda.cudart().cudaGetErrorString(error))
        self._regions, self._free = {}, []


def _take_cuda_error() -> None:
    """CUDA keeps a failed call's error for the next call that checks: a kernel launch takes it here."""
    with contextlib.suppress(RuntimeError):
        torch.zeros(1, device="cuda")


class ActivationOffload:
    """Keeps what chosen blocks save for their backward pass in (pinned) CPU memory.

    `saving(i)` wraps block i's forward pass. The memory of each tensor the block saves
    (its whole storage: compiled code saves views into larger buffers) is copied to CPU
    memory on a side stream once the block's forward pass has queued the work that makes
    it. The GPU memory is let go when `in_flight` more offloaded blocks have started: the
    compute stream first waits for the copy, so the work that reuses the memory runs
    after it, and a bus too slow for the compute slows the step instead of filling the
    GPU. The last `in_flight` of the offloaded `blocks` keep theirs, and copy nothing out:
    their backward pass comes before their memory would be let go.

    In the backward pass, the first tensor read of a block brings the memory of the
    offloaded block before it back on the side stream, so it arrives while the blocks in
    between compute. Each tensor comes back as the same view (offset, shape, strides) of
    its storage, as compiled code expects.

    Weights (`resident`: anything sharing their storage), parameters and small storages
    stay where they are.
    """

    def __init__(self, device: torch.device, resident: Iterable[torch.Tensor] = (), blocks: Iterable[int] = (),
                 in_flight: int | None = None):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.in_flight = max(1, ACTIVATIONS_IN_FLIGHT if in_flight is None else in_flight)
        self._resident = set().union(*map(_addresses, resident))
        self._stay = set(sorted(blocks)[-self.in_flight:])
        self._order: list[int] = []  # offloaded blocks in the order this forward pass ran them
        self._stored: dict[int, dict[int, _Stored]] = {}  # block -> storage address -> its memory
        self._copied_out: dict[int, torch.cuda.Event] = {}
        self._pinned = PinnedBuffers(pin=self.stream is not None)
        self.offloaded_bytes = 0  # by the last forward pass

    @contextlib.contextmanager
    def saving(self, index: int):
        """Context of block `index`'s forward pass."""
        if not torch.is_grad_enabled():
            yield
            return
        if index in self._stored:  # the block runs again: a new forward pass (next micro-batch or step)
            self.clear()
            self.offloaded_bytes = 0
        if len(self._order) >= self.in_flight:
            self._let_go(self._order[-self.in_flight])
        self._order.append(index)
        self._stored[index] = {}
        with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, index), self._unpack):
            yield
        if self.stream is not None:
            self._copied_out[index] = self.stream.record_event()

    def clear(self) -> None:
        """Drop what the last pass left (a run that ended mid-step, or its last backward pass)."""
        if self.stream is not None:  # copies back into memory the compute stream never read may still run
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        for group in self._stored.values():  # the next pass's copies out queue on the side stream behind these
            for stored in group.values():
                if stored.home is not None:
                    self._pinned.give_back(stored.home)
        self._order, self._stored, self._copied_out = [], {}, {}

    def release(self) -> None:
        """At the end of a run: `clear`, and give the pinned CPU memory back to the system."""
        self.clear()
        if self.stream is not None:
            self.stream.synchronize()
        self._pinned.release()

    def _pack(self, index: int, t: torch.Tensor):
        if type(t) is not torch.Tensor or t.device.type != self.device.type:
            return t  # parameters, and tensor subclasses (whose memory is in inner tensors)
        storage = t.untyped_storage()
        if storage.nbytes() < _MIN_OFFLOAD_BYTES or storage.data_ptr() in self._resident:
            return t
        # Held until the copy is done, a storage's address names it for the whole pass.
        stored = self._stored[index].get(storage.data_ptr())
        if stored is None:  # the first tensor saved in this memory: copy all of it out
            memory, home = _bytes_of(storage, t.device), None
            if index not in self._stay:
                home = self._pinned.take(storage.nbytes())
                if self.stream is None:
                    home.copy_(memory)
                else:
                    self.stream.wait_stream(torch.cuda.current_stream(self.device))
                    with torch.cuda.stream(self.stream):
                        home.copy_(memory, non_blocking=True)
            stored = self._stored[index][storage.data_ptr()] = _Stored(index, home, memory)
            self.offloaded_bytes += 0 if home is None else storage.nbytes()
        stored.uses += 1
        return stored, t.dtype, t.storage_offset(), t.shape, t.stride()

    def _let_go(self, index: int) -> None:
        """Free block `index`'s GPU memory; work queued after this on the compute stream runs after its copy out."""
        if index in self._stay:
            return
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self._copied_out[index])
        for stored in self._stored[index].values():
            stored.gpu = None

    def _unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        stored, dtype, offset, shape, stride = saved
        if stored.gpu is None:  # not brought back ahead (or read a second time): now
            self._bring_back(stored.index, also=stored)
        position = self._order.index(stored.index) if stored.index in self._order else 0
        if position > 0 and self._away(self._order[position - 1]):
            self._bring_back(self._order[position - 1])
        memory = stored.gpu
        if stored.ready is not None:
            torch.cuda.current_stream(self.device).wait_event(stored.ready)
        stored.uses -= 1
        if stored.uses <= 0 and stored.home is not None:
            stored.gpu = None  # the backward pass holds it now, and frees it when done
        offset += memory.storage_offset() // dtype.itemsize  # a CPU buffer may start inside its storage
        return torch.empty(0, dtype=dtype, device=memory.device).set_(memory.untyped_storage(), offset, shape, stride)

    def _away(self, index: int) -> bool:
        """Block `index`'s memory is only in CPU memory, and its backward pass has not read any of it."""
        group = self._stored.get(index, {}).values()
        return bool(group) and all(s.gpu is None and s.uses > 0 for s in group)

    def _bring_back(self, index: int, also: _Stored | None = None) -> None:
        group = [s for s in self._stored.get(index, {}).values() if s.gpu is None and (s.uses > 0 or s is also)]
        if self.stream is None:
            for stored in group:
                stored.gpu = stored.home
            return
        for stored in group:
            stored.gpu = torch.empty(stored.home.numel(), dtype=torch.uint8, device=self.device)
        # The compute stream's earlier work may still use the memory just taken from its pool.
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for stored in group:
                stored.gpu.copy_(stored.home, non_blocking=True)
            ready = self.stream.record_event()
        for stored in group:
            stored.ready = ready


def _addresses(t: torch.Tensor) -> set[int]:
    """Where a tensor's memory starts: its storage's, or a wrapper subclass's inner tensors' (comfy-kitchen's
    QuantizedTensor holds its fp8 data and scale in plain tensors)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return set().union(*(_addresses(getattr(t, name)) for name in names))
    return {t.untyped_storage().data_ptr()}


def _bytes_of(storage: torch.UntypedStorage, device: torch.device) -> torch.Tensor:
    """All of a storage's memory, as a uint8 tensor."""
    return torch.empty(0, dtype=torch.uint8, device=device).set_(storage)
