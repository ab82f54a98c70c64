"""Peak accelerator memory of a training run, estimated from the model's sizes and the options.

The activation term is calibrated on measured runs (bench/README.md: H100,
bf16, 1024², rank 16): without checkpointing a FLUX.2 block keeps about 24
hidden-size vectors per token in bf16 for its backward pass, with per-block
checkpointing about one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import TrainConfig
from .errors import OutOfMemory
from .lora import resolve_targets
from .model import ModelSpec, spec_linear_shapes

GIB = 2**30
_ACT_VECTORS_PER_BLOCK = 24.0  # saved activations per token and block, in hidden-size vectors (no checkpointing)
_ACT_VECTORS_CHECKPOINTED = 1.0  # with checkpointing: each block's input...
_ONE_BLOCK_RECOMPUTE = 24.0  # ...plus one block's full activations while it is recomputed
_RUNTIME_OVERHEAD = 1.0 * GIB  # CUDA context, allocator slack, kernels' workspaces
_OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "adafactor": 4}  # per LoRA parameter


@dataclass
class MemoryEstimate:
    parts: dict[str, int]  # name -> bytes
    available: int | None = None  # bytes the device can give the run, when known
    advice: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def verdict(self) -> str:
        if self.available is None:
            return "unknown"
        if self.total <= 0.85 * self.available:
            return "fits"
        if self.total <= self.available:
            return "tight"
        return "does not fit"

    def check(self, margin: float = 1.5, weights_can_stream: bool = False) -> None:
        """Refuse a run that needs far more than the device has (estimates are approximate: a margin).

        Where the frozen weights can stay off the device and stream in per layer
        (ComfyUI offloads them), only the rest has to fit.
        """
        need = self.total - (self.parts["frozen weights"] if weights_can_stream else 0)
        if self.available and need > margin * self.available:
            raise OutOfMemory(f"this run needs about {need / GIB:.0f} GiB"
                              + (" besides the model's weights" if weights_can_stream else "")
                              + f"; the GPU has {self.available / GIB:.0f} GiB.\n{self.summary()}")

    def summary(self) -> str:
        lines = [f"estimated peak {self.total / GIB:.1f} GiB"
                 + (f" of {self.available / GIB:.1f} GiB available: {self.verdict}" if self.available else "")]
        lines += [f"  {name:<22} {size / GIB:6.2f} GiB" for name, size in self.parts.items()]
        if self.verdict in ("tight", "does not fit") and self.advice:
            lines.append("to use less: " + "; ".join(self.advice))
        return "\n".join(lines)


def lora_parameter_count(spec: ModelSpec, cfg: TrainConfig) -> int:
    """LoRA parameters of the run's targets: rank x (in + out) per adapted Linear of the real class."""
    shapes = spec_linear_shapes(spec)
    return cfg.rank * sum(sum(shapes[n]) for n in resolve_targets(shapes, cfg.targets, cfg.target_modules))


def estimate_memory(spec: ModelSpec, cfg: TrainConfig, weight_bytes: int | None = None,
                    available: int | None = None) -> MemoryEstimate:
    """Estimated peak memory of training `spec` with `cfg`.

    `weight_bytes`: what the frozen weights take on the device (ComfyUI knows the
    loaded size, fp8 included); by default the parameter count in `cfg.dtype`.
    """
    act_bytes = 4 if cfg.dtype == "float32" else 2
    if weight_bytes is None:
        weight_bytes = spec.param_count * act_bytes
    lora = lora_parameter_count(spec, cfg)
    tokens = (cfg.resolution // 16) ** 2 + cfg.max_sequence_length
    vector = tokens * spec.hidden_size * act_bytes * cfg.batch_size
    blocks = spec.num_double + spec.num_single
    if cfg.gradient_checkpointing:
        activations = vector * (blocks * _ACT_VECTORS_CHECKPOINTED + _ONE_BLOCK_RECOMPUTE)
    else:
        activations = vector * blocks * _ACT_VECTORS_PER_BLOCK
    parts = {
        "frozen weights": int(weight_bytes),
        "LoRA weights + grads": lora * 8,
        "optimizer state": lora * _OPTIMIZER_BYTES.get(cfg.optimizer, 8),
        "activations": int(activations),
        "runtime overhead": int(_RUNTIME_OVERHEAD),
    }
    est = MemoryEstimate(parts=parts, available=available)
    if not cfg.gradient_checkpointing:
        est.advice.append("turn on gradient checkpointing")
    if cfg.batch_size > 1:
        est.advice.append(f"batch 1 with gradient accumulation {cfg.batch_size * cfg.gradient_accumulation}")
    if cfg.resolution > 512:
        est.advice.append(f"resolution {max(512, cfg.resolution * 3 // 4 // 16 * 16)}")
    if cfg.optimizer in ("adamw", "prodigy"):
        est.advice.append("optimizer adamw8bit")
    if weight_bytes >= spec.param_count * 2:
        est.advice.append("load the model in fp8 (e.g. the fp8 'mixed' checkpoint)")
    return est
