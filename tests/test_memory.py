"""The vRAM estimate: its parts, its verdict, and the refusal of runs far beyond the card."""

from __future__ import annotations

import pytest

from flux2_train.config import resolve_config
from flux2_train.errors import OutOfMemory
from flux2_train.memory import GIB, estimate_memory
from flux2_train.model import KNOWN_FAMILIES, spec_from_config

EXTRA = dict(attention_head_dim=128, in_channels=128, mlp_ratio=3.0)


def spec(family: str):
    return spec_from_config(dict(KNOWN_FAMILIES[family], **EXTRA, guidance_embeds=family == "dev"))


def cfg(**kw):
    return resolve_config(overrides=dict(dict(resolution=1024, rank=16, targets="attention_mlp"), **kw))


@pytest.mark.parametrize("family, checkpointing, measured_gib", [
    ("klein-4b", False, 23.4), ("klein-4b", True, 9.4), ("klein-9b", False, 44.5), ("dev", True, 66.5),
])
def test_the_estimate_stays_near_the_h100_peaks_it_was_calibrated_on(family, checkpointing, measured_gib):
    """bench/README.md: bf16, 1024², rank 16, attention_mlp, batch 1."""
    est = estimate_memory(spec(family), cfg(gradient_checkpointing=checkpointing))
    assert est.total / GIB == pytest.approx(measured_gib, rel=0.06)
    assert set(est.parts) == {"frozen weights", "LoRA weights + grads", "optimizer state", "activations",
                              "runtime overhead"}


def test_checkpointing_and_fp8_weights_lower_the_estimate():
    s = spec("dev")
    plain = estimate_memory(s, cfg())
    assert estimate_memory(s, cfg(gradient_checkpointing=True)).total < plain.total
    assert estimate_memory(s, cfg(), weight_bytes=s.param_count).total < plain.total


def test_the_verdict_and_the_refusal_follow_the_available_memory():
    s, c = spec("klein-4b"), cfg()
    total = estimate_memory(s, c).total
    assert estimate_memory(s, c, available=2 * total).verdict == "fits"
    assert estimate_memory(s, c, available=int(total / 0.95)).verdict == "tight"
    small = estimate_memory(s, c, available=total // 2)
    assert small.verdict == "does not fit"
    assert "gradient checkpointing" in small.summary()
    with pytest.raises(OutOfMemory, match="the GPU has"):
        small.check()
    estimate_memory(s, c, available=int(total / 1.2)).check()  # tight, but let it try
    estimate_memory(s, c).check()  # unknown device size: no refusal


@pytest.mark.parametrize("targets", ["attention", "attention_mlp", "all_linear"])
def test_the_lora_part_counts_what_peft_allocates_on_the_real_class(targets):
    from flux2_train.memory import lora_parameter_count
    from flux2_train.model import DiffusersFlux2Backbone
    from flux2_train.lora import resolve_targets
    from flux2_train.tiny import tiny_transformer

    backbone = DiffusersFlux2Backbone(tiny_transformer())
    c = cfg(rank=4, targets=targets)
    params = backbone.add_lora(resolve_targets(backbone.lora_layers(), targets), 4, 4.0, 0.0, 0)
    assert lora_parameter_count(backbone.spec, c) == sum(p.numel() for p in params)
