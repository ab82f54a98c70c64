"""The graph's CLIP and VAE as the engine's `FeatureEncoder`: cache inputs exactly as sampling sees them."""

from __future__ import annotations

import hashlib

import torch

from flux2_train.encoders import module_fingerprint
from flux2_train.errors import DatasetError

# ComfyUI's FLUX.2 model left-pads text conditioning with zeros to this many tokens at sampling.
COMFY_TEXT_TOKENS = 512


class ComfyEncoders:
    """Text embeddings from CLIPTextEncode's path, latents from VAEEncode's, as a FLUX.2 MODEL consumes them."""

    def __init__(self, clip, vae, model_patcher):
        self.clip = clip
        self.vae = vae
        self.process_latent_in = model_patcher.model.process_latent_in
        self.process_latent_out = model_patcher.model.process_latent_out
        # The CLIP's own weights, and what changes its output: LoRA patches (by their id), the layer
        # it stops at, tokenizer options.
        self.text_identity = "|".join([
            "comfy-clip", module_fingerprint(clip.cond_stage_model), str(clip.patcher.patches_uuid),
            str(getattr(clip, "layer_idx", None)), repr(sorted(getattr(clip, "tokenizer_options", {}).items()))])
        self.vae_identity = "comfy-vae|" + module_fingerprint(vae.first_stage_model)
        self.identity = hashlib.sha256(f"{self.text_identity}|{self.vae_identity}".encode()).hexdigest()[:32]

    @torch.no_grad()
    def encode_text(self, captions: list[str], max_sequence_length: int) -> torch.Tensor:
        """CLIPTextEncode's conditioning, padded as ComfyUI's FLUX.2 model pads it (`max_sequence_length` is ComfyUI's)."""
        out = []
        for caption in captions:
            cond = self.clip.encode_from_tokens(self.clip.tokenize(caption)).float().cpu()  # (1, L, D)
            if cond.shape[1] > COMFY_TEXT_TOKENS:
                raise DatasetError(f"the caption {caption[:60]!r} is {cond.shape[1]} tokens long; training batches "
                                   f"hold at most {COMFY_TEXT_TOKENS}: shorten it")
            pad = COMFY_TEXT_TOKENS - cond.shape[1]
            out.append(torch.nn.functional.pad(cond, (0, 0, pad, 0))[0])
        return torch.stack(out)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)  # (B, H, W, C) in [0, 1]
        return self.process_latent_in(self.vae.encode(images).float().cpu())

    def decoder(self) -> "ComfyCpuDecoder":
        return ComfyCpuDecoder(self.vae, self.process_latent_out)


class ComfyCpuDecoder:
    """The graph's VAE, copied to the CPU for preview images. Decoding on the GPU would make ComfyUI
    free memory for the VAE, which can unload part of the MODEL being trained mid-run; on the CPU
    ComfyUI frees nothing (a float32 copy of the FLUX.2 VAE, 84M parameters, takes about 320 MiB)."""

    def __init__(self, vae, process_latent_out):
        import copy

        import comfy.model_patcher

        cpu = torch.device("cpu")
        model = copy.deepcopy(vae.first_stage_model).to(cpu, torch.float32).eval()
        self.vae = copy.copy(vae)  # ComfyUI's decode logic (tiling, output layout) on the copy
        self.vae.first_stage_model = model
        self.vae.patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        self.vae.device = self.vae.output_device = cpu
        self.vae.vae_dtype = torch.float32
        self.process_latent_out = process_latent_out

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAEDecode's images, as (B, 3, H, W) in [0, 1]."""
        images = self.vae.decode(self.process_latent_out(latents.float().cpu()))
        return images.float().movedim(-1, 1).clamp(0, 1).cpu()
