"""Run by tests/test_gpu.py in a process of its own, as ComfyUI starts on NVIDIA (DynamicVRAM, comfy-aimdo):
ComfyUI's FLUX.2 VAE at its real size with random weights decodes, the training node's CPU preview decoder
is built from it and dropped, and the VAE decodes again. Prints one JSON line."""

import gc
import importlib
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from comfy_train_speed import import_comfy, import_pack  # noqa: E402


def main(comfyui: str) -> None:
    import_comfy(Path(comfyui))
    import comfy.sd
    from diffusers import AutoencoderKLFlux2

    import_pack()
    encoders = importlib.import_module("flux2_lora_pack.nodes.comfy_encoders")
    with torch.device("meta"):
        shapes = AutoencoderKLFlux2().state_dict()
    g = torch.Generator().manual_seed(0)
    weights = {k: torch.rand(v.shape, generator=g) + 0.5 if "running_var" in k
               else torch.randn(v.shape, generator=g) * 0.02 for k, v in shapes.items()}
    vae = comfy.sd.VAE(sd=weights)
    latents = torch.randn(1, vae.latent_channels, 16, 16, generator=g)
    before = vae.decode(latents).float().cpu()
    decoder = encoders.ComfyCpuDecoder(vae, lambda x: x)
    previews = decoder.decode_latents(latents)
    del decoder
    gc.collect()
    after = vae.decode(latents).float().cpu()
    print(json.dumps(dict(streamed=vae.patcher.is_dynamic(),
                          preview_difference=(previews - before.movedim(-1, 1).clamp(0, 1)).abs().max().item(),
                          vae_difference=(after - before).abs().max().item())))


if __name__ == "__main__":
    main(sys.argv[1])
