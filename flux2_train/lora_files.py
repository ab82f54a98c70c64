"""LoRA files: key formats, header metadata, atomic save.

Every format here loads with no key left over in both ComfyUI
(`LoraLoaderModelOnly`) and diffusers (`load_lora_weights`) for the preset
targets (attention and MLP projections, embedders, output projection):

- `diffusers` (default): `transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`.
- `comfyui`: `diffusion_model.<BFL module>.lora_A.weight` / `.lora_B.weight`, q/k/v fused.
- `kohya`: `lora_unet_<BFL module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`.

No file carries a LoRA scale the loaders would read differently: diffusers
refuses `.alpha` keys next to `lora_A`/`lora_B`, and ComfyUI ignores the header,
so `alpha / rank` is folded into the up (B) matrices and both loaders apply 1.0.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

import torch

from .fsutil import save_safetensors_atomic
from .keys import bfl_target

FORMATS = ("diffusers", "comfyui", "kohya")


def _split(state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for key, a in state.items():
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            pairs[name] = (a.float(), state[f"{name}.lora_B.weight"].float())
    return pairs


def to_format(state: dict[str, torch.Tensor], rank: int, alpha: float, fmt: str,
              dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Convert PEFT adapter weights (unscaled) into the tensors of a LoRA file of format `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)}")
    scale = alpha / rank
    pairs = {name: (a, b * scale) for name, (a, b) in _split(state).items()}
    if fmt == "diffusers":
        out = {}
        for name, (a, b) in pairs.items():
            out[f"transformer.{name}.lora_A.weight"] = a
            out[f"transformer.{name}.lora_B.weight"] = b
        return {k: v.to(dtype) for k, v in out.items()}

    fused = _fuse_to_bfl(pairs)
    out = {}
    for bfl, (a, b) in fused.items():
        if fmt == "comfyui":
            out[f"diffusion_model.{bfl}.lora_A.weight"] = a
            out[f"diffusion_model.{bfl}.lora_B.weight"] = b
        else:
            base = "lora_unet_" + bfl.replace(".", "_")
            out[f"{base}.lora_down.weight"] = a
            out[f"{base}.lora_up.weight"] = b
            out[f"{base}.alpha"] = torch.tensor(float(a.shape[0]))  # alpha == rank: scale 1
    return {k: v.to(dtype) if v.ndim else v for k, v in out.items()}


def _fuse_to_bfl(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Map diffusers modules onto BFL modules; split q/k/v adapters become one block-diagonal adapter.

    For fused qkv: A = [A_q; A_k; A_v] (3r x in) and B = diag(B_q, B_k, B_v) (3*out x 3r),
    so B @ A stacks B_q A_q, B_k A_k, B_v A_v exactly as the fused weight stacks q, k, v.
    """
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    meta: dict[str, int] = {}
    out = {}
    for name, (a, b) in pairs.items():
        t = bfl_target(name)
        if t.swap_halves:  # final adaLN: (scale, shift) in diffusers, (shift, scale) in BFL
            b = torch.cat(b.chunk(2, dim=0)[::-1], dim=0)
        if t.parts == 1:
            out[t.name] = (a, b)
        else:
            groups.setdefault(t.name, {})[t.part] = (a, b)
            meta[t.name] = t.parts
    for bfl, parts in groups.items():
        n = meta[bfl]
        a0, b0 = next(iter(parts.values()))
        r, fan_in, fan_out = a0.shape[0], a0.shape[1], b0.shape[0]
        a_cat = torch.zeros(n * r, fan_in)
        b_diag = torch.zeros(n * fan_out, n * r)
        for i in range(n):
            if i in parts:  # a part without an adapter keeps zeros: no change to that slice
                a_i, b_i = parts[i]
                a_cat[i * r:(i + 1) * r] = a_i
                b_diag[i * fan_out:(i + 1) * fan_out, i * r:(i + 1) * r] = b_i
        out[bfl] = (a_cat, b_diag)
    return out


def lora_metadata(*, cfg, spec, steps: int, image_count: int, fmt: str, targets: list[str]) -> dict[str, str]:
    """Header metadata: kohya `ss_*` and `modelspec.*` keys where they fit, plus the whole config."""
    arch = {"dev": "flux-2-dev", "klein-4b": "flux-2-klein-4b", "klein-9b": "flux-2-klein-9b"}.get(spec.family, "flux-2")
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": "https://github.com/black-forest-labs/flux2",
        "modelspec.title": cfg.name or "FLUX.2 LoRA",
        "modelspec.date": now,
        "modelspec.resolution": f"{cfg.resolution}x{cfg.resolution}",
        "modelspec.trigger_phrase": cfg.trigger_word,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(cfg.rank),
        # The file's scale: alpha / rank is folded into the up weights, so its alpha is the rank
        # (the kohya `.alpha` keys say the same). The trained alpha is `flux2_train.alpha`.
        "ss_network_alpha": str(cfg.rank),
        "ss_base_model_version": arch,
        "ss_steps": str(steps),
        "ss_max_train_steps": str(cfg.steps),
        "ss_learning_rate": str(cfg.learning_rate),
        "ss_num_train_images": str(image_count),
        "ss_resolution": f"({cfg.resolution}, {cfg.resolution})",
        "ss_seed": str(cfg.seed),
        "flux2_train.family": spec.family,
        "flux2_train.model_title": spec.title,
        "flux2_train.format": fmt,
        "flux2_train.rank": str(cfg.rank),
        "flux2_train.alpha": str(cfg.alpha),
        "flux2_train.scale_folded_into_up": "true",
        "flux2_train.targets": json.dumps(targets),
        "flux2_train.steps": str(steps),
        "flux2_train.resolution": str(cfg.resolution),
        "flux2_train.image_count": str(image_count),
        "flux2_train.trigger_word": cfg.trigger_word,
        "flux2_train.config": json.dumps(_shareable(cfg.to_dict()), sort_keys=True),
    }


_LOCAL_PATHS = ("dataset", "model", "encoders", "output_dir", "cache_dir", "resume", "config")


def _shareable(config: dict) -> dict:
    """The config without the trainer machine's folders (a LoRA file travels): only their last names."""
    return {k: (Path(v).name if k in _LOCAL_PATHS and isinstance(v, str) and v else v) for k, v in config.items()}


def save_lora(path: str | Path, state: dict[str, torch.Tensor], *, rank: int, alpha: float, fmt: str,
              metadata: dict[str, str], dtype: torch.dtype = torch.bfloat16, overwrite: bool = True) -> Path:
    return save_safetensors_atomic(to_format(state, rank, alpha, fmt, dtype), path, metadata=metadata,
                                   overwrite=overwrite)


def read_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})
