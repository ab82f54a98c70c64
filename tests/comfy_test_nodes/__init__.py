"""Test-only ComfyUI nodes: a tiny FLUX.2 text encoder and VAE with random weights.

ComfyUI's stock CLIPLoader and VAELoader infer sizes from fixed tables, so they
cannot load tiny files. These loaders build the same ComfyUI classes the stock
ones would (`comfy.sd.CLIP` around ComfyUI's FLUX.2 text encoders, `comfy.sd.VAE`
around its FLUX.2 autoencoder) at tiny sizes, with fixed seeds.

The text encoders keep ComfyUI's tokenizers and the hidden layers it stacks
(klein: Qwen3 layers 9, 18, 27; dev: Mistral layers 10, 20, 30), with hidden size
32: conditioning is 3 x 32 = 96 wide, the tiny DiT's context_in_dim.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import os

import torch

TEXT_HIDDEN = 32
# Enough layers for the deepest stacked index; ComfyUI stacks three hidden states.
TEXT_LAYERS = {"klein": 28, "dev": 31}
# Mistral's tokenizer is not in the ComfyUI tree (real files carry it): a byte-level
# stand-in with Mistral's special-token ids, 1000 reserved ids, then the 256 bytes.
_MISTRAL_SPECIALS = [
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
    "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
]
_MISTRAL_VOCAB = 1000 + 256

# The FLUX.2 VAE layout at 32 channels (ComfyUI's GroupNorm needs multiples of 32):
# 8x downsampling to 32 latent channels, then a 2x2 patchify to 128 (bn = latent statistics).
VAE_PARAMS = {
    "ddconfig": {
        "double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3,
        "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1, "attn_resolutions": [],
        "dropout": 0.0, "batch_norm_latent": True,
    },
    "embed_dim": 32,
}


def random_state_dict(shapes: dict, seed: int) -> dict:
    """Seeded random weights shaped like `shapes`: unit norms, fan-in scaled matrices."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        ref = shapes[key]
        if not ref.is_floating_point():
            out[key] = torch.zeros_like(ref)
        elif key.endswith("running_var"):
            out[key] = torch.rand(ref.shape, generator=g) + 0.5
        elif key.endswith("running_mean"):
            out[key] = torch.randn(ref.shape, generator=g) * 0.1
        elif "norm" in key and key.endswith("weight"):
            out[key] = 1 + 0.02 * torch.randn(ref.shape, generator=g)
        elif ref.ndim < 2:
            out[key] = 0.02 * torch.randn(ref.shape, generator=g)
        else:
            fan_in = 1 if "embed" in key else math.prod(ref.shape[1:])
            out[key] = torch.randn(ref.shape, generator=g) / math.sqrt(fan_in)
    return out


def mistral_tekken_json() -> bytes:
    vocab = [{"rank": i, "token_bytes": base64.b64encode(bytes([i])).decode()} for i in range(256)]
    specials = [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(_MISTRAL_SPECIALS)]
    config = {"default_num_special_tokens": 1000, "default_vocab_size": _MISTRAL_VOCAB}
    return json.dumps({"config": config, "vocab": vocab, "special_tokens": specials}).encode()


def tiny_clip(kind: str = "klein", seed: int = 0):
    """A comfy.sd.CLIP with ComfyUI's FLUX.2 [klein] (Qwen3) or [dev] (Mistral) encoder, tiny."""
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux

    if kind not in TEXT_LAYERS:
        raise ValueError(f"kind must be 'klein' or 'dev', not {kind!r}")
    size = {"hidden_size": TEXT_HIDDEN, "intermediate_size": 64, "num_attention_heads": 1,
            "num_key_value_heads": 1, "num_hidden_layers": TEXT_LAYERS[kind]}
    if kind == "klein":
        target = comfy.supported_models_base.ClipTarget(flux.KleinTokenizer, flux.klein_te(model_type="qwen3_4b"))
        options, tokenizer_data = {"qwen3_4b_model_config": size}, {}
    else:
        target = comfy.supported_models_base.ClipTarget(flux.Flux2Tokenizer, flux.flux2_te())
        options = {"mistral3_24b_model_config": {**size, "vocab_size": _MISTRAL_VOCAB}}
        tokenizer_data = {"tekken_model": mistral_tekken_json()}
    # SDClipModel reads "<name>_model_config" from the model options to override the config.
    clip = comfy.sd.CLIP(target, model_options={**options, "dtype": torch.float32}, tokenizer_data=tokenizer_data)
    missing, unexpected = clip.load_sd(random_state_dict(clip.cond_stage_model.state_dict(), seed), full_model=True)
    assert not missing and not unexpected, (missing, unexpected)
    return clip


def tiny_vae(seed: int = 0):
    """A comfy.sd.VAE with ComfyUI's FLUX.2 autoencoder: 128-channel latents at 1/16 size."""
    import comfy.sd
    from comfy.ldm.models.autoencoder import AutoencoderKL

    weights = random_state_dict(AutoencoderKL(**VAE_PARAMS).state_dict(), seed)
    vae = comfy.sd.VAE(sd=weights, config={"params": VAE_PARAMS})
    # A config skips detection, which for the FLUX.2 VAE (found by its `bn` statistics)
    # doubles the 8x ratio for the patchify and multiplies the 32 channels by 4.
    vae.latent_channels = 4 * VAE_PARAMS["ddconfig"]["z_channels"]
    vae.downscale_ratio = vae.upscale_ratio = 16
    return vae


class Flux2TestTinyCLIP:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"type": (["klein", "dev"],)}}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, type):
        return (tiny_clip(type),)


class Flux2TestTinyVAE:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self):
        return (tiny_vae(),)


# The test server compiles as the in-process CPU tests do (tests/conftest.py): without Inductor's
# C++ code generation, slow on a small CPU (README, Tests).
if _backend := os.environ.get("FLUX2_TEST_COMPILE_BACKEND"):
    torch.compile = functools.partial(torch.compile, backend=_backend)

NODE_CLASS_MAPPINGS = {"Flux2TestTinyCLIP": Flux2TestTinyCLIP, "Flux2TestTinyVAE": Flux2TestTinyVAE}
NODE_DISPLAY_NAME_MAPPINGS = {"Flux2TestTinyCLIP": "Tiny FLUX.2 CLIP (test)", "Flux2TestTinyVAE": "Tiny FLUX.2 VAE (test)"}
