"""A short run on the tiny FLUX.2 model, set up the same way by the fault, watching and driver tests."""

from __future__ import annotations

from pathlib import Path

import torch

from flux2_train.config import resolve_config
from flux2_train.encoders import load_pipeline_encoders
from flux2_train.model import load_transformer
from flux2_train.train import Trainer

TINY_OPTIONS = dict(name="run", trigger_word="r0b0t", resolution=64, max_upscale=4.0, max_sequence_length=32,
                    steps=6, rank=4, alpha=4.0, learning_rate=1e-3, dtype="float32", device="cpu", save_every=2,
                    tensorboard=False, caption_dropout=0.2, flip=True, lora_dropout=0.1, seed=7)


def tiny_config(dataset: Path, model: Path, out: Path, cache: Path, **options):
    return resolve_config(overrides=dict(TINY_OPTIONS, dataset=str(dataset), model=str(model), output_dir=str(out),
                                         cache_dir=str(cache)) | options)


def tiny_trainer(cfg, model: Path, backbone=None, **kwargs) -> Trainer:
    """A Trainer on the tiny pipeline folder `model` (its transformer, or `backbone`, and its encoders)."""
    return Trainer(cfg, backbone or load_transformer(model, dtype=torch.float32),
                   encoder=load_pipeline_encoders(model, device="cpu", dtype=torch.float32), **kwargs)
