"""Text encoder and VAE of a diffusers FLUX.2 pipeline, used only to fill the caches.

Both are loaded through the pipeline class named in the folder's
`model_index.json` (Flux2Pipeline: Mistral 3; Flux2KleinPipeline: Qwen3), encode
every caption and image once, and are freed before training starts.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path
from typing import Protocol

import torch

from .errors import ConfigError, ModelError

log = logging.getLogger(__name__)

_DEFAULT_LAYERS = {"Flux2Pipeline": (10, 20, 30), "Flux2KleinPipeline": (9, 18, 27)}


class FeatureEncoder(Protocol):
    """What the cache needs: an identity for cache keys, and the two encoders."""

    identity: str

    def encode_text(self, captions: list[str], max_sequence_length: int) -> torch.Tensor:
        """(B, L, context_dim) prompt embeddings, as the FLUX.2 pipeline builds them."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 128, H/16, W/16) latents, patchified and batch-norm normalised, from (B, 3, H, W) in [-1, 1]."""
        ...


def module_fingerprint(module: torch.nn.Module) -> str:
    """Cheap identity of a module: its class, config and a sample of its weights."""
    h = hashlib.sha256(type(module).__name__.encode())
    config = getattr(module, "config", None)
    if config is not None:
        cfg = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    params = list(module.state_dict().items())
    for name, p in params[:4] + params[-4:]:
        h.update(name.encode())
        h.update(p.detach().flatten()[:2048].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def pipeline_text_layers(pipeline_class: str, num_hidden_layers: int) -> tuple[int, ...]:
    """The pipeline's stacked hidden layers; evenly spaced ones for encoders shallower than that."""
    layers = _DEFAULT_LAYERS.get(pipeline_class, (9, 18, 27))
    if max(layers) <= num_hidden_layers:
        return layers
    return tuple(max(1, round(num_hidden_layers * (i + 1) / 3)) for i in range(3))


def check_text_layers(layers, count: int, num_hidden_layers: int) -> None:
    """The transformer's text input is `count` hidden layers side by side: as many, each one the encoder has."""
    if len(layers) != count or not all(0 <= layer <= num_hidden_layers for layer in layers):
        raise ConfigError(f"--text-encoder-layers {','.join(map(str, layers))}: give {count} hidden-layer numbers "
                          f"from 0 to {num_hidden_layers} (the text encoder's layers; the model takes {count} side "
                          "by side), or leave it out for the pipeline's own")


class PipelineEncoders:
    """`FeatureEncoder` over a diffusers FLUX.2 pipeline without its transformer."""

    def __init__(self, pipeline, text_layers: tuple[int, ...] | None = None):
        self.pipeline = pipeline
        self.pipeline_class = type(pipeline).__name__
        te = pipeline.text_encoder
        n_layers = getattr(te.config, "num_hidden_layers", None) or te.config.text_config.num_hidden_layers
        default = pipeline_text_layers(self.pipeline_class, n_layers)
        if text_layers:
            check_text_layers(text_layers, len(default), n_layers)
        self.text_layers = tuple(text_layers) if text_layers else default
        self.text_identity = f"{module_fingerprint(te)}|{self.text_layers}"
        self.vae_identity = module_fingerprint(pipeline.vae)
        self.identity = hashlib.sha256(f"{self.text_identity}|{self.vae_identity}".encode()).hexdigest()[:32]

    @property
    def device(self) -> torch.device:
        return self.pipeline.text_encoder.device

    def to(self, device) -> "PipelineEncoders":
        self.pipeline.text_encoder.to(device)
        self.pipeline.vae.to(device)
        return self

    def caption_tokens(self, caption: str) -> int:
        tok = getattr(self.pipeline.tokenizer, "tokenizer", self.pipeline.tokenizer)
        return len(tok(caption, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def encode_text(self, captions: list[str], max_sequence_length: int) -> torch.Tensor:
        embeds, _ = self.pipeline.encode_prompt(
            prompt=captions,
            device=self.device,
            max_sequence_length=max_sequence_length,
            text_encoder_out_layers=self.text_layers,
        )
        return embeds

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        latents = self.pipeline._patchify_latents(latents)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
        return (latents - mean) / std

    def decoder(self) -> "PipelineDecoder":
        """The VAE's decoder for preview images; it outlives `free` (the text encoder is what is large)."""
        return PipelineDecoder(self.pipeline.vae, self.pipeline._unpatchify_latents)

    def free(self) -> None:
        """Drop the encoders' weights so the transformer has the accelerator to itself."""
        self.pipeline.text_encoder = None
        self.pipeline.vae = None
        self.pipeline = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def pipeline_class(path: str | Path) -> str:
    """The FLUX.2 pipeline class a folder's model_index.json names; a ModelError for any other folder.
    Reads that file only: the command line checks the encoders' folder before anything loads."""
    p = Path(path).expanduser()
    index = p / "model_index.json"
    if not index.is_file():
        raise ModelError(
            f"{p} is not a diffusers pipeline folder (no model_index.json); the text encoder and VAE come from "
            "a FLUX.2 pipeline folder such as FLUX.2-dev or FLUX.2-klein-base-4B: pass it with --encoders"
        )
    cls_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    if cls_name not in _DEFAULT_LAYERS:
        raise ModelError(f"{p} holds a {cls_name or 'unknown'} pipeline; the encoders must come from a FLUX.2 "
                         "[dev] (Flux2Pipeline) or [klein] (Flux2KleinPipeline) folder")
    return cls_name


def load_pipeline_encoders(path: str | Path, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.bfloat16, text_layers=None) -> PipelineEncoders:
    import diffusers

    p = Path(path).expanduser()
    cls = getattr(diffusers, pipeline_class(p))
    pipe = cls.from_pretrained(p, transformer=None, dtype=dtype)
    pipe.vae.to(device, torch.float32)  # the VAE encodes in float32: latents are cached once
    pipe.text_encoder.to(device)
    return PipelineEncoders(pipe, text_layers)


class PipelineDecoder:
    """Latents as the cache holds them to images, as the FLUX.2 pipelines decode them. The VAE waits
    in CPU memory between previews, so training keeps the accelerator."""

    def __init__(self, vae, unpatchify):
        self.vae, self.unpatchify = vae, unpatchify
        self.device = vae.device
        vae.to("cpu")

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.vae.to(self.device)
        try:
            latents = latents.to(self.device, vae.dtype)
            mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents)
            image = vae.decode(self.unpatchify(latents * std + mean), return_dict=False)[0]
            return (image.float() / 2 + 0.5).clamp(0, 1).cpu()
        finally:
            vae.to("cpu")
