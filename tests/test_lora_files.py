"""LoRA files written by the trainer load, key for key and weight for weight, in diffusers' real loader.

Every check uses a tiny random-weight `Flux2Transformer2DModel` and the real
`Flux2KleinPipeline.load_lora_weights`; nothing is mocked or downloaded.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2_train import keys, lora, lora_files
from flux2_train.config import TrainConfig
from flux2_train.model import DiffusersFlux2Backbone, load_transformer, spec_from_config
from flux2_train.tiny import tiny_transformer

RANK, ALPHA = 4, 8.0
SEED = 0

# Target sets: two presets, and one that leaves the k third of the fused img qkv without an adapter.
TARGETS = {
    "attention_mlp": ("attention_mlp", None),
    "all_linear": ("all_linear", None),
    "q_and_v_only": ("attention", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v"]),
}

KEY_PATTERNS = {
    "diffusers": re.compile(
        r"^transformer\.("
        r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
        r"|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
        r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)"
        r"|x_embedder|context_embedder|proj_out"
        r")\.lora_[AB]\.weight$"
    ),
    "comfyui": re.compile(
        r"^diffusion_model\.("
        r"double_blocks\.\d+\.(img|txt)_(attn\.(qkv|proj)|mlp\.[02])"
        r"|single_blocks\.\d+\.linear[12]"
        r"|img_in|txt_in|final_layer\.linear"
        r")\.lora_[AB]\.weight$"
    ),
    "kohya": re.compile(
        r"^lora_unet_("
        r"double_blocks_\d+_(img|txt)_(attn_(qkv|proj)|mlp_[02])"
        r"|single_blocks_\d+_linear[12]"
        r"|img_in|txt_in|final_layer_linear"
        r")\.(lora_down\.weight|lora_up\.weight|alpha)$"
    ),
}

# What diffusers (or PEFT) says when a key of a LoRA file is not used or not found.
_KEY_TROUBLE = re.compile(r"unexpected|missing|unsupported|unloaded|not loaded|no lora keys|key", re.IGNORECASE)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

def _trained_lora_model(target_case: str, guidance_embeds: bool = False):
    """A tiny transformer with injected LoRA whose B matrices are random (as after training)."""
    model = tiny_transformer(guidance_embeds=guidance_embeds, seed=SEED)
    preset, explicit = TARGETS[target_case]
    targets = lora.resolve_targets(model, preset, explicit)
    lora.add_lora(model, targets, rank=RANK, alpha=ALPHA)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval(), targets


def _write_lora(path, state, fmt, metadata=None):
    return lora_files.save_lora(path, state, rank=RANK, alpha=ALPHA, fmt=fmt, metadata=metadata or {},
                                dtype=torch.float32)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@contextmanager
def _key_complaints():
    """Collect what diffusers logs (its logger does not propagate) and what PEFT warns while loading."""
    handler = _Records()
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    complaints: list[str] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield complaints
    finally:
        logger.removeHandler(handler)
    complaints += [m for m in handler.messages if _KEY_TROUBLE.search(m)]
    complaints += [str(w.message) for w in caught if _KEY_TROUBLE.search(str(w.message))]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline.from_pretrained(tiny_pipeline_dir, torch_dtype=torch.float32)


def _load_in_diffusers(pipe, path, guidance_embeds: bool = False):
    """A fresh base transformer (same seed as the trained one's base) with the file loaded by diffusers."""
    pipe.transformer = tiny_transformer(guidance_embeds=guidance_embeds, seed=SEED)
    with _key_complaints() as complaints:
        pipe.load_lora_weights(str(path))
    return complaints


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Base parameters of a (possibly PEFT-wrapped) model under their plain diffusers names."""
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if "lora_" not in k}


def _adapted_modules(model: torch.nn.Module) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _forward(model, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 128, 3, 5, generator=g)
    text = torch.randn(2, 6, 96, generator=g)
    sigmas = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        return DiffusersFlux2Backbone(model).predict(latents, sigmas, text, guidance=3.5)


# ---------------------------------------------------------------------------
# 1. every format loads completely in diffusers and applies exactly the trained update
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("target_case", list(TARGETS))
@pytest.mark.parametrize("fmt", lora_files.FORMATS)
def test_lora_file_loads_in_diffusers_with_no_key_left_and_fuses_to_the_trained_deltas(pipe, tmp_path, fmt,
                                                                                         target_case):
    trained, targets = _trained_lora_model(target_case)
    state = lora.lora_state_dict(trained)
    expected = lora.module_deltas(state, RANK, ALPHA)
    assert set(expected) == set(targets)
    assert all(d.abs().max() > 0 for d in expected.values())

    path = _write_lora(tmp_path / f"lora-{fmt}.safetensors", state, fmt)
    complaints = _load_in_diffusers(pipe, path)
    assert complaints == [], f"diffusers did not load every key of the {fmt} file: {complaints}"

    adapted = _adapted_modules(pipe.transformer)
    missing = set(targets) - adapted
    assert not missing, f"modules trained but without an adapter after loading: {sorted(missing)}"
    # The BFL formats fuse q/k/v, so a sibling of an adapted projection may get a (zero) adapter.
    extra = {n for n in adapted - set(targets)
             if not re.search(r"attn\.(to_[qkv]|add_[qkv]_proj)$", n)}
    assert not extra, f"adapters on modules that were never trained: {sorted(extra)}"

    base = _base_weights(tiny_transformer(seed=SEED))
    pipe.fuse_lora()
    fused = _base_weights(pipe.transformer)
    assert set(fused) == set(base)

    linears = {n for n, m in tiny_transformer(seed=SEED).named_modules() if isinstance(m, torch.nn.Linear)}
    for key, w0 in base.items():
        module, param = key.rsplit(".", 1)
        delta = fused[key] - w0
        if param == "weight" and module in expected:
            err = _rel_err(delta, expected[module])
            assert err <= 1e-5, f"{fmt}: {module} fused delta is off by {err:.2e} (relative)"
        else:
            assert torch.equal(fused[key], w0), (
                f"{fmt}: {key} changed although {'it is a bias' if module in linears else 'no adapter targets it'}")


# ---------------------------------------------------------------------------
# 2. the loaded (unfused) adapter computes what the trained PEFT model computes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", lora_files.FORMATS)
def test_diffusers_loaded_lora_gives_the_trained_models_output(pipe, tmp_path, fmt):
    trained, _ = _trained_lora_model("all_linear")
    path = _write_lora(tmp_path / "lora.safetensors", lora.lora_state_dict(trained), fmt)
    assert not _load_in_diffusers(pipe, path)

    want = _forward(trained)
    got = _forward(pipe.transformer)
    base = _forward(tiny_transformer(seed=SEED))
    assert _rel_err(want, base) > 1e-3, "the LoRA must change the output for this check to mean anything"
    err = _rel_err(got, want)
    assert err <= 1e-5, f"{fmt}: diffusers output differs from the trained model by {err:.2e} (relative)"


# ---------------------------------------------------------------------------
# 3. keys, alpha and header metadata of each format
# ---------------------------------------------------------------------------

def _metadata(spec, targets, fmt):
    cfg = TrainConfig(rank=RANK, alpha=ALPHA, trigger_word="sks_cat", steps=300, resolution=512, name="cat-lora")
    return lora_files.lora_metadata(cfg=cfg, spec=spec, steps=120, image_count=7, fmt=fmt, targets=targets)


@pytest.mark.parametrize("fmt", lora_files.FORMATS)
def test_lora_file_keys_alpha_and_metadata_follow_the_format(tmp_path, fmt):
    trained, targets = _trained_lora_model("all_linear")
    spec = DiffusersFlux2Backbone(tiny_transformer(seed=SEED)).spec
    path = _write_lora(tmp_path / "lora.safetensors", lora.lora_state_dict(trained), fmt,
                       _metadata(spec, targets, fmt))
    tensors = load_file(str(path))

    bad = [k for k in tensors if not KEY_PATTERNS[fmt].match(k)]
    assert not bad, f"{fmt} keys outside the format: {bad[:5]}"
    alphas = [k for k in tensors if k.endswith(".alpha")]
    if fmt == "kohya":
        downs = [k for k in tensors if k.endswith(".lora_down.weight")]
        assert len(alphas) == len(downs) > 0
        for k in downs:
            base = k[: -len(".lora_down.weight")]
            assert f"{base}.lora_up.weight" in tensors
            assert tensors[f"{base}.alpha"].item() == tensors[k].shape[0], f"{base}: alpha is not the rank"
    else:
        assert alphas == [], f"{fmt} files must not carry .alpha keys (diffusers refuses them)"
        for k in (k for k in tensors if k.endswith(".lora_A.weight")):
            assert k.replace(".lora_A.", ".lora_B.") in tensors

    meta = lora_files.read_metadata(path)
    assert meta["modelspec.architecture"] == "flux-2/lora"  # the tiny model is no released family
    assert meta["ss_network_dim"] == str(RANK)
    # alpha / rank is in the weights: a kohya tool reading the header must apply scale 1, as the loaders do.
    assert meta["ss_network_alpha"] == meta["ss_network_dim"] and float(meta["flux2_train.alpha"]) == ALPHA
    config = json.loads(meta["flux2_train.config"])
    assert config["rank"] == RANK and config["alpha"] == ALPHA
    assert meta["modelspec.trigger_phrase"] == meta["flux2_train.trigger_word"] == "sks_cat"
    assert meta["flux2_train.steps"] == meta["ss_steps"] == "120"
    assert meta["flux2_train.resolution"] == "512"
    assert meta["modelspec.resolution"] == "512x512"
    assert meta["flux2_train.image_count"] == meta["ss_num_train_images"] == "7"
    assert meta["flux2_train.format"] == fmt
    assert json.loads(meta["flux2_train.targets"]) == targets


@pytest.mark.parametrize("family, config", [
    ("dev", dict(num_layers=8, num_single_layers=48, num_attention_heads=48, joint_attention_dim=15360,
                 guidance_embeds=True)),
    ("klein-9b", dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                      guidance_embeds=False)),
    ("klein-4b", dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                      guidance_embeds=False)),
])
def test_lora_metadata_architecture_names_the_released_family(family, config):
    spec = spec_from_config(dict(config, attention_head_dim=128, in_channels=128, patch_size=1, mlp_ratio=3.0,
                                 axes_dims_rope=(32, 32, 32, 32)))
    meta = _metadata(spec, [], "diffusers")
    assert meta["modelspec.architecture"] == f"flux-2-{family}/lora"
    assert meta["ss_base_model_version"] == f"flux-2-{family}"


def test_unknown_lora_format_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA format"):
        lora_files.to_format({}, RANK, ALPHA, "lycoris")


# ---------------------------------------------------------------------------
# 4. the BFL name table agrees with diffusers' own BFL -> diffusers converter
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["klein", "dev"])
def test_bfl_single_file_from_key_table_loads_back_to_the_same_model(tmp_path, guidance_embeds, prefix):
    original = tiny_transformer(guidance_embeds=guidance_embeds, seed=3)
    bfl = keys.diffusers_to_bfl_state_dict(original.state_dict())
    assert not any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in bfl)
    assert sum(v.numel() for v in bfl.values()) == sum(p.numel() for p in original.parameters())
    path = tmp_path / "flux2-tiny.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, str(path))

    loaded = load_transformer(path, dtype=torch.float32)
    got, want = loaded.module.state_dict(), original.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs after BFL export and diffusers' conversion"
    err = _rel_err(_forward(loaded.module), _forward(original))
    assert err <= 1e-5


def test_bfl_target_splits_double_block_qkv_and_swaps_final_adaln():
    assert keys.bfl_target("transformer_blocks.3.attn.to_k") == keys.BflTarget("double_blocks.3.img_attn.qkv", 1, 3)
    assert keys.bfl_target("transformer_blocks.0.attn.add_v_proj") == keys.BflTarget("double_blocks.0.txt_attn.qkv", 2, 3)
    assert keys.bfl_target("single_transformer_blocks.7.attn.to_out").name == "single_blocks.7.linear2"
    assert keys.bfl_target("norm_out.linear").swap_halves
    with pytest.raises(KeyError):
        keys.bfl_target("transformer_blocks.0.norm1.linear")


def test_target_modules_take_names_suffixes_and_regexes_and_refuse_unknown_ones():
    from flux2_train.errors import ConfigError
    from flux2_train.lora import resolve_targets
    from flux2_train.tiny import tiny_transformer

    module = tiny_transformer()
    assert resolve_targets(module, "attention", ["attn.to_q"]) == ["transformer_blocks.0.attn.to_q"]
    assert resolve_targets(module, "attention", [r"single_transformer_blocks\.\d+\.attn\.to_out"]) == [
        "single_transformer_blocks.0.attn.to_out", "single_transformer_blocks.1.attn.to_out"]
    with pytest.raises(ConfigError, match="matches no Linear layer"):
        resolve_targets(module, "attention", ["attn.to_qq"])


def test_presets_leave_modulation_embedding_and_norm_layers_out():
    from flux2_train.lora import resolve_targets
    from flux2_train.tiny import tiny_transformer

    module = tiny_transformer(guidance_embeds=True)
    for preset in ("attention", "attention_mlp", "all_linear"):
        chosen = resolve_targets(module, preset)
        assert not [n for n in chosen if "modulation" in n or "time_guidance" in n or "norm" in n]
    assert "transformer_blocks.0.ff.linear_in" not in resolve_targets(module, "attention")
    assert "transformer_blocks.0.ff.linear_in" in resolve_targets(module, "attention_mlp")
    assert "x_embedder" in resolve_targets(module, "all_linear")


@pytest.mark.failure_case("LoRA file of the same name exists")
def test_a_save_without_overwrite_never_replaces_a_file_that_appeared_meanwhile(tmp_path):
    from flux2_train.fsutil import atomic_write_bytes, save_safetensors_atomic

    path = tmp_path / "lora.safetensors"
    atomic_write_bytes(path, b"someone else's file")
    with pytest.raises(FileExistsError):
        save_safetensors_atomic({"x": torch.zeros(1)}, path, overwrite=False)
    assert path.read_bytes() == b"someone else's file"
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]  # no temporary file left
