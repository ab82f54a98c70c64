"""The same loop on a CUDA GPU: bf16 and fp16 mixed precision on the tiny model (skipped without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from flux2_train.config import resolve_config
from flux2_train.encoders import load_pipeline_encoders
from flux2_train.model import load_transformer
from flux2_train.train import Trainer


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tiny_model_trains_on_the_gpu_with_mixed_precision(dtype, demo_dataset, tiny_pipeline_dir, tmp_path):
    weight_dtype = getattr(torch, dtype)
    cfg = resolve_config(overrides=dict(
        dataset=str(demo_dataset), model=str(tiny_pipeline_dir), output_dir=str(tmp_path), name="gpu",
        trigger_word="r0b0t", resolution=64, max_upscale=4.0, max_sequence_length=32, steps=6, rank=4,
        dtype=dtype, device="cuda", save_every=3, tensorboard=False, gradient_checkpointing=True))
    backbone = load_transformer(tiny_pipeline_dir, dtype=weight_dtype)
    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cuda", dtype=torch.float32)
    result = Trainer(cfg, backbone, encoder=encoder, free_encoder=encoder.free).run()
    assert all(math.isfinite(x) for x in result.losses)
    assert result.peak_memory_bytes > 0 and result.lora_path.is_file()
