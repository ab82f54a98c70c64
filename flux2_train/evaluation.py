"""Watching a run: the validation loss, preview images and their CLIP score.

The validation loss is the flow loss on fixed (image, noise, noise level) triples: over
images held out of training (`validation_split`), or over the training images themselves
with noise the training never draws. It is evaluated without gradients, with LoRA dropout
off, and touches neither the optimizer nor the training's random streams, so a run with it
trains exactly the run without it.

Previews are sampled from the model being trained (the LoRA as it is at that step) with
FLUX.2's Euler flow sampler and the diffusers pipelines' schedule (sigmas 1 .. 1/steps
shifted by `compute_empirical_mu` for the resolution and step count), [dev]'s guidance
input or, for [klein] base, classifier-free guidance against the empty prompt (distilled
[klein] takes none, and 4 steps). Every backbone samples through its own `predict`, so a
ComfyUI MODEL previews with ComfyUI's model code and its weight patches.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from . import seeds
from .flow import flow_loss, noisy_latents, shift_sigmas, velocity_target

# A short prompt per subject preset, around the trigger word: what the LoRA should show.
DEFAULT_PREVIEW_PROMPTS = {
    "character": ["a photo of {trigger}, portrait, soft window light", "{trigger} walking down a city street"],
    "style": ["a lighthouse on a cliff at dusk, {trigger} style", "a bowl of fruit on a wooden table, {trigger} style"],
    "concept": ["a photo of {trigger} on a wooden table", "{trigger} outdoors on a sunny day"],
    "": ["a photo of {trigger}"],
}


def preview_prompts(cfg) -> list[str]:
    if cfg.preview_prompts:
        return [str(p) for p in cfg.preview_prompts]
    trigger = cfg.trigger_word or "the subject"
    return [p.format(trigger=trigger) for p in DEFAULT_PREVIEW_PROMPTS.get(cfg.subject_preset, DEFAULT_PREVIEW_PROMPTS[""])]


class LatentDecoder(Protocol):
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] from (B, 128, H/16, W/16) latents as the cache holds them."""
        ...


# --------------------------------------------------------------------------- validation

def best_step(history: list[tuple[int, float]]) -> tuple[int, float] | None:
    """The (step, validation loss) with the lowest loss; None before any evaluation."""
    return min(history, key=lambda sv: sv[1]) if history else None


@dataclass(frozen=True)
class ValidationPair:
    sample: int  # index into the cached samples
    sigma: float
    noise_seed: int


def split_validation(n_samples: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): a seeded choice, the same on every process and resume."""
    if fraction <= 0 or n_samples < 2:
        return list(range(n_samples)), []
    held_count = min(n_samples - 1, max(1, round(n_samples * fraction)))
    order = torch.randperm(n_samples, generator=seeds.generator(seed + 7919)).tolist()
    held = sorted(order[:held_count])
    held_set = set(held)
    return [i for i in range(n_samples) if i not in held_set], held


def validation_pairs(pool: list[int], count: int, seed: int, shift: str, tokens: list[int]) -> list[ValidationPair]:
    """`count` triples over the samples in `pool` (`tokens[i]`: sample i's latent token count); the noise
    levels spread evenly over (0, 1), then shifted as the training shifts them for that image's size."""
    pairs = []
    for i in range(count):
        sample = pool[i % len(pool)]
        sigma = float(shift_sigmas(torch.tensor([(i + 0.5) / count]), shift, tokens[sample])[0])
        pairs.append(ValidationPair(sample, sigma, _stream_seed("validation", seed, i)))
    return pairs


def _stream_seed(*parts) -> int:
    """A seed of its own for each (purpose, run seed, index): never one the training's streams use."""
    return int.from_bytes(hashlib.sha256("|".join(map(str, parts)).encode()).digest()[:8], "little") % (2**63 - 1)


@torch.no_grad()
def validation_loss(backbone, data, pairs: list[ValidationPair], device, weight_dtype, autocast, guidance,
                    rank: int = 0, processes: int = 1, total=None) -> float:
    """Mean flow loss over `pairs`. With several processes each takes every n-th pair (padded so every
    process runs as many forward passes: sharded models gather weights in each); `total` sums them."""
    per_process = math.ceil(len(pairs) / processes)
    loss_sum = 0.0
    for k in range(per_process):
        index = k * processes + rank
        pair = pairs[index % len(pairs)]
        s = data.samples[pair.sample]
        x0 = data.cache.load("latents", s.latent_keys[0])[None].float()
        text = data.cache.load("text", s.text_key)[None]
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(pair.noise_seed))
        sigma = torch.tensor([pair.sigma])
        x0, noise, sigma = x0.to(device), noise.to(device), sigma.to(device)
        with autocast():
            pred = backbone.predict(noisy_latents(x0, noise, sigma).to(weight_dtype), sigma.to(weight_dtype),
                                    text.to(device, weight_dtype), guidance=guidance)
        if index < len(pairs):
            loss_sum += float(flow_loss(pred, velocity_target(x0, noise), sigma))
    if total is not None:
        loss_sum = total([loss_sum])[0]
    return loss_sum / len(pairs)


# --------------------------------------------------------------------------- previews

def flux2_sigmas(steps: int, image_tokens: int) -> torch.Tensor:
    """The FLUX.2 pipelines' schedule: 1 .. 1/steps, shifted by their empirical mu for this many
    image tokens and steps (FlowMatchEulerDiscreteScheduler's exponential time shift), then 0."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    u = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64)
    factor = math.exp(compute_empirical_mu(image_tokens, steps))
    return torch.cat([factor * u / (1 + (factor - 1) * u), torch.zeros(1, dtype=torch.float64)])


def preview_plan(cfg, spec) -> tuple[int, float, bool]:
    """(steps, guidance, classifier-free guidance?) of the previews for this model.

    [dev] is guidance-distilled (its guidance input, no second pass); [klein] base takes
    classifier-free guidance; distilled [klein] takes neither and needs only a few steps.
    """
    distilled = bool(getattr(spec, "distilled", False)) and not spec.guidance_embeds
    steps = cfg.preview_steps or (4 if distilled else 20)
    use_cfg = not spec.guidance_embeds and not distilled and cfg.preview_guidance > 1
    return steps, cfg.preview_guidance, use_cfg


@torch.no_grad()
def sample_latents(backbone, text: torch.Tensor, negative: torch.Tensor | None, *, size: int, steps: int,
                   guidance: float, guidance_input: bool, seed: int, device, weight_dtype, autocast) -> torch.Tensor:
    """Euler steps of the flow from noise (seeded on the CPU) to a latent, as (1, 128, size/16, size/16).

    `guidance_input`: the model takes `guidance` as an input ([dev]); otherwise a `negative`
    embedding turns on classifier-free guidance with scale `guidance`.
    """
    side = size // 16
    x = torch.randn((1, 128, side, side), generator=seeds.generator(seed)).to(device)
    sigmas = flux2_sigmas(steps, side * side)
    cfg_scale = guidance if (not guidance_input and negative is not None and guidance > 1) else 1.0
    text = text[None].to(device, weight_dtype)
    negative = negative[None].to(device, weight_dtype) if cfg_scale > 1 else None
    for i in range(steps):
        sigma = torch.full((1,), float(sigmas[i]), device=device)
        with autocast():
            v = backbone.predict(x.to(weight_dtype), sigma.to(weight_dtype), text,
                                 guidance=guidance if guidance_input else None).float()
            if negative is not None:
                v_neg = backbone.predict(x.to(weight_dtype), sigma.to(weight_dtype), negative).float()
                v = v_neg + cfg_scale * (v - v_neg)
        x = x + float(sigmas[i + 1] - sigmas[i]) * v
    return x


def save_png(image: torch.Tensor, path: Path) -> Path:
    """(3, H, W) in [0, 1] as an 8-bit PNG, written atomically."""
    from PIL import Image

    from .fsutil import atomic_write

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


def load_png(path: Path) -> torch.Tensor:
    """A saved preview back as (3, H, W) in [0, 1]."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return torch.from_numpy(np.asarray(img.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


# --------------------------------------------------------------------------- CLIP score

def check_clip_model(folder: str | Path) -> Path:
    """The CLIP model's folder, if it holds one (checked before a run loads anything else)."""
    from .errors import ConfigError

    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"--clip-model {path}: no CLIP model there (config.json missing); give a folder saved by "
                          "transformers' CLIPModel.save_pretrained, e.g. a download of openai/clip-vit-large-patch14")
    return path


class ClipScorer:
    """CLIPScore (100 x cosine of the image and text embeddings, at least 0) with a transformers CLIPModel."""

    def __init__(self, folder: str | Path):
        from transformers import CLIPModel, CLIPProcessor

        path = check_clip_model(folder)
        self.model = CLIPModel.from_pretrained(path).eval()
        self.processor = CLIPProcessor.from_pretrained(path)

    @torch.no_grad()
    def score(self, images: list[torch.Tensor], prompts: list[str]) -> list[float]:
        pixels = [(img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy() for img in images]
        inputs = self.processor(text=prompts, images=pixels, return_tensors="pt", padding=True, truncation=True)
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        return [float(100 * max(c, 0.0)) for c in cos.tolist()]


# --------------------------------------------------------------------------- during the run

class RunWatcher:
    """Validation loss and previews at their steps, as events; the trainer calls `after_step`.

    Every process of a multi-process run takes part (a sharded model needs all of them for a
    forward pass); the main one writes the preview files.
    """

    def __init__(self, cfg, spec, backbone, data, pool: list[int], *, device, weight_dtype, autocast, world, events,
                 run_dir: Path, decoder: LatentDecoder | None, preview_texts: list[torch.Tensor],
                 negative_text: torch.Tensor | None):
        self.cfg, self.spec, self.backbone, self.data = cfg, spec, backbone, data
        self.device, self.weight_dtype, self.autocast = device, weight_dtype, autocast
        self.world, self.events, self.run_dir, self.decoder = world, events, run_dir, decoder
        self.preview_texts, self.negative_text = preview_texts, negative_text
        self.prompts = preview_prompts(cfg)
        tokens = [(s.bucket[0] // 16) * (s.bucket[1] // 16) for s in data.samples]
        self.pairs = validation_pairs(pool, cfg.validation_samples, cfg.seed, cfg.timestep_shift, tokens)
        self.history: list[tuple[int, float]] = []  # (step, validation loss)
        self.preview_images: list[torch.Tensor] = []  # the latest round, (3, H, W) in [0, 1]
        self.preview_paths: list[Path] = []
        # Loaded before the first step, on the main process (the one that scores): a bad folder
        # stops the run at once rather than at the first preview.
        self._clip = ClipScorer(cfg.clip_model) if cfg.clip_model and cfg.preview_every and world.is_main else None

    # -- checkpoints carry the history, so a resumed run still names its best step
    def state(self) -> dict:
        return {"validation": [[s, v] for s, v in self.history]}

    def load_state(self, state: dict) -> None:
        self.history = [(int(s), float(v)) for s, v in state.get("validation", [])]

    @property
    def best(self) -> tuple[int, float] | None:
        return best_step(self.history)

    def due(self, step: int, last: bool) -> bool:
        """Whether `after_step` has work at `step`."""
        return self._validation_due(step, last) or self._preview_due(step, last)

    def _validation_due(self, step: int, last: bool) -> bool:
        return bool(self.cfg.validate_every) and (step % self.cfg.validate_every == 0 or last)

    def _preview_due(self, step: int, last: bool) -> bool:
        return bool(self.cfg.preview_every) and (step % self.cfg.preview_every == 0 or last)

    def after_step(self, step: int, last: bool) -> None:
        if self._validation_due(step, last):
            self.validate(step)
        if self._preview_due(step, last):
            self.preview(step)

    def validate(self, step: int) -> float:
        from .events import StatusEvent

        if self.history and self.history[-1][0] == step:
            return self.history[-1][1]
        self.backbone.set_training(False)
        try:
            loss = validation_loss(self.backbone, self.data, self.pairs, self.device, self.weight_dtype, self.autocast,
                                   self.cfg.guidance_scale, self.world.rank, self.world.size,
                                   total=lambda v: self.world.sum(v, self.device))
        finally:
            self.backbone.set_training(True)
        self.history.append((step, loss))
        best_step, best_loss = self.best
        self.events.emit(StatusEvent(
            "validation", f"validation loss {loss:.4f} at step {step} (best {best_loss:.4f} at step {best_step})",
            step=step, total=self.cfg.steps,
            data={"validation_loss": loss, "best_step": best_step, "best_loss": best_loss}))
        return loss

    def preview(self, step: int) -> list[Path]:
        import time

        from .events import StatusEvent

        if self.decoder is None:
            return []
        cfg, started = self.cfg, time.perf_counter()
        steps, guidance, use_cfg = preview_plan(cfg, self.spec)
        self.backbone.set_training(False)
        try:  # every process samples (a sharded model needs all of them); the main one decodes
            latents = [sample_latents(self.backbone, text, self.negative_text if use_cfg else None,
                                      size=cfg.preview_resolution, steps=steps, guidance=guidance,
                                      guidance_input=self.spec.guidance_embeds, seed=cfg.seed + k, device=self.device,
                                      weight_dtype=self.weight_dtype, autocast=self.autocast)
                       for k, text in enumerate(self.preview_texts)]
        finally:
            self.backbone.set_training(True)
        if not self.world.is_main:
            return []
        images = [self.decoder.decode_latents(x)[0].float().cpu() for x in latents]
        self.preview_images = images
        paths = [save_png(img, self.run_dir / "previews" / f"step-{step:06d}-{k}.png") for k, img in enumerate(images)]
        self.preview_paths = paths
        scores = self._clip_scores(images)
        seconds = time.perf_counter() - started
        entries = [{"path": str(p), "prompt": prompt, "seed": cfg.seed + k, "clip_score": scores[k] if scores else None}
                   for k, (p, prompt) in enumerate(zip(paths, self.prompts))]
        clip = f"; CLIP score {sum(scores) / len(scores):.1f}" if scores else ""
        self.events.emit(StatusEvent(
            "preview", f"{len(paths)} preview(s) at step {step} in {seconds:.1f} s{clip}: {paths[0].parent}",
            step=step, total=cfg.steps, data={"images": entries, "seconds": seconds}))
        return paths

    def _clip_scores(self, images: list[torch.Tensor]) -> list[float]:
        return self._clip.score(images, self.prompts) if self._clip else []

    def latest_round(self) -> list[Path]:
        """The newest preview files on disk (a run resumed only to write its final files made none)."""
        if self.preview_paths or not (self.run_dir / "previews").is_dir():
            return self.preview_paths
        files = sorted((self.run_dir / "previews").glob("step-*.png"))
        last = files[-1].name.rsplit("-", 1)[0] if files else ""
        return [f for f in files if f.name.rsplit("-", 1)[0] == last]

