"""`python -m flux2_train demo`: the whole pipeline on the tiny model and the bundled images, on the CPU."""

from __future__ import annotations

import time
from pathlib import Path

DEMO_DATA = Path(__file__).parent / "demo_data"
DEMO_TRIGGER = "r0b0t"


def demo_config(output_dir: Path, steps: int, device: str = "cpu", model_dir: Path | None = None):
    from .config import resolve_config

    model_dir = model_dir or output_dir / "tiny-flux2-klein"
    return resolve_config(
        subject_preset="character",
        overrides=dict(
            dataset=str(DEMO_DATA), model=str(model_dir), output_dir=str(output_dir),
            name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}", trigger_word=DEMO_TRIGGER,
            resolution=128, max_sequence_length=64, steps=steps, rank=8, alpha=8.0,
            learning_rate=3e-3, gradient_accumulation=1, save_every=max(1, steps // 2),
            validate_every=max(1, steps // 6),
            dtype="float32", device=device, tensorboard=False,
        ),
    )


def run_demo(steps: int = 120, output_dir: Path = Path("runs"), device: str = "cpu") -> int:
    import torch

    from .encoders import load_pipeline_encoders
    from .model import load_transformer
    from .tiny import build_tiny_pipeline_folder
    from .train import Trainer

    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    model_dir = build_tiny_pipeline_folder(output_dir / "tiny-flux2-klein")
    cfg = demo_config(output_dir, steps, device, model_dir)
    backbone = load_transformer(model_dir, dtype=torch.float32)
    encoder = load_pipeline_encoders(model_dir, device=device, dtype=torch.float32)
    result = Trainer(cfg, backbone, encoder=encoder, free_encoder=encoder.free, console=True).run()
    print()
    print("FLUX.2 LoRA trainer demo: a tiny random-weight FLUX.2 [klein]-style model, trained on")
    print(f"the {len(result.dataset.items)} bundled sample images in {DEMO_DATA}.")
    print(result.summary, end="")
    print(f"total        {time.perf_counter() - started:.1f} s")
    print("next         python -m flux2_train train --preset character --dataset DIR --model PATH "
          "(see README.md)")
    return 0
