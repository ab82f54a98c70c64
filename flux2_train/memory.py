"""Peak accelerator memory of a training run, what to change when it does not fit, and the `auto` plan.

The estimate is the device's peak in use (what nvidia-smi shows), built from parts:

* frozen weights as stored (bf16, fp16, fp8, 8-bit, 4-bit), less what is offloaded;
* weight casts: where weights are stored in another dtype than the compute dtype or
  stream in from the CPU, each op casts its weight just in time, in the forward and
  the backward pass (a few of the largest layers in flight);
* LoRA weights and gradients (float32) with their compute-dtype casts, and the
  optimizer state, counted exactly from the real class's Linear shapes;
* activations: the tensors a block keeps for its backward pass, per token and block
  (double- and single-stream blocks keep the same to 1%), with or without
  checkpointing; the LoRA gradients replace them at the end of the backward pass;
* batch tensors: latents, noise, targets and text embeddings of one micro-batch;
* runtime: the CUDA context, and what the allocator holds beyond the tensors.

The per-block activation sizes and the runtime terms are calibrated on measured peaks
of real-size FLUX.2 models on an H100 (bench/memory_grid.py, bench/README.md);
everything else follows from the model's config and the options.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from .config import TrainConfig
from .errors import OutOfMemory
from .lora import resolve_targets
from .model import BLOCK_PREFIXES, ModelSpec, spec_linear_shapes
from .offload import ACTIVATIONS_IN_FLIGHT, activation_offload_indices, activation_offload_room, offloaded_indices
from .speed import checkpointed_count

GIB = 2**30

# Bytes per stored weight. 8-bit and 4-bit formats carry a scale per block of 64 weights.
WEIGHT_FORMATS = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0 + 4 / 64, "nf4": 0.5 + 4 / 64}
DTYPE_FORMATS = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
HOSTS = ("engine", "comfyui")

# Activations in hidden-size vectors per token (compute dtype), fitted on the H100 grid
# (bench/README.md): what a block keeps for its backward pass; with checkpointing, what a
# checkpointed block keeps (its inputs) and the peak while one block is recomputed.
ACT_VECTORS_PER_BLOCK = 23.8
ACT_VECTORS_CHECKPOINTED = 1.08
RECOMPUTE_VECTORS = 37.0
# A compiled block (--compile) keeps less: the compiler saves what is cheapest to keep and
# recomputes fused elementwise work (0.74 of the eager block's saved bytes on the tiny model).
# Fitted on three compiled fp8 runs (H200, bench/README.md): [klein] 4B, [klein] 9B and [dev]
# with 30 of 56 blocks checkpointed, each within 2% of PyTorch's reserved peak plus the context.
COMPILED_ACTIVATIONS = 0.85
# Weights cast per op (fp8 storage, streamed from the CPU) have casts in flight in the forward
# and the backward pass: this many of the largest layer's weights in the compute dtype.
CAST_LAYERS = 3.5
CAST_LAYERS_STREAMED = 5.5
# Outside the tensors, by allocator: the driver context, kernels and library handles
# (nvidia-smi minus the allocator's pool), and what the pool holds beyond the tensors.
# "native" is PyTorch's caching allocator (the CLI sets expandable segments; ComfyUI uses it
# with --disable-cuda-malloc); "async" is cudaMallocAsync, ComfyUI's default on CUDA 13, whose
# pool keeps freed blocks: a fixed part and a share of the activations.
# With fp8 weights or weights cast per op, the async pool's peak is not repeatable: 17 runs of
# [klein] 4B fp8 at 1024² (weights cast per op) held either ~1.0 or ~3.2 GiB over the same
# 20.25 GiB of tensors, about half the runs each, and the fp8 weights read in place held 3.4 GiB
# over theirs (bench/README.md). The estimate counts the low mode and states the high one as a
# spread, taken as a share of the activations (the checkpointed fp8 points never showed it);
# the verdict "fits" and `auto` leave room for it.
ALLOCATORS = ("native", "async")
CUDA_CONTEXT = {"native": int(0.75 * GIB), "async": int(0.80 * GIB)}
ALLOCATOR_SLACK = {"native": 0.015, "async": 0.0}  # share of all tensors
ALLOCATOR_POOL = {"native": 0, "async": int(0.80 * GIB)}
ALLOCATOR_POOL_ACTIVATIONS = {"native": 0.0, "async": 0.03}
ASYNC_POOL_SPREAD_ACTIVATIONS = 0.15
_OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4}  # per LoRA parameter

# Relative cost of the memory savings, for the advice and the `auto` plan, from the step times
# of the H100 grid (bench/README.md).
CHECKPOINTING_SLOWDOWN = 0.45  # [klein] 4B at 1024²: 0.292 -> 0.426 s
BATCH_SPLIT_SLOWDOWN = 0.10  # batch 2 as 2 micro-batches of 1
FP8_SLOWDOWN = 0.10  # ComfyUI's fp8 weights streamed and cast per op: 0.346 -> 0.379 s
FP8_MATMUL_SLOWDOWN = 0.0  # the engine's fp8 matmuls: no slower than bf16 (bench/README.md)
# ComfyUI's fp8 weights held on the GPU, multiplied in fp8, compiled ([klein] 4B, H100s): an fp8
# "mixed" file 0.164 s and the loader's fp8_e4m3fn 0.191 s against bf16's 0.179 s (another machine
# for fp8_e4m3fn): the slower of the two.
FP8_IN_PLACE_SLOWDOWN = 0.07
# NF4 against fp8, both compiled ([klein] 4B, H200, bench/README.md): 0.282 s with checkpointing
# against 0.155 s without, which the checkpointing cost above puts at about 1.25 times fp8.
NF4_SLOWDOWN = 0.25
# Streamed weights cross the bus in each pass that uses them; ComfyUI overlaps the copies with
# compute, so a GiB costs less than the bus's rate: 0.006 s per GiB and pass, from two
# [klein] 4B points (5.0 and 7.0 GiB offloaded, with checkpointing).
OFFLOAD_SECONDS_PER_GIB_PASS = 0.006
# The engine's offloaded blocks (--offload-blocks), per GiB and pass, what compute did not hide:
# [klein] 4B, fp8, compiled, all blocks checkpointed, H100: 0.228 s, and 0.269 s with 12 of its
# 25 blocks (1.6 GiB) offloaded (bench/README.md). [dev] has no run without offload at the same
# checkpointing to fit it on.
ENGINE_OFFLOAD_SECONDS_PER_GIB_PASS = 0.013
_EFFECTIVE_FLOPS = 300e12  # what a training step sustains on an H100 (MFU about 30%)
# Activations the bus carries out of the GPU during a forward pass for free: [dev] at 1024²,
# fp8, compiled, H100: 16 blocks' (15.3 GiB; 17.1 by the estimate) cost nothing against the
# checkpoints they replaced, 20 blocks' cost 6% (bench/README.md). Not a bus rate: bytes per
# second of the forward pass as `step_seconds` models it (a third of its step: 0.76 s for that
# run, which took about 0.3 s), so that it scales with the model and the image size. Fitted on
# one H100 host (PCIe 5); a slower bus or a slower card is not measured.
ACTIVATION_BYTES_PER_MODELLED_FORWARD_SECOND = 23 * GIB
# What offloading a block's activations costs, as a share of what checkpointing it costs: the
# 16 blocks above made a step 8.7% faster than checkpointing them did, where the checkpointing
# cost predicts 10.7%.
ACTIVATION_OFFLOAD_SHARE = 0.2


@dataclass(frozen=True)
class Placement:
    """Where the frozen weights live and who runs the model."""

    host: str = "engine"  # "engine" (diffusers) or "comfyui" (ComfyUI's model, the training node)
    weight_format: str = ""  # as stored: a WEIGHT_FORMATS key ("" = the run's dtype)
    stored_bytes: int | None = None  # exact stored size when known (a loaded model, a file header)
    offloaded_bytes: int = 0  # frozen weights kept in CPU memory and streamed in per layer
    streamed: bool = False  # every weight is copied in per op (ComfyUI's DynamicVRAM), resident or not
    casts_per_op: bool = False  # weights in a form the host casts for each op, wherever they are held
    allocator: str = ""  # "native" or "async" ("" = the host's default: native for the engine, async for ComfyUI)
    shards: int = 1  # processes the frozen weights are sharded over (FSDP); each holds 1/shards
    processes: int = 1  # processes of the run (DDP or FSDP when more than one)
    host_free: int | None = None  # CPU memory free for pinned buffers (offloaded activations), where known

    @property
    def allocator_kind(self) -> str:
        return self.allocator or ("async" if self.host == "comfyui" else "native")

    @property
    def streams_weights(self) -> bool:
        """Weights copied in for each op: streamed by the host (DynamicVRAM), or partly offloaded."""
        return self.streamed or self.offloaded_bytes > 0

    @property
    def can_offload(self) -> bool:
        # ComfyUI streams any amount that does not fit; the engine offloads whole blocks (cfg.offload_blocks).
        return self.host == "comfyui"

    def offloads_blocks(self, cfg: TrainConfig) -> bool:
        """The engine can keep whole blocks in CPU memory: one process, plain or fp8 weights."""
        return self.host == "engine" and self.processes == 1 and cfg.quantize_base in ("none", "fp8")

    def offloads_activations(self, cfg: TrainConfig) -> bool:
        """Blocks' activations can wait in CPU memory: one process, CPU memory known, and no weights
        crossing the bus already (streamed or offloaded blocks)."""
        return (self.host_free is not None and self.processes == 1 and not self.streams_weights
                and not cfg.offload_blocks)


@dataclass(frozen=True)
class Advice:
    change: str  # in plain words
    saves: int  # bytes
    slowdown: float | None  # relative step time, None where the change alters the result instead

    def __str__(self) -> str:
        cost = "" if self.slowdown is None else (f", ≈{self.slowdown:.0%} slower" if self.slowdown >= 0.005 else "")
        return f"{self.change} (−{self.saves / GIB:.1f} GiB{cost})"


@dataclass
class MemoryEstimate:
    parts: dict[str, int]  # name -> bytes
    available: int | None = None  # bytes the device can give the run, when known
    settings: dict = field(default_factory=dict)  # what the figure assumes
    advice: list[Advice] = field(default_factory=list)
    streamable: int = 0  # bytes the host could save by offloading every frozen weight
    allocator: str = "native"
    spread: int = 0  # what the allocator may hold beyond `total` on some runs
    block_activations: int = 0  # bytes a block keeps for its backward pass, where it keeps them all

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def upper(self) -> int:
        return self.total + self.spread

    @property
    def training_bytes(self) -> int:
        """What training needs on the device besides the frozen weights and the CUDA context already in use."""
        return self.total - self.parts["frozen weights"] - CUDA_CONTEXT[self.allocator]

    @property
    def verdict(self) -> str:
        if self.available is None:
            return "unknown"
        if self.upper <= 0.9 * self.available:
            return "fits"
        if self.total <= self.available:
            return "tight"
        if self.total - self.streamable <= self.available:  # what check() lets start
            return "fits with offload"
        return "does not fit"

    def check(self, margin: float = 1.0) -> None:
        """Refuse a run whose estimate exceeds what the device gives it (the verdict "does not fit").

        Where the host can offload frozen weights (ComfyUI), only the rest has to fit.
        """
        need = self.total - self.streamable
        if self.available and need > margin * self.available:
            besides = " besides the weights it can offload" if self.streamable else ""
            raise OutOfMemory(
                f"this run needs about {need / GIB:.1f} GiB{besides}, and the GPU has {self.available / GIB:.1f} GiB "
                f"for it; it would run out of memory. Change the settings (or use quick preset 'auto'):\n"
                + self.summary())

    def summary(self) -> str:
        lines = [f"estimated peak {self.total / GIB:.1f} GiB"
                 + (f" (up to {self.upper / GIB:.1f} GiB: cudaMallocAsync's pool varies from run to run; "
                    f"ComfyUI's --disable-cuda-malloc makes it steady)" if self.spread else "")
                 + (f" of {self.available / GIB:.1f} GiB available: {self.verdict}" if self.available else "")]
        if self.settings:
            lines.append("  for " + ", ".join(f"{k} {v}" for k, v in self.settings.items()))
        lines += [f"  {name:<22} {size / GIB:7.2f} GiB" for name, size in self.parts.items()]
        if self.verdict in ("tight", "fits with offload", "does not fit") and self.advice:
            lines.append("to use less:")
            lines += [f"  - {a}" for a in self.advice]
        return "\n".join(lines)

    def table(self) -> str:
        """The breakdown as a markdown table (the CLI prints it)."""
        rows = ["| part | GiB |", "|---|---:|"]
        rows += [f"| {name} | {size / GIB:.2f} |" for name, size in self.parts.items()]
        rows.append(f"| **total** | **{self.total / GIB:.2f}** |")
        return "\n".join(rows)


def lora_parameter_count(spec: ModelSpec, cfg: TrainConfig) -> int:
    """LoRA parameters of the run's targets: rank x (in + out) per adapted Linear of the real class."""
    shapes = spec_linear_shapes(spec)
    return cfg.rank * sum(sum(shapes[n]) for n in resolve_targets(shapes, cfg.targets, cfg.target_modules))


def stored_format(stored_bytes: int | None, param_count: int) -> str:
    """"fp8" when the weights take about a byte each (fp8 files, ComfyUI's fp8 "mixed" models), else ""."""
    return "fp8" if stored_bytes and stored_bytes <= 1.1 * param_count else ""


def weight_format(placement: Placement, cfg: TrainConfig) -> str:
    if placement.weight_format:
        return placement.weight_format
    if placement.host == "engine" and cfg.quantize_base != "none":
        return cfg.quantize_base
    return DTYPE_FORMATS[cfg.dtype]


def offloaded_block_bytes(spec: ModelSpec, cfg: TrainConfig, placement: Placement = Placement()) -> list[float]:
    """Stored bytes of each block the run keeps in CPU memory (`--offload-blocks`; the engine, one process)."""
    if not cfg.offload_blocks or not placement.offloads_blocks(cfg):
        return []
    sizes = block_params(spec)
    per_weight = WEIGHT_FORMATS[weight_format(placement, cfg)]
    return [sizes[i] * per_weight for i in offloaded_indices(len(sizes), cfg)]


def block_params(spec: ModelSpec) -> list[int]:
    """Linear parameters of each transformer block, in the order the model runs them."""
    sizes: dict[str, int] = {}
    for name, (i, o) in spec_linear_shapes(spec).items():
        if name.startswith(BLOCK_PREFIXES):
            block = ".".join(name.split(".")[:2])
            sizes[block] = sizes.get(block, 0) + i * o
    return ([sizes[f"{BLOCK_PREFIXES[0]}{i}"] for i in range(spec.num_double)]
            + [sizes[f"{BLOCK_PREFIXES[1]}{i}"] for i in range(spec.num_single)])


def stored_weight_bytes(spec: ModelSpec, cfg: TrainConfig, placement: Placement = Placement()) -> int:
    if placement.stored_bytes is not None:
        return int(placement.stored_bytes)
    return int(spec.param_count * WEIGHT_FORMATS[weight_format(placement, cfg)])


def image_tokens_of(cfg: TrainConfig, buckets: list[tuple[int, int]] | None = None) -> int:
    """Image tokens of the largest micro-batch: the largest bucket, or resolution² without a dataset."""
    if buckets:
        return max((w // 16) * (h // 16) for w, h in buckets)
    return (cfg.resolution // 16) ** 2


def estimate_memory(spec: ModelSpec, cfg: TrainConfig, placement: Placement = Placement(),
                    available: int | None = None, buckets: list[tuple[int, int]] | None = None,
                    advise: bool = True) -> MemoryEstimate:
    """Estimated peak device memory of training `spec` with `cfg` (see the module's notes)."""
    compute_bytes = 4 if cfg.dtype == "float32" else 2
    stored = stored_weight_bytes(spec, cfg, placement)
    offloaded = min(placement.offloaded_bytes, stored)
    fmt = weight_format(placement, cfg)
    streamed = placement.streams_weights
    # fp8 weights held on the device multiply in fp8 on both hosts (the engine's fp8 layers, ComfyUI's
    # weights read in place): none is cast to the compute dtype.
    casts = streamed or placement.casts_per_op or fmt not in (DTYPE_FORMATS[cfg.dtype], "fp8")
    largest_layer = max(i * o for i, o in spec_linear_shapes(spec).values())

    lora = lora_parameter_count(spec, cfg)
    tokens = image_tokens_of(cfg, buckets) + cfg.max_sequence_length
    vector = tokens * spec.hidden_size * compute_bytes * cfg.batch_size  # one hidden-size vector per token
    blocks = spec.num_double + spec.num_single
    # The peak is at one end of the backward pass: all saved activations and no LoRA
    # gradients yet, or all gradients while the first block's activations are still held.
    recomputed = checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
    # ComfyUI's blocks run eager where it casts weights per op (ComfyFlux2Backbone.compile_blocks).
    compiled = cfg.compile and (placement.host == "engine" or not casts)
    per_block = ACT_VECTORS_PER_BLOCK * (COMPILED_ACTIVATIONS if compiled else 1.0)
    # Blocks whose activations wait in CPU memory hold none on the GPU, but for the few in flight.
    kept_out = len(activation_offload_indices(blocks, cfg))
    keeping = blocks - recomputed - kept_out + min(kept_out, ACTIVATIONS_IN_FLIGHT)
    if recomputed:
        # The first `recomputed` blocks keep their inputs; the rest keep everything until the
        # backward pass reaches them, and have let it go by the time a recomputation starts.
        inputs = recomputed * ACT_VECTORS_CHECKPOINTED
        held = vector * (inputs + max(keeping * per_block, RECOMPUTE_VECTORS))
        last = vector * RECOMPUTE_VECTORS
    else:
        held = vector * keeping * per_block
        last = vector * per_block
    grads = 4 * lora
    latent_elems = cfg.batch_size * spec.in_channels * image_tokens_of(cfg, buckets)
    batch = latent_elems * 4 * 5 + cfg.batch_size * cfg.max_sequence_length * spec.context_dim * compute_bytes

    resident = stored - offloaded
    slots = 0
    moved = offloaded_block_bytes(spec, cfg, placement)
    if moved:
        # Whole checkpointed blocks in CPU memory, streamed through (up to) two GPU slots of the largest.
        resident -= int(sum(moved))
        slots = int(min(2, len(moved)) * max(moved))
    if placement.shards > 1:
        # Each process holds its shard, plus the block being gathered and the next one (prefetch).
        sizes = block_params(spec)
        per_param = stored / spec.param_count
        largest_block = max(sizes) * per_param
        # The root's own weights (embedders, final layer) stay gathered through each pass.
        root = max(0, spec.param_count - sum(sizes)) * per_param
        resident = int(stored / placement.shards + (2 * largest_block + root) * (1 - 1 / placement.shards))
    parts = {
        "frozen weights": resident,
        # Casts in flight, in largest layers (fitted on the ComfyUI points of the H100 grid).
        "weight casts": int((CAST_LAYERS_STREAMED if streamed else CAST_LAYERS) * largest_layer * compute_bytes)
                        if casts else 0,
        "LoRA weights": lora * (4 + (compute_bytes if compute_bytes < 4 else 0)),  # float32, and autocast's copy
        # The optimizer's, and the float32 average of an --ema-decay run.
        "optimizer state": lora * (_OPTIMIZER_BYTES.get(cfg.optimizer, 8) + (4 if cfg.ema_decay else 0)),
        "activations + grads": int(max(held, last + grads)),
        "batch tensors": int(batch),
    }
    if slots:
        parts["offload slots"] = slots
    kind = placement.allocator_kind
    parts["runtime overhead"] = (CUDA_CONTEXT[kind] + ALLOCATOR_POOL[kind]
                                 + int(ALLOCATOR_SLACK[kind] * sum(parts.values()))
                                 + int(ALLOCATOR_POOL_ACTIVATIONS[kind] * parts["activations + grads"]))
    settings = {"resolution": f"{cfg.resolution}" if not buckets else _bucket_text(buckets), "batch": cfg.batch_size,
                "rank": cfg.rank, "targets": cfg.targets,
                "weights": fmt + (f" ({offloaded / GIB:.1f} GiB offloaded)" if offloaded else "")
                + (f" ({len(moved)} blocks offloaded)" if moved else ""),
                "checkpointing": ("off" if not recomputed else "on" if recomputed == blocks
                                  else f"{recomputed} of {blocks} blocks"), "optimizer": cfg.optimizer}
    if kept_out:
        pinned = (kept_out - min(kept_out, ACTIVATIONS_IN_FLIGHT)) * per_block * vector / GIB
        settings["activations offloaded"] = f"{kept_out} blocks' ({pinned:.1f} GiB in pinned CPU memory)"
    streamable = 0
    if placement.can_offload and offloaded < stored:  # what streaming every weight would save, casts included
        everything = dataclasses.replace(placement, offloaded_bytes=stored)
        streamable = sum(parts.values()) - estimate_memory(spec, cfg, everything, buckets=buckets, advise=False).total
    est = MemoryEstimate(parts=parts, available=available, settings=settings, streamable=max(0, streamable),
                         allocator=kind, spread=int(ASYNC_POOL_SPREAD_ACTIVATIONS * parts["activations + grads"])
                         if (casts or fmt == "fp8") and kind == "async" else 0,
                         block_activations=int(per_block * vector))
    if advise:
        est.advice = advice(spec, cfg, placement, est, buckets)
    return est


def _bucket_text(buckets) -> str:
    w, h = max(buckets, key=lambda b: (b[0] // 16) * (b[1] // 16))
    return f"{w}x{h} (largest bucket)"


def step_seconds(spec: ModelSpec, cfg: TrainConfig, buckets=None) -> float:
    """Rough H100 seconds of one micro-batch: 4 x P x T FLOPs of frozen Linears plus attention."""
    tokens = image_tokens_of(cfg, buckets) + cfg.max_sequence_length
    blocks = spec.num_double + spec.num_single
    flops = 4 * spec.param_count * tokens + 12 * tokens * tokens * spec.hidden_size * blocks
    return cfg.batch_size * flops / _EFFECTIVE_FLOPS


def offload_slowdown(spec: ModelSpec, cfg: TrainConfig, offloaded: int, buckets=None) -> float:
    """Streamed weights cross the bus in the forward pass, the backward pass, and the recompute."""
    passes = 3 if cfg.gradient_checkpointing else 2
    return passes * offloaded / GIB * OFFLOAD_SECONDS_PER_GIB_PASS / step_seconds(spec, cfg, buckets)


def engine_offload_slowdown(spec: ModelSpec, cfg: TrainConfig, buckets=None) -> float:
    """The engine's offloaded blocks cross the bus twice a step (forward, recompute), partly hidden by compute."""
    moved = sum(offloaded_block_bytes(spec, cfg, Placement("engine")))
    return 2 * moved / GIB * ENGINE_OFFLOAD_SECONDS_PER_GIB_PASS / step_seconds(spec, cfg, buckets)


def activation_offload_budget(spec: ModelSpec, cfg: TrainConfig, placement: Placement, est: MemoryEstimate,
                              buckets=None) -> int:
    """Blocks whose activations can wait in CPU memory for little cost: as many as the bus carries
    out during a forward pass, in half the free CPU memory (pinned). None where weights already
    cross the bus (streamed or offloaded), with several processes, or where CPU memory is unknown."""
    if not placement.offloads_activations(cfg) or est.block_activations <= 0:
        return 0
    by_bus = ACTIVATION_BYTES_PER_MODELLED_FORWARD_SECOND * step_seconds(spec, cfg, buckets) / 3
    by_host = 0.5 * placement.host_free
    return int(min(by_bus, by_host) // est.block_activations)


def recompute_cost(cfg: TrainConfig, blocks: int) -> float:
    """The step time `cfg`'s checkpointed and offloaded-activation blocks add, as a share of a step
    that keeps every block's activations on the GPU."""
    recomputed = checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
    return CHECKPOINTING_SLOWDOWN * (recomputed + ACTIVATION_OFFLOAD_SHARE * cfg.offload_activations) / blocks


def offloading_activations_instead(spec: ModelSpec, cfg: TrainConfig, placement: Placement, est: MemoryEstimate,
                                   limit: int, buckets=None, available: int | None = None
                                   ) -> tuple[TrainConfig, MemoryEstimate] | None:
    """`cfg` (whose estimate is `est`) with as many of its checkpointed blocks as the budget allows keeping
    their activations in CPU memory instead (`activation_offload_budget`), where the estimate stays under
    `limit`; or None."""
    blocks = spec.num_double + spec.num_single
    recomputed = checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
    if recomputed <= ACTIVATIONS_IN_FLIGHT:
        return None
    budget = min(recomputed, activation_offload_budget(spec, cfg, placement, est, buckets))
    # The last ACTIVATIONS_IN_FLIGHT offloaded blocks keep theirs on the GPU: fewer save nothing.
    for k in range(budget, ACTIVATIONS_IN_FLIGHT, -1):
        left = recomputed - k
        # The last block keeps its activations: where every block was checkpointed, it is one of the k.
        c = dataclasses.replace(cfg, gradient_checkpointing=left > 0, checkpoint_blocks=left,
                                offload_activations=min(k, activation_offload_room(blocks, left)))
        est = estimate_memory(spec, c, placement, available, buckets, advise=False)
        if est.upper <= limit:
            return c, est
    return None


def fewest_offloaded_blocks(spec: ModelSpec, cfg: TrainConfig, placement: Placement, limit: int, buckets=None,
                            first: int = 1, available: int | None = None) -> tuple[TrainConfig, "MemoryEstimate"]:
    """`cfg` with the fewest offloaded blocks (from `first`) whose estimate stays under `limit`,
    or with every checkpointed block offloaded where none does; and its estimate."""
    blocks = spec.num_double + spec.num_single
    recomputed = checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
    c, est = cfg, None
    for k in range(first, recomputed + 1):
        c = dataclasses.replace(cfg, offload_blocks=k)
        est = estimate_memory(spec, c, placement, available, buckets, advise=False)
        if est.upper <= limit:
            break
    return c, est or estimate_memory(spec, c, placement, available, buckets, advise=False)


def advice(spec, cfg, placement, est, buckets=None) -> list[Advice]:
    """Changes that lower the estimate, cheapest in speed first; those that change the result last."""

    def saving(**changes) -> int:
        p = changes.pop("placement", placement)
        b = changes.pop("buckets", buckets)
        new = dataclasses.replace(cfg, **changes)
        return est.total - estimate_memory(spec, new, p, buckets=b, advise=False).total

    found: list[Advice] = []
    if cfg.optimizer == "adamw":
        found.append(Advice("optimizer adamw8bit", saving(optimizer="adamw8bit"), 0.0))
    if WEIGHT_FORMATS[weight_format(placement, cfg)] >= 2:
        if placement.host == "comfyui":
            fp8 = dataclasses.replace(placement, weight_format="fp8", stored_bytes=None)
            found.append(Advice("load the model with weight_dtype fp8_e4m3fn (or an fp8 file)", saving(placement=fp8),
                                FP8_SLOWDOWN if placement.streams_weights else FP8_IN_PLACE_SLOWDOWN))
        elif cfg.dtype == "bfloat16":
            found.append(Advice("--quantize-base fp8", saving(quantize_base="fp8"), FP8_MATMUL_SLOWDOWN))
    if placement.host == "engine" and WEIGHT_FORMATS[weight_format(placement, cfg)] > WEIGHT_FORMATS["nf4"]:
        found.append(Advice("--quantize-base nf4 (QLoRA, needs bitsandbytes)", saving(quantize_base="nf4"),
                            NF4_SLOWDOWN))
    if cfg.batch_size > 1:
        found.append(Advice(f"batch 1 with gradient accumulation {cfg.batch_size * cfg.gradient_accumulation}",
                            saving(batch_size=1, gradient_accumulation=cfg.batch_size * cfg.gradient_accumulation),
                            BATCH_SPLIT_SLOWDOWN))
    if not cfg.gradient_checkpointing:
        found.append(Advice("turn gradient checkpointing on", saving(gradient_checkpointing=True),
                            CHECKPOINTING_SLOWDOWN))
    blocks = spec.num_double + spec.num_single
    per_block = est.parts["frozen weights"] / blocks
    if placement.can_offload and per_block > 0 and est.available and est.upper > 0.9 * est.available:
        k = min(blocks, math.ceil((est.upper - 0.9 * est.available) / per_block))
        off = int(k * per_block)
        what = "all the weights" if k == blocks else f"{k} of {blocks} blocks"
        found.append(Advice(f"offload {what} to the CPU (ComfyUI does this when the model does not fit)", off,
                            offload_slowdown(spec, cfg, off, buckets)))
    if placement.offloads_blocks(cfg) and est.available and est.upper > 0.9 * est.available:
        # Checkpointing stays as set, or (where it is off) is turned on for every block.
        ckpt = dict(gradient_checkpointing=True, checkpoint_blocks=cfg.checkpoint_blocks
                    if cfg.gradient_checkpointing else 0)
        offloading, _ = fewest_offloaded_blocks(spec, dataclasses.replace(cfg, **ckpt), placement,
                                                int(0.9 * est.available), buckets, first=cfg.offload_blocks + 1)
        if offloading.offload_blocks > cfg.offload_blocks:
            also = "" if cfg.gradient_checkpointing else " with --gradient-checkpointing"
            found.append(Advice(f"--offload-blocks {offloading.offload_blocks}{also} (their weights stay in CPU "
                                "memory)", saving(offload_blocks=offloading.offload_blocks, **ckpt),
                                engine_offload_slowdown(spec, offloading, buckets)
                                + (0.0 if cfg.gradient_checkpointing else CHECKPOINTING_SLOWDOWN)))
    found.sort(key=lambda a: a.slowdown)
    if cfg.resolution > 512:
        lower = max(512, cfg.resolution * 3 // 4 // 64 * 64)
        scale = lower / cfg.resolution
        smaller = [(max(16, round(w * scale / 16) * 16), max(16, round(h * scale / 16) * 16)) for w, h in buckets or []]
        found.append(Advice(f"resolution {lower}", saving(resolution=lower, buckets=smaller or None), None))
    if cfg.rank > 16:
        found.append(Advice(f"rank 16 (alpha {cfg.alpha * 16 / cfg.rank:g}: the same scale)",
                            saving(rank=16, alpha=cfg.alpha * 16 / cfg.rank), None))
    return [a for a in found if a.saves >= 0.05 * GIB]


@dataclass
class AutoPlan:
    cfg: TrainConfig
    estimate: MemoryEstimate
    reason: str  # what was chosen and why, in a sentence ("" when nothing was planned)
    changes: list[str] = field(default_factory=list)


def plan_auto(spec: ModelSpec, cfg: TrainConfig, placement: Placement, available: int | None,
              buckets=None, margin: float = 0.9, split_batch: bool = True) -> AutoPlan:
    """The fastest memory settings that fit `margin` x `available`.

    Candidates keep the effective batch, resolution, rank and optimizer: gradient
    checkpointing on or off, the batch as one pass or (with `split_batch`) as accumulated
    micro-batches of 1, and (where the host streams weights) what must be offloaded.
    Ranked by the step-time model of `step_seconds` with the measured costs of each saving.
    A split batch changes which images share a forward pass and the data order, so a
    resumed run does not split.
    """
    if available is None:
        est = estimate_memory(spec, cfg, placement, None, buckets)
        return AutoPlan(cfg, est, "auto: no GPU memory limit known: the settings as given")
    candidates = []
    blocks = spec.num_double + spec.num_single
    engine_offload = placement.offloads_blocks(cfg)
    for recompute in sorted({0, blocks // 4, blocks // 2, 3 * blocks // 4, blocks}):
        ckpt = recompute > 0
        for split in ((False, True) if cfg.batch_size > 1 and split_batch else (False,)):
            changes = dict(gradient_checkpointing=ckpt, checkpoint_blocks=0 if recompute == blocks else recompute)
            if split:
                changes.update(batch_size=1, gradient_accumulation=cfg.batch_size * cfg.gradient_accumulation)
            if engine_offload:
                changes["offload_blocks"] = 0  # decided below, like checkpointing
            changes["offload_activations"] = 0  # likewise
            c = dataclasses.replace(cfg, **changes)
            p = placement
            est = estimate_memory(spec, c, p, available, buckets, advise=False)
            for _ in range(3):  # offloading adds cast buffers: settle in a few rounds
                over = est.upper - int(margin * available)
                if over <= 0 or not p.can_offload or over > est.parts["frozen weights"]:
                    break
                p = dataclasses.replace(p, offloaded_bytes=p.offloaded_bytes + over)
                est = estimate_memory(spec, c, p, available, buckets, advise=False)
            if est.upper > margin * available and engine_offload:
                c, est = fewest_offloaded_blocks(spec, c, p, int(margin * available), buckets, available=available)
            if est.upper > margin * available:
                continue
            cost = 1.0 + (BATCH_SPLIT_SLOWDOWN if split else 0.0)
            cost += offload_slowdown(spec, c, p.offloaded_bytes - placement.offloaded_bytes, buckets)
            cost += engine_offload_slowdown(spec, c, buckets)
            candidates.append((cost + recompute_cost(c, blocks), c, est, p))
            offloading = offloading_activations_instead(spec, c, p, est, int(margin * available), buckets, available)
            if offloading:
                c, est = offloading
                candidates.append((cost + recompute_cost(c, blocks), c, est, p))
    if not candidates:
        smallest = estimate_memory(spec, dataclasses.replace(cfg, gradient_checkpointing=True, batch_size=1),
                                   placement, available, buckets)
        raise OutOfMemory(f"no setting of gradient checkpointing and batch split fits this GPU "
                          f"({available / GIB:.1f} GiB available, {margin:.0%} used at most); the smallest "
                          f"needs about {smallest.total / GIB:.1f} GiB:\n{smallest.summary()}")
    cost, chosen, est, p = min(candidates, key=lambda c: c[0])
    est = estimate_memory(spec, chosen, p, available, buckets)
    what = []
    recompute = checkpointed_count(blocks, chosen.gradient_checkpointing, chosen.checkpoint_blocks)
    if recompute != checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks):
        what.append("gradient checkpointing " + ("off" if not recompute else "on" if recompute == blocks
                                                 else f"on {recompute} of {blocks} blocks"))
    if chosen.batch_size != cfg.batch_size:
        what.append(f"batch {chosen.batch_size} with gradient accumulation {chosen.gradient_accumulation}")
    if chosen.offload_blocks != cfg.offload_blocks:
        what.append(f"{chosen.offload_blocks} blocks' weights offloaded to CPU memory" if chosen.offload_blocks
                    else "no blocks offloaded")
    if p.offloaded_bytes > placement.offloaded_bytes:
        what.append(f"{(p.offloaded_bytes - placement.offloaded_bytes) / GIB:.1f} GiB of weights offloaded")
    if chosen.offload_activations != cfg.offload_activations:
        what.append(f"{chosen.offload_activations} blocks' activations in CPU memory" if chosen.offload_activations
                    else "no activations offloaded")
    plain = estimate_memory(spec, cfg, placement, available, buckets, advise=False)
    relative = cost / (1.0 + recompute_cost(cfg, blocks)) - 1
    speed = f"≈{relative:.0%} slower" if relative >= 0.005 else (f"≈{-relative:.0%} faster" if relative <= -0.005
                                                                   else "about as fast")
    given = f"as given the run needs about {plain.total / GIB:.1f} GiB"
    given += (f", over {margin:.0%} of the {available / GIB:.1f} GiB available" if plain.upper > margin * available
              else f" of the {available / GIB:.1f} GiB available")
    if what:
        reason = f"auto: {', '.join(what)}: {given}; now about {est.total / GIB:.1f} GiB ({speed})"
    else:
        reason = f"auto: the settings as given are the fastest that fit: {given}"
    return AutoPlan(chosen, est, reason, what)


def plan_run(spec: ModelSpec, cfg: TrainConfig, placement: Placement, available: int | None,
             buckets=None, resuming: bool = False) -> AutoPlan:
    """The preflight of every run: the `auto` plan when asked for, else the estimate of the settings as given.

    With the memory check off, an `auto` that finds nothing that fits takes the smallest
    candidate and lets the run try.
    """
    if cfg.quick_preset == "auto":
        try:
            return plan_auto(spec, cfg, placement, available, buckets, split_batch=not resuming)
        except OutOfMemory as e:
            if cfg.memory_check:
                raise
            smallest = dataclasses.replace(cfg, gradient_checkpointing=True, offload_activations=0)
            return AutoPlan(smallest, estimate_memory(spec, smallest, placement, available, buckets),
                            f"auto: {str(e).splitlines()[0]}; trying with gradient checkpointing on (memory check "
                            "off)", ["gradient checkpointing on"])
    return AutoPlan(cfg, estimate_memory(spec, cfg, placement, available, buckets), "")


STRATEGIES = ("auto", "ddp", "fsdp")


def choose_strategy(spec: ModelSpec, cfg: TrainConfig, available: int | None, processes: int,
                    buckets=None, asked: str = "auto", resuming: bool = False) -> tuple[str, Placement, str]:
    """DDP or FSDP for a run of several processes, the engine's placement for it, and why.

    DDP keeps the whole model on every GPU and sends only the LoRA gradients: the fastest,
    where the model fits. FSDP shards the frozen weights, so each GPU holds about 1/N of
    them and gathers one block at a time, at the cost of that traffic in every pass.
    """
    whole, sharded = Placement("engine", processes=processes), Placement("engine", shards=processes, processes=processes)
    if asked == "ddp":
        return "ddp", whole, "multi-GPU: DDP, as asked"
    if asked == "fsdp":
        return "fsdp", sharded, "multi-GPU: FSDP, as asked"
    one = plan_run(spec, dataclasses.replace(cfg, memory_check=False), whole, available, buckets,
                   resuming=resuming).estimate
    if available is None or one.upper <= 0.9 * available:
        return "ddp", whole, (f"multi-GPU auto: DDP: the whole model fits each GPU (about {one.total / GIB:.1f} GiB"
                              + (f" of {available / GIB:.1f}" if available else "") + "), only LoRA gradients travel")
    return "fsdp", sharded, (f"multi-GPU auto: FSDP: the whole model would need about {one.total / GIB:.1f} GiB of "
                             f"the {available / GIB:.1f} GiB each GPU has; sharded over {processes}, each GPU holds "
                             f"about 1/{processes} of the {one.parts['frozen weights'] / GIB:.1f} GiB of weights")


def plan_processes(spec: ModelSpec, cfg: TrainConfig, placement: Placement, available: int | None, processes: int,
                   buckets=None, resuming: bool = False) -> tuple[str, str, AutoPlan]:
    """`plan_run` for a run of `processes`: with several, DDP or FSDP first. Returns (strategy, why, plan)."""
    strategy = why = ""
    if processes > 1:
        strategy, placement, why = choose_strategy(spec, cfg, available, processes, buckets, cfg.multi_gpu,
                                                   resuming=resuming)
    return strategy, why, plan_run(spec, cfg, placement, available, buckets, resuming=resuming)


def allocator_in_use() -> str:
    """"async" when PyTorch runs cudaMallocAsync (ComfyUI's default on CUDA 13), else "native"."""
    import torch

    if not torch.cuda.is_available():  # CPU-only builds lack the query
        return "native"
    return "async" if torch.cuda.get_allocator_backend() == "cudaMallocAsync" else "native"


def preview_plan(spec: ModelSpec, cfg: TrainConfig, placement: Placement, available: int | None,
                 buckets=None) -> AutoPlan:
    """`plan_run` for display: where `auto` finds nothing that fits, the settings as given and why."""
    try:
        return plan_run(spec, cfg, placement, available, buckets)
    except OutOfMemory as e:
        return AutoPlan(cfg, estimate_memory(spec, cfg, placement, available, buckets),
                        "auto: " + str(e).splitlines()[0])


def host_memory_free() -> int:
    """CPU memory free now (psutil's "available"; psutil comes with accelerate)."""
    import psutil

    return int(psutil.virtual_memory().available)


def device_available_memory(device) -> int | None:
    """Bytes this process can use on `device`: all of it less what other processes hold (None off CUDA)."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    device = torch.device(device)
    free, total = torch.cuda.mem_get_info(device)
    # Our own allocator pool and context count as ours; the estimate's total includes the context.
    available = free + torch.cuda.memory_reserved(device) + CUDA_CONTEXT["native"]
    get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # a cap this process was given
    index = device.index if device.index is not None else torch.cuda.current_device()
    fraction = get_fraction(index) if get_fraction else 1.0
    return min(available, int(fraction * total) + CUDA_CONTEXT["native"])
