"""What watching a run costs: one validation-loss evaluation and one round of preview images.

Runs the engine's own functions (`flux2_train.evaluation`) on a real-size FLUX.2
transformer with random weights (diffusers' `Flux2Transformer2DModel`, bf16, as
bench/train_speed.py builds it) and a LoRA on it, and times:

* `validation_loss` over `--validation-samples` (image, noise, sigma) triples at
  `--resolution` (batch 1, no gradients), next to one training step's forward pass;
* `sample_latents` for one preview image at `--preview-resolution` with
  `--preview-steps` steps ([dev]: its guidance input; [klein]: classifier-free
  guidance, two forward passes a step). The VAE decode is not included.

Example:

    python bench/preview_cost.py --family klein-4b --family dev
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

from timing import median_ms  # noqa: E402
from train_speed import TEXT_TOKENS, build_transformer, env_info, family_config  # noqa: E402


def timed(fn, device, repeat: int) -> float:
    """Seconds, the median of `repeat` calls after one untimed call (which pays one-time costs)."""
    return median_ms(fn, repeat, device, warmup=1) / 1000


def run_one(args, family: str) -> dict:
    from types import SimpleNamespace

    from flux2_train.evaluation import ValidationPair, sample_latents, validation_loss
    from flux2_train.lora import resolve_targets
    from flux2_train.model import DiffusersFlux2Backbone

    device = torch.device("cuda")
    config = family_config(family)
    backbone = DiffusersFlux2Backbone(build_transformer(config, device))
    backbone.add_lora(resolve_targets(backbone.lora_layers(), "attention_mlp"), 16, 16.0, 0.0, seed=0)
    backbone.set_training(False)
    context = config["joint_attention_dim"]
    side = args.resolution // 16

    class Cache:  # the cached latent and text embedding of one image
        def load(self, kind, key):
            return torch.randn(128, side, side) if kind == "latents" else torch.randn(TEXT_TOKENS, context)

    sample = SimpleNamespace(latent_keys=("l",), text_key="t")
    data = SimpleNamespace(samples=[sample], cache=Cache())
    pairs = [ValidationPair(0, (i + 0.5) / args.validation_samples, i) for i in range(args.validation_samples)]
    text = torch.randn(TEXT_TOKENS, context)
    dtype = torch.bfloat16

    def autocast():
        return torch.autocast("cuda", dtype=dtype)

    guidance_input = bool(config.get("guidance_embeds"))
    validation = timed(lambda: validation_loss(backbone, data, pairs, device, dtype, autocast, 1.0), device, 3)
    preview = timed(lambda: sample_latents(backbone, text, None if guidance_input else text,
                                           size=args.preview_resolution, steps=args.preview_steps, guidance=4.0,
                                           guidance_input=guidance_input, seed=0, device=device, weight_dtype=dtype,
                                           autocast=autocast), device, 2)
    with torch.no_grad(), autocast():
        x = torch.randn(1, 128, side, side, device=device, dtype=dtype)
        forward = timed(lambda: backbone.predict(x, torch.full((1,), 0.5, device=device, dtype=dtype),
                                                 text[None].to(device, dtype), guidance=1.0), device, 3)
    rec = dict(family=family, resolution=args.resolution, validation_samples=args.validation_samples,
               validation_seconds=validation, forward_seconds=forward, preview_resolution=args.preview_resolution,
               preview_steps=args.preview_steps, cfg=not guidance_input, preview_seconds=preview)
    rec.update(env_info(device))
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", help="klein-4b, klein-9b or dev; repeat for several")
    ap.add_argument("--resolution", type=int, default=1024, help="side of the validation images")
    ap.add_argument("--validation-samples", type=int, default=8)
    ap.add_argument("--preview-resolution", type=int, default=512)
    ap.add_argument("--preview-steps", type=int, default=20)
    args = ap.parse_args(argv)
    runs = []
    for family in args.family or ["klein-4b"]:
        r = run_one(args, family)
        gc.collect()
        torch.cuda.empty_cache()
        runs.append(r)
        print(f"| {family} | validation ({r['validation_samples']} at {r['resolution']}²) {r['validation_seconds']:.2f} s"
              f" | one forward {r['forward_seconds']:.3f} s | preview {r['preview_resolution']}², "
              f"{r['preview_steps']} steps{' + CFG' if r['cfg'] else ''} {r['preview_seconds']:.2f} s | "
              f"{r.get('gpu', '')} |", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "preview_cost.json").write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
