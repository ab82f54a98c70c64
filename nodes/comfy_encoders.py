"""The graph's CLIP and VAE as the engine's `FeatureEncoder`: cache inputs exactly as sampling sees them."""

from __future__ import annotations

import hashlib
import logging

import torch

from flux2_train.encoders import module_fingerprint

log = logging.getLogger(__name__)


class ComfyEncoders:
    """Text embeddings from CLIPTextEncode's path, latents from VAEEncode's, as a FLUX.2 MODEL consumes them."""

    def __init__(self, clip, vae, model_patcher):
        self.clip = clip
        self.vae = vae
        self.process_latent_in = model_patcher.model.process_latent_in
        self.text_identity = "comfy-clip|" + module_fingerprint(clip.cond_stage_model)
        self.vae_identity = "comfy-vae|" + module_fingerprint(vae.first_stage_model)
        self.identity = hashlib.sha256(f"{self.text_identity}|{self.vae_identity}".encode()).hexdigest()[:32]

    @torch.no_grad()
    def encode_text(self, captions: list[str], max_sequence_length: int) -> torch.Tensor:
        out = []
        for caption in captions:
            cond = self.clip.encode_from_tokens(self.clip.tokenize(caption)).float().cpu()  # (1, L, D)
            if cond.shape[1] > max_sequence_length:
                log.warning("caption %r is %d tokens; kept the last %d", caption[:40], cond.shape[1],
                            max_sequence_length)
                cond = cond[:, -max_sequence_length:]
            # Left-padded with zeros to a fixed length, as ComfyUI's FLUX.2 model pads at sampling.
            pad = max_sequence_length - cond.shape[1]
            out.append(torch.nn.functional.pad(cond, (0, 0, pad, 0))[0])
        return torch.stack(out)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images = ((pixels.float() + 1) / 2).clamp(0, 1).movedim(1, -1)  # (B, H, W, C) in [0, 1]
        return self.process_latent_in(self.vae.encode(images).float().cpu())

    def free(self) -> None:
        """Nothing to drop: the graph owns its CLIP and VAE; ComfyUI unloads them when the MODEL needs room."""
