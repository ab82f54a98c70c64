"""The graph's CLIP and VAE as the engine's `FeatureEncoder`: cache inputs exactly as sampling sees them."""

from __future__ import annotations

import hashlib

import torch

from flux2_train.encoders import module_fingerprint

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

    def caption_tokens(self, caption: str) -> int:
        """Tokens the text encoder reads for `caption` (prompt template and padding included). The cache
        warns, naming the images, about captions over `max_sequence_length`; encode_text keeps their first tokens."""
        return max(sum(len(batch) for batch in batches) for batches in self.clip.tokenize(caption).values())

    @torch.no_grad()
    def encode_text(self, captions: list[str], max_sequence_length: int) -> torch.Tensor:
        """CLIPTextEncode's conditioning, padded as ComfyUI's FLUX.2 model pads it (`max_sequence_length` is ComfyUI's).
        A longer caption keeps its first tokens, as the diffusers pipeline's truncation does."""
        out = []
        for caption in captions:
            tokens = _first_tokens(self.clip.tokenize(caption), COMFY_TEXT_TOKENS)
            cond = self.clip.encode_from_tokens(tokens).float().cpu()  # (1, L, D)
            pad = COMFY_TEXT_TOKENS - cond.shape[1]
            out.append(torch.nn.functional.pad(cond, (0, 0, pad, 0))[0])
        return torch.stack(out)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)  # (B, H, W, C) in [0, 1]
        return self.process_latent_in(self.vae.encode(images).float().cpu())

    def decoder(self) -> "ComfyCpuDecoder":
        return ComfyCpuDecoder(self.vae, self.process_latent_out)


def _first_tokens(tokens: dict, limit: int) -> dict:
    """ComfyUI's tokenizer output ({encoder: [batch of tokens, ...]}) cut to its first `limit` tokens."""
    cut = {}
    for name, batches in tokens.items():
        kept, room = [], limit
        for batch in batches:
            if room <= 0:
                break
            kept.append(batch[:room])
            room -= len(kept[-1])
        cut[name] = kept
    return cut


class ComfyCpuDecoder:
    """The graph's VAE, copied to the CPU for preview images. Decoding on the GPU would make ComfyUI
    free memory for the VAE, which can unload part of the MODEL being trained mid-run; on the CPU
    ComfyUI frees nothing (a float32 copy of the FLUX.2 VAE, 84M parameters, takes about 320 MiB)."""

    def __init__(self, vae, process_latent_out):
        import copy

        import comfy.model_patcher
        import comfy.sd

        cpu = torch.device("cpu")
        if vae.patcher.is_dynamic():
            # Built from its weights as its loader built it: a copy of a VAE that DynamicVRAM streams would
            # carry the native buffers DynamicVRAM hangs on its modules, and free them when it goes.
            self.vae = comfy.sd.VAE(sd=vae.get_sd(), device=cpu, dtype=torch.float32)
        else:  # any VAE, a test's tiny one included: its modules copied
            model = copy.deepcopy(vae.first_stage_model).to(cpu, torch.float32).eval()
            self.vae = copy.copy(vae)  # ComfyUI's decode logic (tiling, output layout) on the copy
            self.vae.first_stage_model = model
            self.vae.patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
            self.vae.device = cpu
            self.vae.vae_dtype = torch.float32
        self.vae.output_device = cpu
        self.process_latent_out = process_latent_out

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """VAEDecode's images, as (B, 3, H, W) in [0, 1]."""
        images = self.vae.decode(self.process_latent_out(latents.float().cpu()))
        return images.float().movedim(-1, 1).clamp(0, 1).cpu()
