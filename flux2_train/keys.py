"""Module names of FLUX.2 in diffusers' layout and in BFL's (= ComfyUI's) layout.

diffusers splits the attention projections of the double blocks (`attn.to_q`,
`attn.to_k`, `attn.to_v`); BFL fuses them into one `img_attn.qkv`. The table
below names, for every diffusers Linear, the BFL Linear it lives in and, for
split projections, which third of the fused output it is. LoRA export and the
BFL single-file writer both read it, so there is one place to get it right.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BflTarget:
    name: str  # BFL module path, e.g. "double_blocks.0.img_attn.qkv"
    part: int = 0  # which slice of a fused output this diffusers module is
    parts: int = 1  # how many slices the fused output has
    swap_halves: bool = False  # final adaLN: diffusers stores (scale, shift), BFL (shift, scale)


_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0, 3),
    "attn.to_k": ("img_attn.qkv", 1, 3),
    "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3),
    "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
    "attn.to_out.0": ("img_attn.proj", 0, 1),
    "attn.to_add_out": ("txt_attn.proj", 0, 1),
    "ff.linear_in": ("img_mlp.0", 0, 1),
    "ff.linear_out": ("img_mlp.2", 0, 1),
    "ff_context.linear_in": ("txt_mlp.0", 0, 1),
    "ff_context.linear_out": ("txt_mlp.2", 0, 1),
}
_SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
}
_DOUBLE_NORMS = {
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}

_BLOCK = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def bfl_target(diffusers_module: str) -> BflTarget:
    """BFL module for a diffusers Linear module name (without any 'transformer.' prefix)."""
    if diffusers_module in _TOP:
        return BflTarget(_TOP[diffusers_module])
    if diffusers_module == "norm_out.linear":
        return BflTarget("final_layer.adaLN_modulation.1", swap_halves=True)
    m = _BLOCK.match(diffusers_module)
    if m:
        kind, idx, rest = m.groups()
        if kind == "transformer_blocks" and rest in _DOUBLE:
            name, part, parts = _DOUBLE[rest]
            return BflTarget(f"double_blocks.{idx}.{name}", part, parts)
        if kind == "single_transformer_blocks" and rest in _SINGLE:
            return BflTarget(f"single_blocks.{idx}.{_SINGLE[rest]}")
    raise KeyError(f"no BFL name known for the diffusers module {diffusers_module!r}")


def diffusers_to_bfl_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full transformer weights from diffusers' layout to BFL's (fusing q/k/v).

    The inverse of diffusers' `convert_flux2_transformer_checkpoint_to_diffusers`;
    used to write single-file checkpoints as BFL and ComfyUI ship them.
    """
    fused: dict[str, list] = {}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        module, param = key.rsplit(".", 1)
        m = _BLOCK.match(module)
        norms = None
        if m:
            kind, idx, rest = m.groups()
            norms = _DOUBLE_NORMS if kind == "transformer_blocks" else _SINGLE_NORMS
            if rest in norms:
                prefix = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
                out[f"{prefix}.{idx}.{norms[rest]}.scale"] = value
                continue
        target = bfl_target(module)
        if target.swap_halves:
            value = torch.cat(value.chunk(2, dim=0)[::-1], dim=0)
        if target.parts > 1:
            fused.setdefault(f"{target.name}.{param}", [None] * target.parts)[target.part] = value
        else:
            out[f"{target.name}.{param}"] = value
    for key, pieces in fused.items():
        out[key] = torch.cat(pieces, dim=0)
    return out


def diffusers_linear_names(num_double: int, num_single: int, guidance_embeds: bool) -> list[str]:
    """The names of every Linear module of a diffusers FLUX.2 transformer of this size."""
    names = ["time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2"]
    if guidance_embeds:
        names += ["time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2"]
    names += ["double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
              "single_stream_modulation.linear", "x_embedder", "context_embedder"]
    names += [f"transformer_blocks.{i}.{rest}" for i in range(num_double) for rest in _DOUBLE]
    names += [f"single_transformer_blocks.{i}.{rest}" for i in range(num_single) for rest in _SINGLE]
    return names + ["norm_out.linear", "proj_out"]
