"""The FLUX.2 backbone contract, its diffusers implementation, and model loading.

The training loop only talks to a `Flux2Backbone`: an nn.Module to put adapters
in, its transformer blocks, one `predict` in the model's own latent layout, and
a `ModelSpec` that says which FLUX.2 it is. ComfyUI's FLUX.2 model implements
the same protocol in `nodes/`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import nn

from . import speed
from .errors import ModelError
from .lora import add_lora, linear_shapes, load_lora_state_dict, lora_parameters, lora_state_dict
from .offload import BlockOffload
from .quantize import has_fp8_matmul, quantize_base

if TYPE_CHECKING:
    from .memory import Placement

log = logging.getLogger(__name__)

# Transformer shapes of the released FLUX.2 models (diffusers config names).
KNOWN_FAMILIES = {
    "dev": dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360),
    "klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288),
    "klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680),
}
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
FAMILY_TITLES = {"dev": "FLUX.2 [dev]", "klein-9b": "FLUX.2 [klein] 9B", "klein-4b": "FLUX.2 [klein] 4B"}


@dataclass(frozen=True)
class ModelSpec:
    """Which FLUX.2 this is and the sizes the estimate and the checks need."""

    family: str  # "dev", "klein-4b", "klein-9b", or "custom" (other sizes, e.g. the tiny test model)
    hidden_size: int
    num_double: int
    num_single: int
    num_heads: int
    head_dim: int
    context_dim: int
    in_channels: int
    mlp_ratio: float
    guidance_embeds: bool
    param_count: int
    distilled: bool | None = None  # klein: step-distilled or base; None when unknown

    @property
    def title(self) -> str:
        if self.family in FAMILY_TITLES:
            name = FAMILY_TITLES[self.family]
            if self.family.startswith("klein") and self.distilled is not None:
                name += " (distilled)" if self.distilled else " base"
            return name
        kind = "[dev]-like" if self.guidance_embeds else "[klein]-like"
        return f"FLUX.2 {kind} custom size ({self.param_count / 1e6:.1f}M parameters)"

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_embeds

    def to_dict(self) -> dict:
        return asdict(self)


@runtime_checkable
class Flux2Backbone(Protocol):
    """What the training loop needs from a FLUX.2 implementation."""

    spec: ModelSpec

    @property
    def module(self) -> nn.Module: ...

    @property
    def blocks(self) -> list[nn.Module]: ...

    def predict(
        self,
        latents: torch.Tensor,
        sigmas: torch.Tensor,
        text_embeds: torch.Tensor,
        guidance: float | None = None,
    ) -> torch.Tensor:
        """Velocity for `latents` (B, 128, h, w), patchified and normalised as the FLUX.2 pipelines do."""
        ...

    def enable_gradient_checkpointing(self, blocks: int = 0) -> None:
        """Recompute the first `blocks` transformer blocks in the backward pass (0: all of them)."""
        ...

    def offload_activations(self, indices: list[int], offload) -> None:
        """Blocks `indices` (not checkpointed) run their forward pass in `offload.saving(i)`, an
        `offload.ActivationOffload`; called after `enable_gradient_checkpointing`."""
        ...

    def compile_blocks(self) -> str | None:
        """`torch.compile` each transformer block on its own (regional); called after `prepare`,
        `enable_gradient_checkpointing` and `offload_activations`.

        Returns why the blocks stay eager where this model cannot compile them, else None.
        """
        ...

    # Optional: `quantize(fmt, device, dtype)` stores the frozen block weights as `fmt`
    # (config.BASE_FORMATS) on `device`, before `prepare`. A host that stores its own weights
    # (ComfyUI) has none.

    def set_training(self, training: bool) -> None:
        """Train mode (LoRA dropout on) or eval mode, for the validation loss and previews."""
        ...

    # Adapters. Layer names are diffusers' (`transformer_blocks.0.attn.to_q`) on every
    # backbone, so adapter state dicts, checkpoints and LoRA files are interchangeable.
    def lora_layers(self) -> dict[str, tuple[int, int]]:
        """Linear layers an adapter can go on: name -> (in_features, out_features)."""
        ...

    def prepare(self, device: torch.device, dtype: torch.dtype, training_bytes: int = 0) -> None:
        """Put the frozen weights on `device`, ready to train in `dtype`.

        `training_bytes`: what training needs besides the weights (the memory estimate); a
        host that can offload weights keeps that much free.
        """
        ...

    def memory_placement(self) -> "Placement":
        """How the frozen weights are stored and held, for the memory estimate."""
        ...

    def add_lora(self, targets: list[str], rank: int, alpha: float, dropout: float, seed: int) -> list[nn.Parameter]:
        """Add adapters on `targets` (initialised by `lora.initial_lora_weights`); return their parameters."""
        ...

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """`<layer>.lora_A.weight` / `<layer>.lora_B.weight`, float32 on the CPU."""
        ...

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def release(self) -> None:
        """Undo what `prepare` and `add_lora` changed in a model shared with others."""
        ...


def spec_from_config(config: dict, distilled: bool | None = None, param_count: int | None = None) -> ModelSpec:
    """Name the FLUX.2 family of a diffusers `Flux2Transformer2DModel` config."""
    heads, head_dim = config["num_attention_heads"], config["attention_head_dim"]
    hidden = heads * head_dim
    family = "custom"
    for name, shape in KNOWN_FAMILIES.items():
        if all(config.get(k) == v for k, v in shape.items()) and head_dim == 128:
            family = name
    return ModelSpec(
        family=family,
        hidden_size=hidden,
        num_double=config["num_layers"],
        num_single=config["num_single_layers"],
        num_heads=heads,
        head_dim=head_dim,
        context_dim=config["joint_attention_dim"],
        in_channels=config.get("in_channels", 128),
        mlp_ratio=float(config.get("mlp_ratio", 3.0)),
        guidance_embeds=bool(config.get("guidance_embeds", True)),
        param_count=param_count if param_count is not None else _count_params(config),
        distilled=distilled if family.startswith("klein") else None,
    )


@functools.lru_cache(maxsize=8)
def spec_linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    """Every Linear of the real diffusers class at this size, built on the meta device (no memory used)."""
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(
            num_layers=spec.num_double, num_single_layers=spec.num_single, num_attention_heads=spec.num_heads,
            attention_head_dim=spec.head_dim, joint_attention_dim=spec.context_dim, in_channels=spec.in_channels,
            mlp_ratio=spec.mlp_ratio, guidance_embeds=spec.guidance_embeds)
    return linear_shapes(model)


def _parameters_of(model: nn.Module) -> int:
    """A loaded model's own count: no second model built on the meta device to count it again."""
    return sum(p.numel() for p in model.parameters())


def _count_params(config: dict) -> int:
    """Parameter count from the real class, built on the meta device (no memory used)."""
    from diffusers import Flux2Transformer2DModel
    from diffusers.utils import logging as diffusers_logging

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # keys this diffusers does not know are the loader's to report
    try:
        with torch.device("meta"):
            model = Flux2Transformer2DModel.from_config(cfg)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return sum(p.numel() for p in model.parameters())


class DiffusersFlux2Backbone:
    """`Flux2Backbone` over diffusers' `Flux2Transformer2DModel`."""

    def __init__(self, transformer: nn.Module, spec: ModelSpec | None = None):
        self.transformer = transformer
        self.spec = spec or spec_from_config(dict(transformer.config), param_count=_parameters_of(transformer))
        self._forward: nn.Module = transformer  # what predict() calls: the model, or its DDP wrapper

    @property
    def module(self) -> nn.Module:
        return self.transformer

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)

    def enable_gradient_checkpointing(self, blocks: int = 0) -> None:
        speed.checkpoint_blocks(self.blocks, blocks or len(self.blocks))

    def offload_activations(self, indices: list[int], offload) -> None:
        speed.offload_activations(self.blocks, indices, offload)

    def compile_blocks(self) -> str | None:
        speed.compile_blocks(self.blocks)
        return None

    def quantize(self, fmt: str, device: torch.device, dtype: torch.dtype, offloaded: tuple[int, ...] = ()) -> None:
        """Store the blocks' Linear weights as `fmt`, block by block; blocks to offload go back to CPU memory."""
        count = 0
        for i, block in enumerate(self.blocks):
            count += quantize_base(block, fmt, device, dtype)
            if i in offloaded:
                block.to("cpu")
        if count:
            log.info("%d block Linear layers stored as %s", count, fmt)
        if fmt == "fp8" and not has_fp8_matmul(device):
            why = ("this GPU has no fp8 matmul" if device.type == "cuda"
                   else f"this torch build's fp8 matmul on {device.type} takes no row scales")
            log.warning("%s: fp8 weights are dequantized per layer (memory saved, no speed-up)", why)

    def offload(self, indices: list[int], device: torch.device) -> BlockOffload:
        return BlockOffload(self.blocks, indices, device)

    def set_training(self, training: bool) -> None:
        self.transformer.train(training)

    def lora_layers(self) -> dict[str, tuple[int, int]]:
        return linear_shapes(self.transformer)

    def memory_placement(self) -> "Placement":
        from .memory import Placement, host_memory_free

        # Stored in the run's dtype, all on the device. Asked before `prepare`, while a model loaded
        # from a file still sits in CPU memory: those bytes are free once it moves.
        tensors = (*self.transformer.parameters(), *self.transformer.buffers())
        leaving = sum(t.numel() * t.element_size() for t in tensors if t.device.type == "cpu")
        return Placement("engine", host_free=host_memory_free() + leaving)

    def prepare(self, device: torch.device, dtype: torch.dtype, training_bytes: int = 0,
                offloaded: tuple[int, ...] = ()) -> None:
        """Move the model to `device` in `dtype`; the blocks to offload stay in CPU memory."""
        for i, block in enumerate(self.blocks):  # one block at a time: the offloaded ones never reach the GPU
            block.to("cpu" if i in offloaded else device)
        for module in self.transformer.children():
            if module not in (self.transformer.transformer_blocks, self.transformer.single_transformer_blocks):
                module.to(device)
        for t in [*self.transformer.parameters(recurse=False), *self.transformer.buffers(recurse=False)]:
            t.data = t.data.to(device)  # none in diffusers' class today
        for module in self.transformer.modules():
            if getattr(module, "quantized_base", False):
                continue  # stored as quantized; its scales stay float32
            for store in (module._parameters, module._buffers):
                for name, t in store.items():
                    if t is not None and t.is_floating_point() and t.dtype != dtype:
                        t.data = t.data.to(dtype)

    def add_lora(self, targets, rank, alpha, dropout, seed):
        from .lora_fp8 import add_adapters_into_fp8_matmuls

        add_lora(self.transformer, targets, rank, alpha, dropout, seed=seed)
        add_adapters_into_fp8_matmuls(self.transformer)
        return lora_parameters(self.transformer)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.transformer)

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state_dict(self.transformer, state)

    def release(self) -> None:
        pass  # the engine owns this model outright

    def distribute(self, accelerator, strategy: str) -> nn.Module:
        """Spread the model over the processes of a run.

        "ddp": accelerate's DDP, a whole model per GPU, the LoRA gradients averaged. "fsdp":
        PyTorch's FSDP2 (`fully_shard`) per transformer block and at the root, from the model
        in CPU memory, so each GPU only ever holds its shard and the block being gathered.
        """
        if strategy == "ddp":
            self._forward = accelerator.prepare_model(self.transformer)
            return self._forward
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        device = accelerator.device
        mesh = init_device_mesh(device.type, (accelerator.num_processes,))
        for block in self.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(self.transformer, mesh=mesh)
        return self.transformer

    def predict(self, latents, sigmas, text_embeds, guidance=None):
        b, c, h, w = latents.shape
        device = latents.device
        # Position ids exactly as the FLUX.2 pipelines build them: (t, h, w, l) for image tokens,
        # (0, 0, 0, l) for text tokens. Built where they are used: a blocking copy of a CPU tensor would
        # make the host wait until the GPU has run everything queued, the step before included.
        img_ids = torch.cartesian_prod(*(torch.arange(n, device=device) for n in (1, h, w, 1)))
        txt_ids = torch.cartesian_prod(*(torch.arange(n, device=device) for n in (1, 1, 1, text_embeds.shape[1])))
        packed = latents.reshape(b, c, h * w).permute(0, 2, 1)
        guidance_t = None
        if self.spec.guidance_embeds:
            g = 1.0 if guidance is None else guidance
            guidance_t = torch.full((b,), float(g), device=device, dtype=torch.float32)
        out = self._forward(
            hidden_states=packed,
            encoder_hidden_states=text_embeds,
            timestep=sigmas,  # the model scales sigma by 1000 itself
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance_t,
            return_dict=False,
        )[0]
        # Tokens are in row-major (h, w) order, so a reshape undoes the packing.
        return out.permute(0, 2, 1).reshape(b, -1, h, w)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------

_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.")


def _strip_prefix(keys: list[str]) -> tuple[str, list[str]]:
    for prefix in _PREFIXES:
        if any(k.startswith(prefix + "double_blocks.") or k.startswith(prefix + "input_blocks.")
               or k.startswith(prefix + "joint_blocks.") for k in keys):
            return prefix, [k[len(prefix):] for k in keys if k.startswith(prefix)]
    return "", keys


def identify_checkpoint(keys: list[str]) -> str:
    """'flux2' for a FLUX.2 transformer in BFL/ComfyUI layout; otherwise raise ModelError naming what it is."""
    _, stripped = _strip_prefix(keys)
    ks = set(stripped)
    if "double_stream_modulation_img.lin.weight" in ks and "img_in.weight" in ks:
        return "flux2"
    if any(k.startswith("conditioner.embedders") for k in keys):
        what = "SDXL"
    elif "double_blocks.0.img_mod.lin.weight" in ks:
        what = "FLUX.1 (or a FLUX.1 derivative)"
    elif "joint_blocks.0.x_block.attn.qkv.weight" in ks:
        what = "Stable Diffusion 3"
    elif "input_blocks.0.0.weight" in ks:
        what = "a Stable Diffusion UNet (SD 1.x / 2.x / SDXL)"
    elif "transformer_blocks.0.attn.to_q.weight" in ks and "single_transformer_blocks.0.attn.to_qkv_mlp_proj.weight" in ks:
        return "flux2-diffusers"
    else:
        what = "not a diffusion transformer the trainer knows"
    raise ModelError(
        f"this model is {what}; the trainer needs FLUX.2 [dev] or FLUX.2 [klein] (4B or 9B). "
        "Point --model at a FLUX.2 transformer file (e.g. flux2-dev.safetensors, flux-2-klein-base-4b.safetensors) "
        "or a diffusers FLUX.2 folder."
    )


def config_from_bfl_state_dict(shapes: dict[str, tuple]) -> dict:
    """Diffusers config of a FLUX.2 transformer from the tensor shapes of its BFL checkpoint."""
    hidden, in_ch = shapes["img_in.weight"]
    double = {int(k.split(".")[1]) for k in shapes if k.startswith("double_blocks.")}
    single = {int(k.split(".")[1]) for k in shapes if k.startswith("single_blocks.")}
    mlp_out = shapes["double_blocks.0.img_mlp.0.weight"][0]
    return {
        "_class_name": "Flux2Transformer2DModel",
        "in_channels": in_ch,
        "num_layers": len(double),
        "num_single_layers": len(single),
        "attention_head_dim": 128,
        "num_attention_heads": hidden // 128,
        "joint_attention_dim": shapes["txt_in.weight"][1],
        "mlp_ratio": mlp_out / 2 / hidden,
        "guidance_embeds": "guidance_in.in_layer.weight" in shapes,
        "patch_size": 1,
        "out_channels": shapes["final_layer.linear.weight"][0],
    }


def family_spec(family: str) -> ModelSpec:
    """ModelSpec of a released FLUX.2 by name (dev, klein-4b, klein-9b), from the real class's config."""
    if family not in KNOWN_FAMILIES:
        raise ModelError(f"unknown FLUX.2 model {family!r}; name one of {', '.join(KNOWN_FAMILIES)} or give a path")
    return spec_from_config(dict(KNOWN_FAMILIES[family], attention_head_dim=128, in_channels=128, mlp_ratio=3.0,
                                 guidance_embeds=family == "dev"))


def is_size_name(model: str) -> bool:
    """A released FLUX.2 named by size (dev, klein-4b, klein-9b), not a path that happens to exist."""
    return model in KNOWN_FAMILIES and not Path(model).expanduser().exists()


def spec_for(model: str) -> tuple[ModelSpec, int | None]:
    """ModelSpec and stored weight bytes (None when not known) of a family name, file or diffusers folder.

    Reads headers and config files only: fast enough for the preflight before a model is loaded.
    """
    p = Path(model).expanduser()
    if is_size_name(model):
        return family_spec(model), None
    if not p.exists():
        raise ModelError(f"model path {p} does not exist; pass --model with a FLUX.2 transformer file or diffusers "
                         f"folder (or one of {', '.join(KNOWN_FAMILIES)} to estimate)")
    if p.is_file() and p.suffix == ".safetensors":
        try:
            return spec_from_file(p)
        except ModelError:
            raise
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ModelError(f"{p} is not a readable safetensors file ({e}); download it again") from None
    folder = p / "transformer" if (p / "transformer" / "config.json").is_file() else p
    if (folder / "config.json").is_file():
        cfg = _read_json(folder / "config.json")
        _check_diffusers_class(cfg)
        params = _param_count(_weight_files(folder))
        return spec_from_config(cfg, distilled=_klein_distilled_hint(p), param_count=params), None
    raise ModelError(f"--model {model!r} is neither a FLUX.2 name ({', '.join(KNOWN_FAMILIES)}), a .safetensors "
                     "file, nor a diffusers folder with a config.json")


def _weight_files(folder: Path) -> list[Path]:
    """A diffusers model folder's safetensors weights: one file, or the shards its index names; a
    ModelError naming what is missing, before anything loads."""
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted({folder / name for name in _read_json(index).get("weight_map", {}).values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing or not files:
            raise ModelError(f"{folder} is missing {', '.join(missing) or 'every shard'}, which {index.name} "
                             "lists; download the model again")
        return files
    single = folder / "diffusion_pytorch_model.safetensors"
    if not single.is_file():
        raise ModelError(f"{folder} has no {single.name} (nor a sharded index); FLUX.2 weights are loaded from "
                         "safetensors only, without variants (.fp16 and such): download the model's safetensors files")
    return [single]


def _param_count(files: list[Path]) -> int:
    """The parameters in safetensors files, from their headers (an fp8 file's scales left out). Fast:
    building the class to count them would import diffusers, seconds before a --num-gpus launch."""
    from safetensors import safe_open

    count = 0
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                count += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys()
                             if not key.endswith(_NOT_WEIGHTS))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ModelError(f"{file} is not a readable safetensors file ({e}); download it again") from None
    return count


def _check_diffusers_class(config: dict) -> None:
    cls = config.get("_class_name", "?")
    if cls != "Flux2Transformer2DModel":
        what = {"FluxTransformer2DModel": "FLUX.1", "UNet2DConditionModel": "a Stable Diffusion UNet",
                "SD3Transformer2DModel": "Stable Diffusion 3"}.get(cls, cls)
        raise ModelError(f"this model is {what}; the trainer needs FLUX.2 [dev] or FLUX.2 [klein] (4B or 9B)")


def spec_from_file(path: str | Path) -> tuple[ModelSpec, int]:
    """ModelSpec and stored weight bytes of a single-file FLUX.2 transformer, from its header alone (fast)."""
    from safetensors import safe_open

    shapes, stored = {}, 0
    with safe_open(str(path), framework="pt") as f:
        prefix, _ = _strip_prefix(list(f.keys()))
        if identify_checkpoint(list(f.keys())) == "flux2-diffusers":
            raise _diffusers_named_file(path)
        for key in f.keys():
            s = f.get_slice(key)
            shape, dtype = tuple(s.get_shape()), s.get_dtype()
            stored += math.prod(shape) * _DTYPE_BYTES.get(dtype, 2)
            if key.startswith(prefix):
                shapes[key[len(prefix):]] = shape
    params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(_NOT_WEIGHTS))
    return spec_from_config(config_from_bfl_state_dict(shapes), distilled=_klein_distilled_hint(Path(path)),
                            param_count=params), stored


# Scales beside quantized weights (ComfyUI's fp8 layouts, NVFP4), not parameters of the model.
_NOT_WEIGHTS = (".weight_scale", ".weight_scale_2", ".comfy_quant", ".input_scale", ".scale_weight", ".scale_input",
                "scaled_fp8")
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "U8": 1, "I8": 1, "I64": 8, "I32": 4}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}") from None


def _klein_distilled_hint(path: Path) -> bool | None:
    """klein base vs distilled: the pipeline says so; single files say it in their name."""
    for candidate in (path, path.parent, path.parent.parent):
        index = candidate / "model_index.json" if candidate.is_dir() else None
        if index and index.is_file():
            value = _read_json(index).get("is_distilled")
            if value is not None:
                return bool(value)
    name = path.name.lower()
    if "base" in name:
        return False
    if "klein" in name:
        return True
    return None


def load_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> DiffusersFlux2Backbone:
    """Load a FLUX.2 transformer from a diffusers folder or a single BFL/ComfyUI .safetensors file."""
    from diffusers import Flux2Transformer2DModel

    p = Path(path).expanduser()
    if not str(path):
        raise ModelError("no model given; pass --model with a FLUX.2 transformer file or diffusers folder")
    if not p.exists():
        raise ModelError(f"model path {p} does not exist; pass --model with a FLUX.2 transformer file or diffusers folder")
    distilled = _klein_distilled_hint(p)
    if p.is_dir():
        folder = p / "transformer" if (p / "transformer" / "config.json").is_file() else p
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{p} has no config.json or transformer/config.json; is it a diffusers FLUX.2 folder?")
        cfg = _read_json(cfg_path)
        _check_diffusers_class(cfg)
        _weight_files(folder)
        model = Flux2Transformer2DModel.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    elif p.suffix == ".safetensors":
        model = _load_single_file(p, dtype)
    else:
        raise ModelError(f"{p} is neither a folder nor a .safetensors file; FLUX.2 weights are loaded from safetensors only")
    model.requires_grad_(False)
    spec = spec_from_config(dict(model.config), distilled=distilled, param_count=_parameters_of(model))
    if spec.family.startswith("klein") and spec.distilled:
        log.warning(
            "%s is the step-distilled klein; LoRAs train better on klein base (e.g. FLUX.2-klein-base-4B) "
            "and load on both.", spec.title)
    return DiffusersFlux2Backbone(model, spec)


def _diffusers_named_file(p: Path) -> ModelError:
    return ModelError(f"{p} holds diffusers-named FLUX.2 weights; put it in a folder with its config.json and pass "
                      "the folder")


def _load_single_file(p: Path, dtype: torch.dtype):
    from diffusers import Flux2Transformer2DModel
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
            kind = identify_checkpoint(keys)
            prefix, stripped = _strip_prefix(keys)
            shapes = {k: tuple(f.get_slice(prefix + k).get_shape()) for k in stripped}
    except ModelError:
        raise
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise ModelError(f"{p} is not a readable safetensors file ({e}); download it again") from None
    if kind == "flux2-diffusers":
        raise _diffusers_named_file(p)
    config = config_from_bfl_state_dict(shapes)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        # from_single_file converts BFL names to diffusers' with diffusers' own converter;
        # the config comes from the file's shapes, so nothing is fetched from a hub.
        source = str(p)
        if prefix:  # diffusers' converter expects bare BFL names
            from safetensors.torch import load_file

            source = {k[len(prefix):]: v for k, v in load_file(str(p)).items() if k.startswith(prefix)}
        return Flux2Transformer2DModel.from_single_file(source, config=tmp, dtype=dtype, local_files_only=True)
