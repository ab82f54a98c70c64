"""ComfyUI's FLUX.2 MODEL behind the engine's `Flux2Backbone` contract.

The trainer works on the MODEL the graph already loaded; nothing is copied (but for a
streamed MODEL that fits: the DynamicVRAM item below):
- a clone of the ModelPatcher is loaded through ComfyUI's model management, so
  the MODEL other nodes hold keeps its patches and options;
- adapters are forward hooks on ComfyUI's own Linear modules (`base(x) + lora(x)`),
  removed after the run. Module names never change (PEFT's `base_layer` renaming
  would break ComfyUI's weight patching), hooks compose with whatever else wraps
  a module's forward (an upstream bypass LoRA), and offloading stays ComfyUI's;
  the base weights are only read;
- weights stored in another dtype (fp8 files, the loader's fp8 weight dtype) are
  read where ComfyUI holds them when they all sit on the GPU: fp8 multiplies in
  fp8 (the engine's `fp8_linear`, which also adds such a Linear's adapter into
  its product in place, in place of the hook), and the blocks compile. Streamed
  or offloaded weights go through ComfyUI's own casts, eager;
- a MODEL that DynamicVRAM (ComfyUI's default on NVIDIA) streams, and whose weights
  take at most `RESIDENT_SHARE` of the GPU, trains on ComfyUI's non-dynamic delegate
  of it instead: the same file loaded again, whole on the GPU, so the blocks compile
  (ComfyUI's own trainer loads its model again too). It is unloaded after the run;
- one ComfyUI Linear can hold several diffusers layers (`img_attn.qkv` is
  `to_q`, `to_k`, `to_v`): its adapter is the diffusers layers' LoRAs side by
  side, so the math, the state dict and the files equal the engine's.
"""

from __future__ import annotations

import functools
import logging
import types

import torch
import torch.utils.checkpoint
from torch import nn

import comfy.model_base
import comfy.model_management
import comfy.ops
from flux2_train.errors import ConfigError, ModelError
from flux2_train.keys import bfl_target, diffusers_linear_names
from flux2_train.lora import LoraPair, check_rank
from flux2_train.memory import DTYPE_FORMATS, Placement, allocator_in_use, host_memory_free, stored_format
from flux2_train.model import ModelSpec, spec_from_config
from flux2_train.quantize import compute_dtype_of, fp8_linear, fp8_matmul_fits, has_fp8_matmul
from flux2_train.speed import pinned_attention

log = logging.getLogger(__name__)

# ComfyUI model classes a user may plug in by mistake, by the name users know them by.
_MODEL_NAMES = {
    "Flux": "FLUX.1", "FluxInpaint": "FLUX.1 Fill", "Chroma": "Chroma (a FLUX.1 derivative)",
    "SDXL": "SDXL", "SDXLRefiner": "SDXL Refiner", "BaseModel": "Stable Diffusion 1.x/2.x",
    "SD3": "Stable Diffusion 3", "HunyuanVideo": "HunyuanVideo", "WAN21": "Wan 2.1", "WAN22": "Wan 2.2",
    "QwenImage": "Qwen-Image", "Lumina2": "Lumina 2 / Z-Image", "AuraFlow": "AuraFlow",
}


def model_kind(model_patcher) -> str:
    model = getattr(model_patcher, "model", None)
    name = type(model).__name__
    return _MODEL_NAMES.get(name, name)


def check_flux2(model_patcher) -> None:
    """Raise ModelError unless `model_patcher` holds ComfyUI's FLUX.2 model."""
    if not isinstance(getattr(model_patcher, "model", None), comfy.model_base.Flux2):
        raise ModelError(
            f"this MODEL is {model_kind(model_patcher)}; the trainer needs FLUX.2 [dev] or [klein]. "
            "Load a FLUX.2 diffusion model (e.g. flux2_dev_fp8mixed.safetensors or "
            "flux-2-klein-base-4b.safetensors) with Load Diffusion Model and connect that MODEL."
        )


# A streamed (DynamicVRAM) MODEL trains on a resident copy where its weights take at most this share
# of the GPU's memory: the rest holds the activations. A larger one trains streamed, eager.
RESIDENT_SHARE = 0.6


def trains_resident_copy(model_patcher) -> bool:
    """Whether training takes ComfyUI's non-dynamic delegate of this MODEL (`ComfyFlux2Backbone.prepare`):
    DynamicVRAM streams it, its loader can load it again (a stock loader), it takes at most
    `RESIDENT_SHARE` of the GPU (less what ComfyUI's --reserve-vram keeps free), and the CPU memory
    free holds it."""
    if not model_patcher.is_dynamic() or getattr(model_patcher, "cached_patcher_init", None) is None:
        return False
    size = model_patcher.model_size()
    mm = comfy.model_management
    total = mm.get_total_memory(model_patcher.load_device) - mm.extra_reserved_memory()
    # The copy passes through CPU memory on its way to the GPU.
    return size <= RESIDENT_SHARE * total and size < host_memory_free()


def comfy_spec(model_patcher) -> ModelSpec:
    """The engine's ModelSpec from ComfyUI's FLUX.2 parameters."""
    p = model_patcher.model.diffusion_model.params
    return spec_from_config(dict(
        num_layers=p.depth, num_single_layers=p.depth_single_blocks,
        num_attention_heads=p.num_heads, attention_head_dim=p.hidden_size // p.num_heads,
        joint_attention_dim=p.context_in_dim, in_channels=p.in_channels, mlp_ratio=p.mlp_ratio,
        guidance_embeds=p.guidance_embed, timestep_guidance_channels=256,
        axes_dims_rope=tuple(p.axes_dim), rope_theta=p.theta, patch_size=p.patch_size,
    ))


class FusedLoraAdapter(nn.Module):
    """The adapter of one ComfyUI Linear: the LoRAs of the diffusers layers fused into it.

    `pieces` lists the fused output's slices in order, each a LoraPair or None
    (a slice without an adapter adds nothing). Registered as a forward hook, it
    adds its output to the Linear's; a Linear whose fp8 weight is read in place
    adds it into its own matmul instead (`stacked`).
    """

    def __init__(self, pieces: list[LoraPair | None], widths: list[int], swap_halves: bool = False):
        super().__init__()
        self.pieces = nn.ModuleList([p if p is not None else nn.Identity() for p in pieces])
        self.active = [p is not None for p in pieces]
        self.widths = widths
        self.swap_halves = swap_halves  # final adaLN: diffusers (scale, shift), ComfyUI (shift, scale)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        outs = [piece(x) if on else x.new_zeros(*x.shape[:-1], width)
                for piece, on, width in zip(self.pieces, self.active, self.widths)]
        out = outs[0] if len(outs) == 1 else torch.cat([o.to(outs[0].dtype) for o in outs], dim=-1)
        if self.swap_halves:
            out = torch.cat(out.chunk(2, dim=-1)[::-1], dim=-1)
        return out

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.delta(args[0]).to(output.dtype)

    def stacked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pieces as one pair (h, B) with `delta(x) == h B^T`, for `fp8_linear`'s `lora`: their
        down-projections side by side, their scaled up-projections block-diagonal in the output's
        order (zero rows, and no rank, for a slice without an adapter)."""
        dtype = self.pieces[self.active.index(True)].lora_B.weight.dtype
        hs, ups = [], []
        for piece, on, width in zip(self.pieces, self.active, self.widths):
            if on:
                hs.append(piece.down(x))
                ups.append(piece.lora_B.weight * piece.scaling)
            else:
                ups.append(x.new_zeros((width, 0), dtype=dtype))
        up = torch.block_diag(*ups)
        if self.swap_halves:
            up = torch.cat(up.chunk(2)[::-1])
        return torch.cat(hs, dim=-1), up


class RecomputeInBackward(torch.autograd.Function):
    """`fn(x)` that runs `fn` again in the backward pass instead of keeping what it used.

    When ComfyUI casts weights per op (fp8 storage, offloaded or streamed weights),
    each op casts its weight into a buffer that later ops reuse; autograd would keep
    a reference to that buffer (or a cast copy of every weight) and compute input
    gradients from whatever weight was cast into it last. Running the op again in the
    backward pass casts its own weight afresh.

    Used where `CastLinearInBackward` cannot be: ops with a weight that are not
    ComfyUI's own Linear (norms), and Linears whose forward someone replaced (an
    upstream bypass LoRA). For an affine op (such a Linear) the input gradient does
    not depend on the input, so nothing is kept: the op runs again on zeros of the
    input's shape. Other ops keep their input.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, fn, affine: bool) -> torch.Tensor:
        ctx.fn, ctx.autocast = fn, _autocast_state(x.device.type)
        if affine:
            ctx.input_like = (x.shape, x.dtype, x.device)
        else:
            ctx.input_like = None
            ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.input_like is not None:
            shape, dtype, device = ctx.input_like
            x = torch.zeros(shape, dtype=dtype, device=device)
        else:
            (x,) = ctx.saved_tensors
        with torch.enable_grad(), torch.autocast(**ctx.autocast):
            x = x.detach().requires_grad_(True)
            out = ctx.fn(x)
        (grad_x,) = torch.autograd.grad(out, x, grad)
        return grad_x, None, None


class CastLinearInBackward(torch.autograd.Function):
    """A ComfyUI Linear with its weight cast per op: the backward pass casts the weight again
    and computes the input gradient from it (one matmul, as autograd would; nothing kept)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: nn.Module, forward) -> torch.Tensor:
        ctx.module, ctx.input_like, ctx.autocast = module, (x.dtype, x.device), _autocast_state(x.device.type)
        with torch.no_grad():
            return forward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.input_like
        probe = torch.empty(0, dtype=dtype, device=device)  # the cast follows the input's dtype and device
        with torch.no_grad(), torch.autocast(**ctx.autocast), \
                comfy.ops.CastBiasWeightContext(ctx.module, probe, offloadable=True) as (weight, _):
            grad_x = torch.matmul(grad.to(weight.dtype), weight)
        return grad_x.to(dtype), None, None


def _autocast_state(device_type: str) -> dict:
    """The forward pass's autocast, to run the backward pass's recompute under (on any device)."""
    return dict(device_type=device_type, dtype=torch.get_autocast_dtype(device_type),
                enabled=torch.is_autocast_enabled(device_type))


class ComfyFlux2Backbone:
    """`Flux2Backbone` over a ComfyUI FLUX.2 ModelPatcher, trained in place without a copy."""

    def __init__(self, model_patcher):
        check_flux2(model_patcher)
        self.patcher = model_patcher.clone()
        self.spec = comfy_spec(model_patcher)
        self._bind(self.patcher)
        # Decided once: the estimate counts the weights as the run will hold them.
        self._resident_copy = trains_resident_copy(model_patcher)
        self._pairs: dict[str, LoraPair] = {}
        self._hooks: list = []  # RemovableHandles of the adapters' and LayerNorms' hooks
        # (module, attribute, the instance's own value before the run, or _UNSET): forwards, cast flags
        self._instance_attrs: list[tuple[nn.Module, str, object]] = []
        self._checkpointing = 0  # blocks recomputed in the backward pass, the first ones
        self._offloaded: set[int] = set()  # blocks whose activations `_activation_offload` keeps
        self._activation_offload = None
        self.compiled = False  # set by `compile_blocks` where the blocks can compile
        self._runners = (_run_double, _run_single)
        self._converted: list[tuple[nn.Module, str, bool, torch.Tensor]] = []
        self._was_in_training = comfy.model_management.in_training
        self._prepared = False
        self._streamed_source = None  # the DynamicVRAM clone whose delegate this run trains on
        self.streams_weights = False  # weights go through ComfyUI's per-op casts (eager)
        self.fp8_layers = 0  # Linears multiplying ComfyUI's fp8 weights in fp8
        self._eager_reason: str | None = None

    # -- the protocol ----------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.diffusion_model

    @property
    def blocks(self) -> list[nn.Module]:
        return list(self.diffusion_model.double_blocks) + list(self.diffusion_model.single_blocks)

    def enable_gradient_checkpointing(self, blocks: int = 0) -> None:
        self._checkpointing = blocks or len(self.blocks)

    def offload_activations(self, indices: list[int], offload) -> None:
        self._offloaded, self._activation_offload = set(indices), offload

    def compile_blocks(self) -> str | None:
        """Regional compile: every block runs through a replace patch that calls a compiled runner.

        The runner copies the block's inputs inside the compiled code, so the blocks' in-place
        residual adds touch nothing autograd saved outside it. Weights that go through ComfyUI's
        cast and streaming code (`streams_weights`) do not compile: those blocks run eager.
        """
        if self.streams_weights:
            return self._eager_reason
        self.compiled = True
        self._runners = (torch.compile(_run_double), torch.compile(_run_single))
        return None

    def set_training(self, training: bool) -> None:
        self.diffusion_model.train(training)
        for pair in self._pairs.values():  # the adapters live beside ComfyUI's modules, not in them
            pair.train(training)

    def compute_dtype(self) -> torch.dtype:
        return self.patcher.model.get_dtype_inference()

    def lora_layers(self) -> dict[str, tuple[int, int]]:
        s = self.spec
        layers = {}
        for name in diffusers_linear_names(s.num_double, s.num_single, s.guidance_embeds):
            target = bfl_target(name)
            m = self._named[target.name]
            layers[name] = (m.in_features, m.out_features // target.parts)
        return layers

    def memory_placement(self) -> Placement:
        return self.placement_of(self.patcher, self._resident_copy)

    @staticmethod
    def placement_of(model_patcher, resident_copy: bool | None = None) -> Placement:
        """The weights as ComfyUI's loader stored them (fp8 included); ComfyUI decides what to offload."""
        stored = str(model_patcher.model.get_dtype()).removeprefix("torch.")
        size = model_patcher.model_size()
        # fp8 "mixed" models report their compute dtype, not their storage; ComfyUI stores
        # dtypes other than these three as fp8 variants.
        fmt = stored_format(size, comfy_spec(model_patcher).param_count) or DTYPE_FORMATS.get(stored, "fp8")
        if resident_copy is None:
            resident_copy = trains_resident_copy(model_patcher)
        streamed = model_patcher.is_dynamic() and not resident_copy
        return Placement("comfyui", fmt, stored_bytes=size, streamed=streamed,
                         casts_per_op=_cast_per_op(model_patcher.model.diffusion_model), allocator=allocator_in_use(),
                         host_free=host_memory_free())

    def prepare(self, device: torch.device, dtype: torch.dtype, training_bytes: int = 0) -> None:
        compute = self.compute_dtype()
        if dtype != compute:
            raise ConfigError(f"this MODEL computes in {str(compute).removeprefix('torch.')}; train it with that "
                              f"dtype, not {str(dtype).removeprefix('torch.')} (set dtype to auto)")
        if self._resident_copy:
            self._take_resident_copy()
        # Through ComfyUI's model management, so other models leave the GPU first.
        comfy.model_management.load_models_gpu([self.patcher], memory_required=training_bytes)
        self._make_weights_trainable()
        if self.patcher.is_dynamic():
            self._eager_reason = ("ComfyUI streams this MODEL's weights (DynamicVRAM, its default on NVIDIA), and its "
                                  "streaming code does not compile. A MODEL from Load Diffusion Model or a checkpoint "
                                  f"loader whose weights take at most {RESIDENT_SHARE:.0%} of the GPU trains on a copy "
                                  "held on the GPU, which compiles (or start ComfyUI with --disable-dynamic-vram)")
            _forget_streamed_casts(self.diffusion_model)
        elif self.patcher.loaded_size() < self.patcher.model_size():
            self._eager_reason = ("ComfyUI keeps part of this MODEL's weights in CPU memory (they do not fit beside "
                                  "the training), and its offload code does not compile; blocks compile where the "
                                  "whole model sits on the GPU (gradient checkpointing leaves it more room)")
        elif _casts_weights(self.diffusion_model):
            self._eager_reason = self._read_weights_in_place(self.patcher.load_device, compute)
        if self._eager_reason:
            # Weights cast per op would otherwise be kept in their cast form by autograd: a second
            # copy of the model.
            log.info("MODEL weights are streamed, offloaded or cast per op: the backward pass casts them again")
            self.streams_weights = True
            self._recompute_weighted_ops()
        self._copy_layer_norm_inputs()
        if "optimized_attention_override" in self.patcher.model_options.get("transformer_options", {}):
            log.info("the MODEL's attention override is for sampling; training runs PyTorch's SDPA instead")
        # ComfyUI's fused kernels (e.g. comfy_kitchen's RoPE) have no backward; this
        # flag makes its model code take the differentiable path.
        comfy.model_management.in_training = True
        self._prepared = True

    def add_lora(self, targets, rank, alpha, dropout, seed):
        layers = self.lora_layers()
        check_rank(layers, targets, rank)
        device = comfy.model_management.get_torch_device()
        by_module: dict[str, tuple] = {}  # ComfyUI Linear -> (its BflTarget, {slice: LoraPair})
        for name in targets:
            in_f, out_f = layers[name]
            pair = LoraPair(name, in_f, out_f, rank, alpha, dropout, seed).to(device)
            self._pairs[name] = pair
            t = bfl_target(name)
            by_module.setdefault(t.name, (t, {}))[1][t.part] = pair
        for module_name, (t, parts) in by_module.items():
            module = self._named[module_name]
            adapter = FusedLoraAdapter([parts.get(i) for i in range(t.parts)],
                                       [module.out_features // t.parts] * t.parts, swap_halves=t.swap_halves)
            weight_in_place = module.__dict__.get("_weight_in_place")
            if weight_in_place is not None and weight_in_place[0].dtype == torch.float8_e4m3fn:
                # Added into the fp8 product in place (`_linear_in_place`), not written and summed after it.
                # The same function bound to each module: compiled blocks of a kind still share one graph.
                self._set_for_the_run(module, "_lora_in_matmul", adapter.stacked)
            else:
                self._hooks.append(module.register_forward_hook(adapter.hook))
        return [p for pair in self._pairs.values() for p in pair.parameters()]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{part}.weight": getattr(pair, part).weight.detach().float().cpu().clone()
                for name, pair in self._pairs.items() for part in ("lora_A", "lora_B")}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {f"{name}.{part}.weight": getattr(pair, part).weight
               for name, pair in self._pairs.items() for part in ("lora_A", "lora_B")}
        unknown = sorted(set(state) - set(own))
        if unknown:
            raise ConfigError(f"adapter weights do not fit this model ({len(unknown)} unknown keys, e.g. {unknown[0]})")
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)

    def predict(self, latents, sigmas, text_embeds, guidance=None):
        b = latents.shape[0]
        kwargs = {}
        if self.spec.guidance_embeds:
            g = 1.0 if guidance is None else float(guidance)
            kwargs["guidance"] = torch.full((b,), g, device=latents.device, dtype=torch.float32)
        timesteps = self.patcher.model.model_sampling.timestep(sigmas).float()
        return self.diffusion_model(latents, timesteps, context=text_embeds,
                                    transformer_options=self._transformer_options(), **kwargs)

    def release(self) -> None:
        """Remove the adapters and give the shared modules and weights back exactly as they were."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for module, name, own in reversed(self._instance_attrs):
            if own is _UNSET:
                delattr(module, name)  # back to the class's
            else:
                setattr(module, name, own)
        self._instance_attrs.clear()
        for module, name, is_param, original in reversed(self._converted):
            (module._parameters if is_param else module._buffers)[name] = original
        self._converted.clear()
        self.diffusion_model.train(self._was_training)
        if self._prepared:
            comfy.model_management.in_training = self._was_in_training
            self._prepared = False
        if self._streamed_source is not None:
            self._drop_resident_copy()

    def _take_resident_copy(self) -> None:
        """Train on ComfyUI's non-dynamic delegate of the streamed MODEL: its loader loads the file
        again as a regular model, which `load_models_gpu` then holds whole on the GPU."""
        source = self.patcher
        log.info("DynamicVRAM streams this MODEL (%.1f GiB): training loads a copy that stays on the GPU, so its "
                 "blocks compile", source.model_size() / 2**30)
        _unload(source.model)  # what sampling left of it on the GPU: the copy takes its place
        self.patcher = source.get_non_dynamic_delegate()
        # ComfyUI keeps the delegate's model on `source` for later calls; this backbone's clone
        # outlives the run, and would keep the copy's weights with it.
        source.non_dynamic_delegate_model = None
        self._streamed_source = source
        self._bind(self.patcher)

    def _drop_resident_copy(self) -> None:
        """Let the copy go (ComfyUI streams the MODEL again). Its weights are dropped where they lie,
        so that whatever still refers to its modules (the run's compiled code) holds no memory, and
        then ComfyUI's model management forgets it: unloading them would first move them to CPU memory."""
        copy = self.patcher
        copy.unpin_all_weights()
        copy.backup.clear()  # weights from before the graph's patches, for a copy that goes away
        for module in copy.model.modules():
            for store in (module._parameters, module._buffers):
                for key in store:
                    store[key] = None
        _unload(copy.model)
        self.patcher, self._streamed_source = self._streamed_source, None
        self._bind(self.patcher)
        comfy.model_management.soft_empty_cache()

    def _bind(self, patcher) -> None:
        """Train `patcher`'s model: the modules every other method reaches."""
        self.patcher = patcher
        self.diffusion_model = patcher.model.diffusion_model
        self._named = dict(self.diffusion_model.named_modules())
        self._was_training = self.diffusion_model.training

    # -- internals -------------------------------------------------------------
    def _set_for_the_run(self, module: nn.Module, name: str, value) -> None:
        """Set an attribute on a shared module's instance; `release` puts back what was there."""
        self._instance_attrs.append((module, name, module.__dict__.get(name, _UNSET)))
        setattr(module, name, value)

    def _recompute_weighted_ops(self) -> None:
        """Route every ComfyUI op that casts a weight through `CastLinearInBackward` or `RecomputeInBackward`."""
        for _, module in _weighted_ops(self.diffusion_model):
            current = module.forward
            # Quantized weights (fp8 "mixed" files) may quantize the input too: not affine.
            affine = isinstance(module, nn.Linear) and not hasattr(type(module.weight), "__tensor_unflatten__")
            if affine and not _forward_replaced(module) and hasattr(module, "forward_comfy_cast_weights"):
                # ComfyUI's own Linear, forward not replaced by anyone: cast the weight again in backward.
                self._set_for_the_run(module, "forward", functools.partial(_cast_linear_call, module, current))
            else:
                self._set_for_the_run(module, "forward", functools.partial(_recompute_call, current, affine))

    def _read_weights_in_place(self, device: torch.device, compute: torch.dtype) -> str | None:
        """Let every op read its weight where ComfyUI holds it, with no per-op cast code.

        ComfyUI's Linears get a training forward (`_linear_in_place`): fp8 e4m3 weights (the
        loader's fp8 dtype, or the scaled fp8 of "mixed" files) multiply in fp8 with their
        scale; weights in other dtypes are cast for the op. Other ops with a weight in another
        dtype (FLUX.2's norm scales: a few KB) get a compute-dtype copy. Returns why not,
        having changed nothing, where a weight is in a form this cannot read.
        """
        linears, others = [], []
        for name, module in _weighted_ops(self.diffusion_model):
            why = _cannot_read_in_place(module, device)
            if why:
                return (f"ComfyUI casts this MODEL's weights per op ({name}: {why}), which does not compile; "
                        "blocks compile where the weights are bf16, or fp8 e4m3 (the loader's fp8_e4m3fn or an "
                        "fp8 \"scaled\"/\"mixed\" file), all on the GPU")
            (linears if _is_linear(module) else others).append(module)
        fp8_matmul = has_fp8_matmul(device) and compute == torch.bfloat16
        for module in linears:
            data, scale = _stored_weight(module)
            # A file's layers kept in full precision multiply in the compute dtype, as ComfyUI does them.
            full_precision = (getattr(module, "_full_precision_mm", False)
                              or getattr(module, "comfy_force_cast_weights", False))
            fits = (fp8_matmul and scale is not None and data.is_contiguous() and not full_precision
                    and fp8_matmul_fits(module.in_features, module.out_features))
            if not fits and data.dtype == torch.float8_e4m3fn and not _is_quantized(module.weight):
                scale = None  # a plain fp8 weight's scale is 1: cast it, no scaling pass
            self._set_for_the_run(module, "_weight_in_place", (data, scale, fits))
            self._set_for_the_run(module, "forward", types.MethodType(_linear_in_place, module))
            self.fp8_layers += fits
        for module in others:
            for store in (module._parameters, module._buffers):
                for key, t in store.items():
                    if t is not None and t.is_floating_point() and t.dtype != compute:
                        # `_converted` already holds the original; `release` puts it back.
                        cast = t.detach().to(compute)
                        store[key] = nn.Parameter(cast, requires_grad=False) if isinstance(t, nn.Parameter) else cast
            self._set_for_the_run(module, "comfy_cast_weights", False)
        if self.fp8_layers:
            log.info("%d of %d Linear layers multiply ComfyUI's fp8 weights in fp8", self.fp8_layers, len(linears))
        return None

    def _copy_layer_norm_inputs(self) -> None:
        """Give each LayerNorm its own copy of an input that needs gradients.

        The blocks add residuals in place (`img += ...`) into the tensor a LayerNorm just
        read and kept for its backward pass, which autograd refuses (compiled code too).
        """
        # A hook (one function for all) rather than a wrapped forward: the compiler would
        # compile each block again for its own wrapper.
        for module in self.diffusion_model.modules():
            if isinstance(module, nn.LayerNorm):
                self._hooks.append(module.register_forward_pre_hook(_copy_input_needing_grad))

    def _make_weights_trainable(self) -> None:
        """Let autograd read weights that were created under inference mode, without copying them.

        ComfyUI runs nodes under `torch.inference_mode()`, so a model loaded there
        holds inference tensors, which autograd refuses to save for backward. A
        normal tensor viewing the same storage is the same weights at no memory
        cost; `release` puts the originals back.
        """
        for module in self.diffusion_model.modules():
            for store, is_param in ((module._parameters, True), (module._buffers, False)):
                for name, t in list(store.items()):
                    # All of them: a Parameter moved by `.data =` onto the GPU keeps its
                    # inference flag without `is_inference()` saying so.
                    if t is None:
                        continue
                    view = _storage_view(t)
                    view = nn.Parameter(view, requires_grad=False) if is_param else view
                    # ComfyUI's marks on the weight: DynamicVRAM casts it to its `_model_dtype`.
                    for key, value in t.__dict__.items():
                        view.__dict__.setdefault(key, value)
                    store[name] = view
                    self._converted.append((module, name, is_param, t))

    def _transformer_options(self) -> dict:
        options = dict(self.patcher.model_options.get("transformer_options", {}))
        # Attention patches made for sampling (SageAttention & co.) may have no backward pass.
        options["optimized_attention_override"] = _training_attention
        replace = {k: dict(v) for k, v in options.get("patches_replace", {}).items()}
        dit = replace.setdefault("dit", {})
        double = len(self.diffusion_model.double_blocks)
        for i, block in enumerate(self.blocks):
            if not (self.compiled or i < self._checkpointing or i in self._offloaded):
                continue  # ComfyUI runs it as it is
            key, run = (("double_block", i), self._runners[0]) if i < double else \
                (("single_block", i - double), self._runners[1])
            if i < self._checkpointing:
                patch = functools.partial(_checkpointed_block, run, block)
            elif i in self._offloaded:
                patch = functools.partial(_offloaded_block, self._activation_offload, i, run, block)
            else:
                patch = functools.partial(_plain_block, run, block)
            # A block that a custom node already replaces keeps its patch.
            dit.setdefault(key, patch)
        options["patches_replace"] = replace
        return options


_UNSET = object()


def _unload(model) -> None:
    """Unload each loaded ModelPatcher of `model` (a ComfyUI BaseModel) as ComfyUI's model management does."""
    loaded = comfy.model_management.current_loaded_models
    for i in reversed(range(len(loaded))):
        patcher = loaded[i].model
        if patcher is not None and patcher.model is model:
            loaded.pop(i).model_unload()


def _forget_streamed_casts(model: nn.Module) -> None:
    """Make DynamicVRAM cast each weight afresh. It keeps the tensor it cast a weight into for as long
    as the weight stays on the GPU; one cast while sampling (under inference mode) is an inference
    tensor, which autograd refuses. A fresh cast costs one copy of each weight, once."""
    for module in model.modules():
        if getattr(module, "_v_signature", None) is not None:
            module._v_signature = None


def _casts_weights(model: nn.Module) -> bool:
    """Whether any op of `model` goes through ComfyUI's per-op weight casts."""
    return any(getattr(m, "comfy_cast_weights", False) or _is_quantized(getattr(m, "weight", None))
               or (_is_linear(m) and not isinstance(m, nn.Linear)) for m in model.modules())


def _cast_per_op(model: nn.Module) -> bool:
    """Whether training casts `model`'s weights per op wherever they are held: some weight is in a form
    `_read_weights_in_place` does not read (for the memory estimate, before the model is loaded)."""
    return _casts_weights(model) and any(_cannot_read_in_place(m) for _, m in _weighted_ops(model))


def _weighted_ops(model: nn.Module):
    """(name, module) of ComfyUI's ops that hold a weight."""
    return ((name, m) for name, m in model.named_modules()
            if hasattr(m, "comfy_cast_weights") and isinstance(getattr(m, "weight", None), torch.Tensor))


def _forward_replaced(module: nn.Module) -> bool:
    """Someone else's forward on the instance (a bypass LoRA's); its own class's, bound, is none."""
    own = module.__dict__.get("forward")
    return own is not None and getattr(own, "__func__", None) is not type(module).forward


def _is_quantized(t) -> bool:
    """A ComfyUI QuantizedTensor (comfy_kitchen), whatever its layout."""
    return isinstance(t, torch.Tensor) and hasattr(t, "_layout_cls")


def _is_linear(module: nn.Module) -> bool:
    """ComfyUI's Linear ops: nn.Linear subclasses, and the mixed-precision ops' own Linear."""
    return hasattr(module, "forward_comfy_cast_weights") and hasattr(module, "in_features")


def _fp8_layout(weight: torch.Tensor) -> bool:
    """A QuantizedTensor in the fp8 e4m3 per-tensor layout of ComfyUI's "scaled"/"mixed" files, as stored."""
    params = weight._params
    return (weight._layout_cls.startswith("TensorCoreFP8") and weight._qdata.dtype == torch.float8_e4m3fn
            and not getattr(params, "transposed", False) and tuple(params.orig_shape) == tuple(weight._qdata.shape)
            and params.scale.numel() == 1)


def _cannot_read_in_place(module: nn.Module, device: torch.device | None = None) -> str | None:
    """Why `_read_weights_in_place` cannot take over this op's weight, or None (where the weights
    are on `device`; not checked for None)."""
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        return "patched on the fly"
    if _forward_replaced(module):
        return "its forward is replaced, e.g. by a bypass LoRA"
    # A file's static input scale is for inference: training quantizes each input row for itself.
    if getattr(module, "pre_quant_scale", None) is not None or getattr(module, "scale_weight", None) is not None:
        return "scaled input"
    tensors = [t for t in (*module._parameters.values(), *module._buffers.values()) if t is not None]
    if device is not None and any(t.device != device for t in tensors):
        return "not on the GPU"
    weight = module.weight
    if _is_quantized(weight):
        if not (_is_linear(module) and _fp8_layout(weight)):
            return f"stored as {weight._layout_cls}"
    elif _is_linear(module) and weight.ndim != 2:
        return "not a matrix"
    return None


def _stored_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ComfyUI Linear's weight as stored, and its fp8 row scales ((out, 1) float32) where it is e4m3."""
    weight = module.weight
    if _is_quantized(weight):
        data, scale = weight._qdata, weight._params.scale
    elif weight.dtype == torch.float8_e4m3fn:
        data, scale = weight, torch.ones((), device=weight.device)
    else:
        return weight, None
    return data, scale.detach().float().reshape(1, 1).expand(data.shape[0], 1).contiguous()


def _linear_in_place(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A ComfyUI Linear's forward while training where its weight is read in place (`_read_weights_in_place`)."""
    data, scale, fp8_matmul = self._weight_in_place
    dtype = compute_dtype_of(x)
    if data.dtype == dtype:
        return nn.functional.linear(x, data, self.bias)
    stacked = self.__dict__.get("_lora_in_matmul")  # the adapter, where `add_lora` routed it here
    return fp8_linear(x, data, scale, self.bias, dtype, fp8_matmul, None if stacked is None else (*stacked(x), 1.0))


def _storage_view(t: torch.Tensor) -> torch.Tensor:
    """A normal tensor on `t`'s memory; tensor subclasses (fp8 QuantizedTensor) rebuilt from views of their parts."""
    if hasattr(type(t), "__tensor_unflatten__"):
        names, context = t.__tensor_flatten__()
        parts = {n: _storage_view(getattr(t, n)) for n in names}
        return type(t).__tensor_unflatten__(parts, context, t.size(), t.stride())
    view = torch.empty(0, dtype=t.dtype, device=t.device)
    return view.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())


def _cast_linear_call(module, forward, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled():
        return forward(x, *args, **kwargs)
    return CastLinearInBackward.apply(x, module, forward)


def _recompute_call(forward, affine, x, *args, **kwargs):
    if args or kwargs or not torch.is_grad_enabled():
        return forward(x, *args, **kwargs)
    return RecomputeInBackward.apply(x, forward, affine)


def _copy_input_needing_grad(module: nn.Module, args: tuple):
    if args[0].requires_grad:
        return (args[0].clone(), *args[1:])
    return None


def _training_attention(func, q, k, v, heads, mask=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """ComfyUI's `optimized_attention_override` while training: SDPA on the kernels the run allows,
    in place of `func` (ComfyUI's attention, as in its `attention_pytorch`).

    In one fixed order (`pinned_attention`): ComfyUI's own attention sets its kernel priority
    per call, which is not applied the same way in the forward pass and in the checkpoint's
    recomputation (autograd's thread), and cuDNN and FlashAttention save different tensors,
    which the checkpoint rejects. Plain SDPA also compiles, where ComfyUI's CPU attention
    (which asks psutil for free memory) does not.
    """
    if not skip_reshape:  # (batch, tokens, heads * dim) -> (batch, heads, tokens, dim); FLUX.2 passes the latter
        dim = q.shape[-1] // heads
        q, k, v = (t.unflatten(-1, (-1, dim)).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.ndim == 2:  # as ComfyUI's attention_pytorch: add batch and head dimensions
        mask = mask.unsqueeze(0)
    if mask is not None and mask.ndim == 3:
        mask = mask.unsqueeze(1)
    sdpa = {key: kwargs[key] for key in ("scale", "enable_gqa") if key in kwargs}
    with pinned_attention():
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, **sdpa)
    if skip_output_reshape:
        return out
    b, _, tokens, dim = out.shape
    return out.transpose(1, 2).reshape(b, tokens, heads * dim)


def _run_double(block: nn.Module, img, txt, vec, pe, attn_mask, transformer_options) -> dict:
    # Copies, because the block adds into its inputs and the checkpoint recomputes from them.
    img, txt = block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=attn_mask,
                     transformer_options=transformer_options)
    return {"img": img, "txt": txt}


def _run_single(block: nn.Module, img, vec, pe, attn_mask, transformer_options) -> dict:
    return {"img": block(img.clone(), vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)}


def _runner_inputs(args: dict) -> dict:
    """A runner's keyword arguments from a block-replace patch's `args`."""
    inputs = {k: args[k] for k in ("img", "txt") if k in args}
    inputs.update({k: args.get(k) for k in ("vec", "pe", "attn_mask")})
    # A copy: ComfyUI updates block_index & co. in place while the forward pass moves on.
    inputs["transformer_options"] = dict(args.get("transformer_options") or {})
    return inputs


def _plain_block(run, block: nn.Module, args: dict, extra: dict) -> dict:
    """A ComfyUI block-replace patch that runs the block through `run` (its compiled runner)."""
    return run(block, **_runner_inputs(args))


def _offloaded_block(offload, index: int, run, block: nn.Module, args: dict, extra: dict) -> dict:
    """A ComfyUI block-replace patch whose block keeps its activations where `offload` puts them."""
    with offload.saving(index):
        return run(block, **_runner_inputs(args))


def _checkpointed_block(run, block: nn.Module, args: dict, extra: dict) -> dict:
    """A ComfyUI block-replace patch that recomputes the block in the backward pass.

    It calls the block module it was made for rather than `extra["original_block"]`:
    that closure reads ComfyUI's loop variable, which has moved on by the time the
    backward pass recomputes.
    """
    return torch.utils.checkpoint.checkpoint(run, block, **_runner_inputs(args), use_reentrant=False)
