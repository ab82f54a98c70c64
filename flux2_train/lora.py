"""LoRA adapters: which layers get one, injecting them with PEFT, and their state dict."""

from __future__ import annotations

import logging
import re
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from . import seeds
from .errors import ConfigError

if TYPE_CHECKING:
    from peft import LoraConfig

# PEFT is imported where it is used: importing it takes seconds (it imports transformers and
# bitsandbytes), which the command line's checks, its --help and the vRAM estimate do without.

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"

# Module-name suffixes per preset, in diffusers' FLUX.2 layout. Modulation,
# timestep embedding and norm layers are never in a preset: they steer every
# token at once, and ComfyUI cannot load their diffusers-named LoRA keys.
_DOUBLE_ATTENTION = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                     "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
_DOUBLE_MLP = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]
# Single blocks fuse attention and MLP into one input and one output projection.
_SINGLE = ["attn.to_qkv_mlp_proj", "attn.to_out"]
_EDGES = ["x_embedder", "context_embedder", "proj_out"]

_NOT_FOR_LORA = re.compile(r"(modulation|time_guidance_embed|norm_out|norm)")


def preset_patterns(preset: str) -> list[str]:
    double = _DOUBLE_ATTENTION + (_DOUBLE_MLP if preset in ("attention_mlp", "all_linear") else [])
    patterns = [rf"transformer_blocks\.\d+\.{re.escape(s)}" for s in double]
    patterns += [rf"single_transformer_blocks\.\d+\.{re.escape(s)}" for s in _SINGLE]
    if preset == "all_linear":
        patterns += [re.escape(s) for s in _EDGES]
    return patterns


LayerShapes = Mapping[str, tuple[int, int]]  # diffusers-layout Linear name -> (in_features, out_features)


def linear_shapes(module: nn.Module) -> dict[str, tuple[int, int]]:
    return {name: (m.in_features, m.out_features) for name, m in module.named_modules() if isinstance(m, nn.Linear)}


def resolve_targets(layers: nn.Module | LayerShapes, preset: str, explicit: list[str] | None = None) -> list[str]:
    """Full names of the Linear modules that get adapters (diffusers' layout)."""
    linears = linear_shapes(layers) if isinstance(layers, nn.Module) else dict(layers)
    if explicit:
        chosen: list[str] = []
        for pattern in explicit:
            # As in PEFT: a full name, a name suffix ("attn.to_q"), or a regular expression.
            hits = [n for n in linears if n == pattern or n.endswith("." + pattern) or _fullmatch(pattern, n)]
            if not hits:
                close = [n for n in linears if pattern.split(".")[-1] in n][:3]
                raise ConfigError(
                    f"--target-modules entry {pattern!r} matches no Linear layer of this model"
                    + (f"; similar names: {', '.join(close)}" if close else "")
                )
            chosen += [h for h in hits if h not in chosen]
        odd = [n for n in chosen if _NOT_FOR_LORA.search(n)]
        if odd:
            log.warning("adapters on modulation/norm layers (%s) load in ComfyUI only from the 'comfyui' or "
                        "'kohya' LoRA formats", ", ".join(odd[:3]))
        return sorted(chosen, key=list(linears).index)
    if preset not in ("attention", "attention_mlp", "all_linear"):
        raise ConfigError(f"unknown --targets {preset!r}; choose attention, attention_mlp or all_linear")
    patterns = [re.compile(p) for p in preset_patterns(preset)]
    chosen = [n for n in linears if any(p.fullmatch(n) for p in patterns)]
    if not chosen:
        raise ConfigError(f"--targets {preset} matches no layer of this model; is it a FLUX.2 transformer?")
    return chosen


def _fullmatch(pattern: str, name: str) -> bool:
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def check_rank(layers: nn.Module | LayerShapes, targets: list[str], rank: int) -> None:
    """A LoRA rank above a layer's smallest side adds parameters without adding capacity."""
    shapes = linear_shapes(layers) if isinstance(layers, nn.Module) else layers
    too_small = [(n, min(shapes[n])) for n in targets if rank > min(shapes[n])]
    if too_small:
        name, dim = min(too_small, key=lambda t: t[1])
        raise ConfigError(
            f"--rank {rank} is larger than layer {name} ({dim} features on its smaller side); "
            f"use --rank {dim} or less, or leave that layer out with --target-modules"
        )


def add_lora(module: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0,
             seed: int = 0) -> LoraConfig:
    """Inject PEFT LoRA layers into `module` in place; the base weights stay frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    check_rank(module, targets, rank)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        init_lora_weights=False,
    )
    module.requires_grad_(False)
    # PEFT's random init of lora_A draws from the global RNG: keep the caller's state.
    with torch.random.fork_rng(devices=[]):
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
    modules = dict(module.named_modules())
    with torch.no_grad():
        for name in targets:
            layer = modules[name]
            # PEFT gives adapters the base weight's dtype (bf16, even fp8); they train in float32.
            layer.lora_A[ADAPTER_NAME].float()
            layer.lora_B[ADAPTER_NAME].float()
            a, b = initial_lora_weights(name, layer.in_features, layer.out_features, rank, seed)
            layer.lora_A[ADAPTER_NAME].weight.copy_(a)
            layer.lora_B[ADAPTER_NAME].weight.copy_(b)
    return config


def initial_lora_weights(name: str, in_features: int, out_features: int, rank: int,
                         seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's "gaussian" init (A normal with standard deviation 1/rank, B = 0), drawn per layer
    from (seed, layer name).

    Per-layer draws make the start point independent of the order in which layers
    are visited, so the diffusers model and ComfyUI's model (which fuses some
    layers) start from the same adapter for the same seed.
    """
    g = seeds.generator(seed * 1_000_003 + zlib.crc32(name.encode()))
    a = torch.randn(rank, in_features, generator=g) / rank
    return a, torch.zeros(out_features, rank)


class LoraPair(nn.Module):
    """One adapter outside the layer it adapts: `B(A(dropout(x))) * alpha / rank`, as PEFT's LoRA layer adds."""

    def __init__(self, name: str, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device="meta")
        self.lora_B = nn.Linear(rank, out_features, bias=False, device="meta")
        a, b = initial_lora_weights(name, in_features, out_features, rank, seed)
        self.lora_A.weight = nn.Parameter(a)
        self.lora_B.weight = nn.Parameter(b)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_B(self.down(x)) * self.scaling

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """The rank-wide down-projection of the dropped-out input."""
        x = x.to(self.lora_A.weight.dtype)  # as PEFT does; autocast then picks the matmul dtype
        return self.lora_A(self.dropout(x))


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if "lora_" in n and p.requires_grad]


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT-format adapter weights: `<module>.lora_A.weight` / `<module>.lora_B.weight`, unscaled."""
    from peft import get_peft_model_state_dict

    sd = get_peft_model_state_dict(module, adapter_name=ADAPTER_NAME)
    return {k: full_tensor(v).detach().float().cpu().clone() for k, v in sd.items()}


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor sharded over processes (FSDP; a collective: every process calls it), else `t`."""
    if not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def local_part(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor sharded over processes (FSDP), else `t`."""
    if not torch.distributed.is_available():
        return t
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def reshard(module: nn.Module) -> None:
    """Drop what FSDP gathered of `module`'s weights, so its next forward pass gathers the shards as
    they are now. FSDP keeps the root's gathered weights after a forward pass without gradients
    (validation, previews): weights written into the shards meanwhile would go unseen."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def whole_of_part(part: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor of which `part` is this process's part, cut as `like` is (FSDP; a collective), else `part`."""
    if not torch.distributed.is_available():
        return part
    from torch.distributed.tensor import DTensor

    if not isinstance(like, DTensor):
        return part
    return DTensor.from_local(part, like.device_mesh, like.placements, shape=like.shape,
                              stride=like.stride()).full_tensor()


def sharded_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` on `like`'s device, sharded as `like` is (FSDP; a collective), else as it is."""
    whole = whole.to(like.device)
    if not torch.distributed.is_available():
        return whole
    from torch.distributed.tensor import DTensor, distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements) if isinstance(like, DTensor) else whole


def part_of_whole(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This process's part of `whole`, cut as `like` is sharded (FSDP; a collective), in `like`'s dtype."""
    return local_part(sharded_like(whole.to(like.dtype), like))


def load_lora_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(module, state, adapter_name=ADAPTER_NAME)
    unexpected = getattr(result, "unexpected_keys", []) or []
    if unexpected:
        raise ConfigError(f"adapter weights do not fit this model ({len(unexpected)} unknown keys, e.g. {unexpected[0]})")


def module_deltas(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """Weight update per adapted module: (alpha / rank) * B @ A."""
    scale = alpha / rank
    out = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            b = state[f"{name}.lora_B.weight"]
            out[name] = scale * (b.float() @ a.float())
    return out
