"""Which FLUX.2 a model is, loading it from every place it comes in, refusing what is not FLUX.2,
and the backbone's latent layout against the diffusers pipelines' own."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from flux2_train import keys
from flux2_train.errors import ModelError
from flux2_train.model import (DiffusersFlux2Backbone, _klein_distilled_hint, load_transformer,
                               spec_for, spec_from_config)
from flux2_train.tiny import tiny_transformer

# Transformer configs of the released models, as their diffusers config.json files give them.
_COMMON = dict(_class_name="Flux2Transformer2DModel", patch_size=1, in_channels=128, out_channels=None,
               mlp_ratio=3.0, timestep_guidance_channels=256, axes_dims_rope=[32, 32, 32, 32],
               rope_theta=2000, eps=1e-6)
RELEASED = {
    "dev": dict(_COMMON, num_layers=8, num_single_layers=48, num_attention_heads=48, attention_head_dim=128,
                joint_attention_dim=15360, guidance_embeds=True),
    "klein-9b": dict(_COMMON, num_layers=8, num_single_layers=24, num_attention_heads=32, attention_head_dim=128,
                     joint_attention_dim=12288, guidance_embeds=False),
    "klein-4b": dict(_COMMON, num_layers=5, num_single_layers=20, num_attention_heads=24, attention_head_dim=128,
                     joint_attention_dim=7680, guidance_embeds=False),
}
# Published sizes and the tolerance the count must fall within.
EXPECTED_PARAMS = {"dev": (32e9, 0.10), "klein-9b": (9e9, 0.15), "klein-4b": (3.9e9, 0.15)}

NEEDS_FLUX2 = ("FLUX.2 [dev]", "[klein]")


def _assert_refusal(message: str, *what: str):
    for part in what + NEEDS_FLUX2:
        assert part in message, f"{part!r} missing from the refusal: {message}"


# ---------------------------------------------------------------------------
# 5. model families
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(RELEASED))
def test_spec_names_released_family_with_plausible_parameter_count(family):
    spec = spec_from_config(RELEASED[family])
    expected, tol = EXPECTED_PARAMS[family]
    print(f"{family}: {spec.param_count / 1e9:.3f}B parameters ({spec.title})")
    assert spec.family == family
    assert abs(spec.param_count - expected) <= tol * expected, f"{family}: {spec.param_count:,} parameters"
    assert spec.hidden_size == RELEASED[family]["num_attention_heads"] * 128
    assert spec.uses_guidance is RELEASED[family]["guidance_embeds"]
    assert spec.distilled is None
    assert ("[dev]" if family == "dev" else "[klein]") in spec.title


def test_spec_of_a_config_close_to_a_release_is_custom():
    spec = spec_from_config(dict(RELEASED["klein-4b"], num_single_layers=19))
    assert spec.family == "custom"
    assert "custom size" in spec.title and "[klein]-like" in spec.title


def test_spec_of_the_tiny_model_is_custom():
    spec = DiffusersFlux2Backbone(tiny_transformer()).spec
    assert spec.family == "custom"
    assert spec.param_count == sum(p.numel() for p in tiny_transformer().parameters())
    assert "custom size" in spec.title and "[klein]-like" in spec.title
    assert "[dev]-like" in DiffusersFlux2Backbone(tiny_transformer(guidance_embeds=True)).spec.title


def test_a_folders_parameter_count_comes_from_its_weights_headers_without_importing_diffusers(tmp_path):
    """What a --num-gpus launcher checks before any process starts: importing diffusers to build the
    class would take seconds. One file or shards, the count is the class's own."""
    import subprocess
    import sys

    model = tiny_transformer()
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    model.save_pretrained(whole)
    model.save_pretrained(sharded, max_shard_size="1MB")
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    code = ("import sys\nfrom flux2_train.model import spec_for\n"
            f"print(*(spec_for(p)[0].param_count for p in {[str(whole), str(sharded)]!r}), 'diffusers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    count = sum(p.numel() for p in model.parameters())
    assert res.stdout.split() == [str(count), str(count), "False"]


@pytest.mark.failure_case("model folder missing a weight file")
def test_a_folder_missing_a_shard_or_its_safetensors_is_named_before_anything_loads(tmp_path):
    model = tiny_transformer()
    sharded, variant = tmp_path / "sharded", tmp_path / "variant"
    model.save_pretrained(sharded, max_shard_size="1MB")
    shard = sorted(sharded.glob("*-of-*.safetensors"))[-1]
    shard.unlink()
    model.save_pretrained(variant, variant="fp16")
    for read in (spec_for, load_transformer):
        with pytest.raises(ModelError, match=f"missing {shard.name}, which .*download the model again"):
            read(str(sharded))
        with pytest.raises(ModelError, match="safetensors only, without variants"):
            read(str(variant))


@pytest.mark.parametrize("family", ["klein-4b", "klein-9b"])
def test_klein_title_says_base_or_distilled_when_known(family):
    base = spec_from_config(RELEASED[family], distilled=False)
    distilled = spec_from_config(RELEASED[family], distilled=True)
    unknown = spec_from_config(RELEASED[family])
    assert base.title.endswith(" base") and "distilled" not in base.title
    assert "(distilled)" in distilled.title
    assert "base" not in unknown.title and "distilled" not in unknown.title
    # dev has no base/distilled variants: the hint is dropped.
    assert spec_from_config(RELEASED["dev"], distilled=True).distilled is None


# ---------------------------------------------------------------------------
# 6. loading from a pipeline folder, a transformer folder and a single file
# ---------------------------------------------------------------------------

def _assert_is_tiny(backbone, guidance_embeds=False):
    want = tiny_transformer(guidance_embeds=guidance_embeds, seed=0).state_dict()
    got = backbone.module.state_dict()
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want), "loaded weights differ from the saved ones"
    assert not any(p.requires_grad for p in backbone.module.parameters()), "the base model must be frozen"
    assert backbone.spec.family == "custom"
    assert backbone.spec.uses_guidance is guidance_embeds


@pytest.mark.parametrize("where", ["pipeline", "transformer_subfolder"])
def test_load_transformer_from_diffusers_folder(tiny_pipeline_dir, where):
    path = tiny_pipeline_dir if where == "pipeline" else tiny_pipeline_dir / "transformer"
    _assert_is_tiny(load_transformer(path, dtype=torch.float32))


def test_load_transformer_from_dev_pipeline_has_guidance(tiny_dev_pipeline_dir):
    _assert_is_tiny(load_transformer(tiny_dev_pipeline_dir, dtype=torch.float32), guidance_embeds=True)


def test_load_transformer_uses_requested_dtype(tiny_pipeline_dir):
    backbone = load_transformer(tiny_pipeline_dir / "transformer")  # default: bfloat16
    assert {p.dtype for p in backbone.module.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model.", "diffusion_model."])
def test_load_transformer_from_bfl_single_file(tmp_path, prefix):
    bfl = keys.diffusers_to_bfl_state_dict(tiny_transformer(seed=0).state_dict())
    path = tmp_path / "flux-2-klein-tiny.safetensors"
    save_file({prefix + k: v.contiguous() for k, v in bfl.items()}, str(path))
    _assert_is_tiny(load_transformer(path, dtype=torch.float32))


def test_klein_distilled_hint_comes_from_model_index(tiny_pipeline_dir, tmp_path):
    # The tiny pipeline is saved with is_distilled=False (a klein base pipeline).
    assert json.loads((tiny_pipeline_dir / "model_index.json").read_text())["is_distilled"] is False
    assert _klein_distilled_hint(tiny_pipeline_dir) is False
    assert _klein_distilled_hint(tiny_pipeline_dir / "transformer") is False

    distilled = tmp_path / "FLUX.2-klein-4B"
    (distilled / "transformer").mkdir(parents=True)
    shutil.copy(tiny_pipeline_dir / "transformer" / "config.json", distilled / "transformer" / "config.json")
    index = json.loads((tiny_pipeline_dir / "model_index.json").read_text())
    (distilled / "model_index.json").write_text(json.dumps(dict(index, is_distilled=True)))
    assert _klein_distilled_hint(distilled) is True
    assert _klein_distilled_hint(distilled / "transformer") is True
    spec = spec_from_config(RELEASED["klein-4b"], distilled=_klein_distilled_hint(distilled))
    assert spec.title == "FLUX.2 [klein] 4B (distilled)"


@pytest.mark.parametrize("name, hint", [
    ("flux-2-klein-base-4b.safetensors", False),
    ("flux-2-klein-base-9b-fp8.safetensors", False),
    ("flux-2-klein-4b.safetensors", True),
    ("flux-2-klein-9b.safetensors", True),
    ("flux2-dev.safetensors", None),
])
def test_klein_distilled_hint_comes_from_file_name(tmp_path, name, hint):
    path = tmp_path / name
    path.write_bytes(b"")
    assert _klein_distilled_hint(path) is hint


# ---------------------------------------------------------------------------
# 7. refusals
# ---------------------------------------------------------------------------

@pytest.mark.failure_case("non-FLUX.2 model file")
def test_flux1_diffusers_folder_is_refused_as_flux1(tmp_path):
    from diffusers import FluxTransformer2DModel

    flux1 = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    flux1.save_pretrained(tmp_path / "flux1" / "transformer")
    assert json.loads((tmp_path / "flux1" / "transformer" / "config.json").read_text())["_class_name"] \
        == "FluxTransformer2DModel"
    for path in (tmp_path / "flux1", tmp_path / "flux1" / "transformer"):
        with pytest.raises(ModelError) as e:
            load_transformer(path)
        _assert_refusal(str(e.value), "FLUX.1")


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
@pytest.mark.failure_case("non-FLUX.2 model file")
def test_flux1_bfl_single_file_is_refused_as_flux1(tmp_path, prefix):
    path = tmp_path / "flux1-dev.safetensors"
    save_file({prefix + k: torch.zeros(2, 2) for k in (
        "img_in.weight", "txt_in.weight", "double_blocks.0.img_mod.lin.weight",
        "double_blocks.0.img_attn.norm.key_norm.scale", "double_blocks.0.img_attn.qkv.weight",
        "single_blocks.0.linear1.weight", "final_layer.linear.weight")}, str(path))
    with pytest.raises(ModelError) as e:
        load_transformer(path)
    _assert_refusal(str(e.value), "FLUX.1")


@pytest.mark.failure_case("non-FLUX.2 model file")
def test_sdxl_single_file_is_refused_as_sdxl(tmp_path):
    path = tmp_path / "sd_xl_base_1.0.safetensors"
    save_file({
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 2),
        "conditioner.embedders.1.model.ln_final.weight": torch.zeros(2),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(2, 4, 3, 3),
    }, str(path))
    with pytest.raises(ModelError) as e:
        load_transformer(path)
    _assert_refusal(str(e.value), "SDXL")


@pytest.mark.failure_case("non-FLUX.2 model file")
def test_unknown_single_file_is_refused(tmp_path):
    path = tmp_path / "something.safetensors"
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ModelError) as e:
        load_transformer(path)
    _assert_refusal(str(e.value), "not a diffusion transformer")


def test_diffusers_named_single_file_asks_for_its_folder(tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_transformer().state_dict().items()}, str(path))
    for read in (spec_for, load_transformer):
        with pytest.raises(ModelError, match="diffusers-named FLUX.2 weights.*config.json"):
            read(str(path))


def test_missing_model_path_is_refused(tmp_path):
    missing = tmp_path / "no-such-model.safetensors"
    with pytest.raises(ModelError, match="does not exist") as e:
        load_transformer(missing)
    assert str(missing) in str(e.value)
    with pytest.raises(ModelError, match="no model given"):
        load_transformer("")


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_transformer(tmp_path)


@pytest.mark.failure_case("pickle file passed as a model")
def test_non_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "flux2-dev.ckpt"
    torch.save({"img_in.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ModelError, match="safetensors only") as e:
        load_transformer(path)
    assert str(path) in str(e.value)


@pytest.mark.failure_case("model file with a malformed header")
def test_damaged_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "flux2-dev.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelError, match="not a readable safetensors file") as e:
        load_transformer(path)
    assert str(path) in str(e.value)


@pytest.mark.failure_case("model file with a malformed header")
def test_truncated_safetensors_file_is_refused(tmp_path):
    whole = tmp_path / "whole.safetensors"
    bfl = keys.diffusers_to_bfl_state_dict(tiny_transformer().state_dict())
    save_file({k: v.contiguous() for k, v in bfl.items()}, str(whole))
    path = tmp_path / "flux2-dev.safetensors"
    path.write_bytes(whole.read_bytes()[:2000])  # the download stopped inside the header
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_transformer(path)


def test_a_files_quantization_scales_are_not_counted_as_parameters(tmp_path):
    """ComfyUI's fp8 files (older and newer layouts) and NVFP4 files carry scales beside the weights."""
    model = tiny_transformer()
    bfl = {k: v.contiguous() for k, v in keys.diffusers_to_bfl_state_dict(model.state_dict()).items()}
    layer = "double_blocks.0.img_attn.qkv"
    scales = {f"{layer}.{name}": torch.ones(4) for name in ("weight_scale", "weight_scale_2", "input_scale",
                                                             "scale_weight", "scale_input", "comfy_quant")}
    path = tmp_path / "flux2-scaled.safetensors"
    save_file({**bfl, **scales, "scaled_fp8": torch.zeros(2)}, str(path))
    assert spec_for(str(path))[0].param_count == sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------
# 8. the backbone's latent layout is the pipelines' own
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("guidance_embeds", [False, True], ids=["klein", "dev"])
def test_backbone_predict_matches_the_pipeline_layout(guidance_embeds):
    from diffusers import Flux2KleinPipeline, Flux2Pipeline

    pipeline_cls = Flux2Pipeline if guidance_embeds else Flux2KleinPipeline
    transformer = tiny_transformer(guidance_embeds=guidance_embeds, seed=5)
    g = torch.Generator().manual_seed(11)
    b, h, w = 2, 3, 5  # non-square, so a transposed h/w would show
    latents = torch.randn(b, 128, h, w, generator=g)
    text = torch.randn(b, 6, 96, generator=g)
    sigmas = torch.tensor([0.25, 0.9])
    guidance_scale = 3.5

    with torch.no_grad():
        got = DiffusersFlux2Backbone(transformer).predict(latents, sigmas, text,
                                                           guidance=guidance_scale if guidance_embeds else None)

        packed = pipeline_cls._pack_latents(latents)
        latent_ids = pipeline_cls._prepare_latent_ids(latents)
        text_ids = pipeline_cls._prepare_text_ids(text)
        guidance = torch.full([1], guidance_scale, dtype=torch.float32).expand(b) if guidance_embeds else None
        timestep = sigmas * 1000  # the pipelines' timesteps; they pass timestep / 1000
        out = transformer(hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
                          encoder_hidden_states=text, txt_ids=text_ids, img_ids=latent_ids,
                          return_dict=False)[0]
        want = pipeline_cls._unpack_latents_with_ids(out, latent_ids)

    assert got.shape == want.shape == latents.shape
    err = ((got - want).norm() / want.norm()).item()
    assert err <= 1e-6, f"predict differs from the pipeline's layout by {err:.2e} (relative)"
    # Each sample keeps its own sigma (a batch-wide timestep would not tell them apart).
    with torch.no_grad():
        alone = DiffusersFlux2Backbone(transformer).predict(latents[1:], sigmas[1:], text[1:],
                                                             guidance=guidance_scale if guidance_embeds else None)
    assert ((alone[0] - want[1]).norm() / want[1].norm()).item() <= 1e-5


def test_dev_backbone_feeds_the_guidance_it_is_given():
    transformer = tiny_transformer(guidance_embeds=True, seed=5)
    backbone = DiffusersFlux2Backbone(transformer)
    g = torch.Generator().manual_seed(2)
    latents, text = torch.randn(1, 128, 2, 3, generator=g), torch.randn(1, 4, 96, generator=g)
    sigmas = torch.tensor([0.5])
    with torch.no_grad():
        one = backbone.predict(latents, sigmas, text, guidance=1.0)
        default = backbone.predict(latents, sigmas, text)
        four = backbone.predict(latents, sigmas, text, guidance=4.0)
    assert torch.equal(one, default)
    assert not torch.allclose(one, four)
