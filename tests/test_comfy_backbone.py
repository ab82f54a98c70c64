"""ComfyUI's own FLUX.2 model, trained in place: same math as the diffusers path, shared model untouched.

ComfyUI is imported into the test process (CPU); the model is the tiny FLUX.2
built by diffusers' class, converted to ComfyUI's layout, loaded by ComfyUI's
loader under inference mode as ComfyUI's executor does.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from flux2_train.demo import DEMO_DATA
from flux2_train.encoders import load_pipeline_encoders
from flux2_train.errors import ModelError
from flux2_train.keys import diffusers_to_bfl_state_dict
from flux2_train.model import load_transformer
from flux2_train.train import Trainer
from test_train import make_cfg

pytestmark = pytest.mark.comfyui
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pack(comfy):
    """The node pack imported the way ComfyUI imports a custom-node folder."""
    name = "flux2_lora_pack_under_test"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.nodes.comfy_model")


def comfy_model(comfy, diffusers_backbone):
    sd = diffusers_to_bfl_state_dict(diffusers_backbone.module.state_dict())
    with torch.inference_mode():  # as ComfyUI's executor runs the loader node
        return comfy.sd.load_diffusion_model_state_dict({k: v.clone() for k, v in sd.items()},
                                                        model_options={"dtype": torch.float32})


def run(cfg, backbone, model_dir):
    encoder = load_pipeline_encoders(model_dir, device="cpu", dtype=torch.float32)
    return Trainer(cfg, backbone, encoder=encoder).run()


@pytest.mark.parametrize("kind, options", [
    ("klein", dict()),
    ("dev", dict(targets="all_linear", gradient_checkpointing=True)),
    ("klein", dict(gradient_checkpointing=True, checkpoint_blocks=2, ema_decay=0.8)),  # the average of each
])
def test_the_comfyui_model_trains_exactly_like_the_diffusers_model(kind, options, comfy, pack, tmp_path,
                                                                   tiny_pipeline_dir, tiny_dev_pipeline_dir):
    model_dir = tiny_dev_pipeline_dir if kind == "dev" else tiny_pipeline_dir
    common = dict(caption_dropout=0.0, lora_dropout=0.0, steps=5, save_every=0, cache_dir=str(tmp_path / "cache"),
                  **options)
    reference = run(make_cfg(DEMO_DATA, model_dir, tmp_path / "diffusers", **common),
                    load_transformer(model_dir, dtype=torch.float32), model_dir)
    patcher = comfy_model(comfy, load_transformer(model_dir, dtype=torch.float32))
    backbone = pack.ComfyFlux2Backbone(patcher)
    try:
        trained = run(make_cfg(DEMO_DATA, model_dir, tmp_path / "comfy", **common), backbone, model_dir)
    finally:
        backbone.release()
    assert trained.losses == pytest.approx(reference.losses, rel=1e-5)
    assert trained.adapter.keys() == reference.adapter.keys()
    for key, value in reference.adapter.items():
        torch.testing.assert_close(trained.adapter[key], value, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("options, message", [
    (dict(quantize_base="fp8", dtype="bfloat16"), "choose the weight dtype in the model loader"),
    (dict(gradient_checkpointing=True, offload_blocks=1), "ComfyUI places this model's weights itself"),
])
def test_engine_only_speed_options_are_refused_before_any_work(comfy, pack, tmp_path, tiny_pipeline_dir, options,
                                                               message):
    from flux2_train.errors import ConfigError

    patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    backbone = pack.ComfyFlux2Backbone(patcher)
    cfg = make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / "run", **options)
    with pytest.raises(ConfigError, match=message):
        run(cfg, backbone, tiny_pipeline_dir)
    assert not (tmp_path / "run").exists()  # refused before the run folder


def test_compiled_blocks_train_exactly_like_eager_ones(comfy, pack, tmp_path, tiny_pipeline_dir):
    """Compiled whole, each block kind in one graph, checkpointed or not (two of the three blocks are),
    and the shared model left as it was (as in test_training_leaves_the_shared_model_as_it_was)."""
    from torch._dynamo.utils import counters

    common = dict(caption_dropout=0.0, lora_dropout=0.0, steps=4, save_every=0, cache_dir=str(tmp_path / "cache"),
                  gradient_checkpointing=True, checkpoint_blocks=2)
    losses = {}
    torch._dynamo.reset()
    counters.clear()
    for compiled in (False, True):
        patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
        as_it_was = SharedModelState(patcher.model.diffusion_model)
        backbone = pack.ComfyFlux2Backbone(patcher)
        cfg = make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / f"compiled-{compiled}", compile=compiled, **common)
        try:
            losses[compiled] = run(cfg, backbone, tiny_pipeline_dir).losses
        finally:
            backbone.release()
        assert backbone.compiled == compiled
        as_it_was.check(comfy, backbone)
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    # One graph per block kind, and per shape kind (static, then dynamic) and grad mode (validation) at most:
    # a graph per block would hit the compiler's recompile limit on a real model and fall back to eager.
    assert 2 <= counters["stats"]["unique_graphs"] <= 8 and not counters["graph_break"]


def test_offloaded_activations_train_exactly_like_kept_ones(comfy, pack, tmp_path, tiny_pipeline_dir,
                                                            tiny_activations_move):
    """Eager here; compiled with offloaded activations in test_fp8_weights_are_read_in_place_and_the_blocks_compile."""
    common = dict(caption_dropout=0.0, lora_dropout=0.0, steps=3, save_every=0, cache_dir=str(tmp_path / "cache"))
    losses, offloads = {}, {}
    for count in (0, 2):
        backbone = pack.ComfyFlux2Backbone(comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32)))
        cfg = make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / f"offload-{count}", offload_activations=count,
                       **common)
        trainer = Trainer(cfg, backbone, encoder=load_pipeline_encoders(tiny_pipeline_dir, device="cpu",
                                                                        dtype=torch.float32))
        try:
            losses[count] = trainer.run().losses
        finally:
            backbone.release()
        offloads[count] = (trainer.activation_offload, backbone._activation_offload, backbone._offloaded)
    assert losses[2] == losses[0]
    offload, patched_with, blocks = offloads[2]
    assert patched_with is offload and blocks == {0, 1} and offload.offloaded_bytes > 0 and not offload._stored


@pytest.mark.parametrize("mask_shape", [None, (6, 6), (2, 6, 6), (2, 1, 6, 6)])
def test_the_training_attention_computes_what_comfyuis_attention_does(comfy, pack, mask_shape):
    from comfy.ldm.modules.attention import attention_pytorch

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g) for _ in range(3))
    mask = None if mask_shape is None else torch.randn(mask_shape, generator=g)
    for skip_output_reshape in (False, True):
        options = dict(mask=mask, skip_reshape=True, skip_output_reshape=skip_output_reshape, scale=0.3)
        torch.testing.assert_close(pack._training_attention(attention_pytorch, q, k, v, 3, **options),
                                   attention_pytorch(q, k, v, 3, **options))
    flat = [t.transpose(1, 2).flatten(2) for t in (q, k, v)]  # (batch, tokens, heads * dim), as other models pass
    torch.testing.assert_close(pack._training_attention(attention_pytorch, *flat, 3, mask=mask),
                               attention_pytorch(*flat, 3, mask=mask))


class SharedModelState:
    """What other nodes see of a shared ComfyUI model: its weights (the same tensors), modules,
    forwards and hooks; `check` asserts a training run left them as they were."""

    def __init__(self, model):
        self.model = model
        self.values = {k: v.clone() for k, v in model.state_dict().items()}
        self.tensors = {k: (v.data_ptr(), v.is_inference()) for k, v in model.state_dict().items()}
        self.modules = [(n, type(m)) for n, m in model.named_modules()]

    def check(self, comfy, backbone) -> None:
        model, after = self.model, self.model.state_dict()
        assert all(torch.equal(self.values[k], after[k]) for k in self.values)
        assert {k: (v.data_ptr(), v.is_inference()) for k, v in after.items()} == self.tensors  # originals back
        assert [(n, type(m)) for n, m in model.named_modules()] == self.modules
        assert not any("forward" in m.__dict__ for m in model.modules())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert backbone.patcher.patches == {} and backbone.patcher.injections == {}
        assert comfy.model_management.in_training is False


def test_training_leaves_the_shared_model_as_it_was(comfy, pack, tmp_path, tiny_pipeline_dir):
    """Eager here, at a high learning rate; compiled in test_compiled_blocks_train_exactly_like_eager_ones."""
    patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    as_it_was = SharedModelState(patcher.model.diffusion_model)
    backbone = pack.ComfyFlux2Backbone(patcher)
    try:
        run(make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / "run", steps=3, save_every=0,
                     learning_rate=1e-2, cache_dir=str(tmp_path / "cache")), backbone, tiny_pipeline_dir)
    finally:
        backbone.release()
    as_it_was.check(comfy, backbone)


def test_the_adapters_are_live_only_while_training(comfy, pack, tiny_pipeline_dir):
    patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    backbone = pack.ComfyFlux2Backbone(patcher)
    x, ctx, sigma = torch.randn(1, 128, 4, 4), torch.randn(1, 8, 96), torch.tensor([0.5])
    with torch.no_grad():
        plain = backbone.predict(x, sigma, ctx)
    backbone.prepare(torch.device("cpu"), torch.float32)
    params = backbone.add_lora(["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_out"],
                               rank=4, alpha=4.0, dropout=0.0, seed=0)
    with torch.no_grad():
        for p in params:
            p.add_(0.1)
        adapted = backbone.predict(x, sigma, ctx)
    backbone.release()
    with torch.no_grad():
        again = backbone.predict(x, sigma, ctx)
    assert not torch.allclose(plain, adapted)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)


@pytest.mark.parametrize("pieces,swap_halves", [(("q", None, "v"), False), (("scale", None), True)])
def test_a_fused_linears_adapter_as_one_pair_adds_what_its_hook_adds(comfy, pack, pieces, swap_halves):
    """The pair an fp8 Linear adds into its matmul: a slice without an adapter, and the final adaLN's
    halves in ComfyUI's order, as the hook adds them; each piece's dropout draws the hook's mask."""
    from flux2_train import quantize
    from flux2_train.lora import LoraPair

    torch.manual_seed(0)
    pairs = [name and LoraPair(name, 32, 16, 4, 8.0, dropout=0.3) for name in pieces]
    for pair in filter(None, pairs):
        torch.nn.init.normal_(pair.lora_B.weight)  # B starts at zero
    adapter = pack.FusedLoraAdapter(pairs, [16] * len(pairs), swap_halves=swap_halves)
    params = [p for pair in filter(None, pairs) for p in pair.parameters()]
    x = torch.randn(48, 32)
    weight, scale = quantize._rowwise_fp8(torch.randn(16 * len(pieces), 32))

    def hooked(x):  # the fp8 product, then the hook's sum
        return quantize.fp8_linear(x, weight, scale, None, torch.bfloat16, True) + adapter.delta(x).to(torch.bfloat16)

    def in_matmul(x):
        return quantize.fp8_linear(x, weight, scale, None, torch.bfloat16, True, (*adapter.stacked(x), 1.0))

    results = []
    for forward in (hooked, in_matmul):
        torch.manual_seed(1)  # the same dropout masks, drawn piece by piece
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = forward(x).float()
        results.append([y, *torch.autograd.grad(y.square().sum(), params)])
    for ours, theirs in zip(results[1], results[0]):
        assert (ours - theirs).norm() / theirs.norm() < 2e-2
    adapter.eval()  # no dropout: exactly the hook's delta
    h, up = adapter.stacked(x)
    assert h.shape == (48, 4 * sum(map(bool, pieces))) and up.shape == (16 * len(pieces), h.shape[1])
    torch.testing.assert_close(h @ up.t(), adapter.delta(x))


@pytest.mark.slow
def test_adapters_in_fp8_matmuls_compile_one_graph_per_block_kind(comfy, pack):
    """The adapter is the same function bound to each Linear: the blocks of a kind still share a graph
    (a forward that differed per module would compile every block anew, and past the limit run eager)."""
    from torch._dynamo.utils import counters

    from flux2_train.model import DiffusersFlux2Backbone
    from flux2_train.tiny import tiny_transformer

    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(
            fp8_mixed_state_dict(DiffusersFlux2Backbone(tiny_transformer(num_single_layers=3))),
            model_options={"dtype": torch.float32})
    backbone = pack.ComfyFlux2Backbone(patcher)
    try:
        backbone.prepare(torch.device("cpu"), torch.float32)
        backbone.add_lora([n for n in backbone.lora_layers() if "blocks" in n], 4, 4.0, 0.0, 0)
        assert sum("_lora_in_matmul" in m.__dict__ for m in backbone.diffusion_model.modules()) > 8
        torch._dynamo.reset()
        counters.clear()
        assert backbone.compile_blocks() is None
        out = backbone.predict(torch.randn(1, 128, 4, 4), torch.tensor([0.5]), torch.randn(1, 8, 96))
        out.square().mean().backward()
    finally:
        backbone.release()
    assert counters["stats"]["unique_graphs"] == 2  # one double-stream block, three single-stream blocks


@pytest.mark.failure_case("non-FLUX.2 MODEL in the graph")
def test_the_preview_decoder_of_a_streamed_vae_is_built_from_its_weights(comfy, pack):
    """DynamicVRAM hangs native buffers on the modules of a VAE it streams, which a copy of them would free
    when it goes: the CPU decoder for previews is built from the weights instead, as the loader built the VAE.
    This CPU has no DynamicVRAM, so the graph's VAE (ComfyUI's FLUX.2 VAE at its real size, which ComfyUI
    finds from the weights, with random values) says it is streamed."""
    from diffusers import AutoencoderKLFlux2

    encoders = importlib.import_module(pack.__name__.rsplit(".", 1)[0] + ".comfy_encoders")
    with torch.device("meta"):
        shapes = AutoencoderKLFlux2().state_dict()
    g = torch.Generator().manual_seed(0)
    weights = {k: (torch.rand(v.shape, generator=g) + 0.5 if "running_var" in k
                   else torch.randn(v.shape, generator=g) * 0.02) for k, v in shapes.items()}
    vae = comfy.sd.VAE(sd=weights)
    vae.patcher.is_dynamic = lambda: True
    decoder = encoders.ComfyCpuDecoder(vae, lambda latents: latents)
    ours = {p.data_ptr() for p in decoder.vae.first_stage_model.parameters()}
    assert decoder.vae is not vae and not ours & {p.data_ptr() for p in vae.first_stage_model.parameters()}
    latents = torch.randn(1, vae.latent_channels, 2, 2, generator=g)
    expected = vae.decode(latents).float().movedim(-1, 1).clamp(0, 1)
    torch.testing.assert_close(decoder.decode_latents(latents), expected, rtol=0, atol=1e-6)


def test_a_model_that_is_not_flux2_is_refused_by_name(comfy, pack):
    import comfy.model_base

    for cls, name in [(comfy.model_base.SDXL, "SDXL"), (comfy.model_base.Flux, "FLUX.1")]:
        fake_patcher = types.SimpleNamespace(model=cls.__new__(cls))
        with pytest.raises(ModelError, match=f"this MODEL is {name}; the trainer needs FLUX.2"):
            pack.check_flux2(fake_patcher)


def test_training_reads_the_loaded_weights_without_copying_them(comfy, pack, tmp_path, tiny_pipeline_dir):
    """Views of the same memory, which keep what ComfyUI marked on each weight (DynamicVRAM's `_model_dtype`,
    the dtype its casts produce and its buffers are sized for)."""
    patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    model = patcher.model.diffusion_model
    storages = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}
    marked = model.double_blocks[0].img_attn.qkv.weight
    marked._model_dtype = torch.float8_e4m3fn
    seen = {}

    def check_storage(step, trainer):
        seen[step] = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters()}
        live = model.double_blocks[0].img_attn.qkv.weight
        assert live is not marked and live._model_dtype == torch.float8_e4m3fn

    backbone = pack.ComfyFlux2Backbone(patcher)
    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cpu", dtype=torch.float32)
    trainer = Trainer(make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / "run", steps=2, save_every=0,
                               cache_dir=str(tmp_path / "cache")), backbone, encoder=encoder)
    trainer.step_hooks.append(check_storage)
    try:
        trainer.run()
    finally:
        backbone.release()
    assert seen and all(s == storages for s in seen.values())


def with_upstream_lora(comfy, patcher, layer: str, in_features: int, bypass: bool):
    """The MODEL after a random rank-4 LoRA on one diffusers layer, through Load LoRA or Load LoRA (Bypass)."""
    from flux2_train.lora_files import to_format

    g = torch.Generator().manual_seed(0)
    state = to_format({f"{layer}.lora_A.weight": torch.randn(4, in_features, generator=g),
                       f"{layer}.lora_B.weight": torch.randn(128, 4, generator=g)}, 4, 4.0, "comfyui",
                      dtype=torch.float32)
    load = comfy.sd.load_bypass_lora_for_models if bypass else comfy.sd.load_lora_for_models
    with torch.inference_mode():
        return load(patcher, None, state, 1.0, 0)[0]


def probe_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 8, 96, generator=g), torch.tensor([0.5])


def test_a_lora_applied_upstream_is_trained_on_top_of(comfy, pack, tiny_pipeline_dir):
    """Load LoRA before the trainer: the frozen base the adapters learn on includes it."""
    patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    with_lora = with_upstream_lora(comfy, patcher, "single_transformer_blocks.0.attn.to_out", 512, bypass=False)
    x, ctx, sigma = probe_inputs()

    def prediction(p, train: bool):
        backbone = pack.ComfyFlux2Backbone(p)
        if train:
            backbone.prepare(torch.device("cpu"), torch.float32)
            backbone.add_lora(["transformer_blocks.0.attn.to_q"], rank=4, alpha=4.0, dropout=0.0, seed=0)
        else:
            comfy.model_management.load_models_gpu([backbone.patcher])
        try:
            with torch.no_grad():
                return backbone.predict(x, sigma, ctx)
        finally:
            backbone.release()

    plain, reference = prediction(patcher, train=False), prediction(with_lora, train=False)
    training_start = prediction(with_lora, train=True)  # fresh adapters add zero
    assert not torch.allclose(plain, reference)
    torch.testing.assert_close(training_start, reference)
    assert len(with_lora.patches) == 1 and patcher.patches == {}


def test_comfyui_loads_the_saved_lora_as_exactly_the_trained_update(comfy, pack, tmp_path, tiny_pipeline_dir):
    from safetensors.torch import load_file

    from flux2_train.lora import module_deltas
    from flux2_train.lora_files import save_lora

    patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    backbone = pack.ComfyFlux2Backbone(patcher)
    try:
        result = run(make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / "run", steps=3, save_every=0,
                              learning_rate=5e-2, targets="all_linear", cache_dir=str(tmp_path / "cache")),
                     backbone, tiny_pipeline_dir)
    finally:
        backbone.release()
    path = save_lora(tmp_path / "lora.safetensors", result.adapter, rank=4, alpha=4.0, fmt="diffusers",
                     metadata={})
    original = {k: v.clone() for k, v in patcher.model.diffusion_model.state_dict().items()}
    with torch.inference_mode():
        loaded, _ = comfy.sd.load_lora_for_models(patcher, None, load_file(str(path)), 1.0, 0)
        comfy.model_management.load_models_gpu([loaded], force_full_load=True)
        patched = {k: v.clone() for k, v in loaded.model.diffusion_model.state_dict().items()}
        loaded.unpatch_model()
    deltas = diffusers_to_bfl_state_dict({f"{k}.weight": v for k, v in module_deltas(result.adapter, 4, 4.0).items()})
    assert set(deltas) <= set(patched)
    for key, delta in deltas.items():
        torch.testing.assert_close(patched[key] - original[key], delta, rtol=1e-2, atol=2e-3)
    untouched = set(patched) - set(deltas)
    assert all(torch.equal(patched[k], original[k]) for k in untouched)


def fp8_mixed_state_dict(diffusers_backbone, dequantized: bool = False, fmt: str = "float8_e4m3fn") -> dict:
    """The tiny model as ComfyUI's fp8 "mixed" checkpoints store it: fp8 block weights with scales, as
    the benchmark builds them (or, `dequantized`, the float32 weights those hold)."""
    sys.path.insert(0, str(REPO / "bench"))
    from comfy_train_speed import fp8_mixed

    sd = fp8_mixed(diffusers_to_bfl_state_dict(diffusers_backbone.module.state_dict()), fmt)
    if not dequantized:
        return sd
    weights = {}
    for key, value in sd.items():
        if not key.endswith((".weight_scale", ".comfy_quant")):
            scale = sd.get(f"{key.removesuffix('.weight')}.weight_scale")
            weights[key] = value if scale is None else value.float() * scale
    return weights


def fp8_patcher(comfy, model_dir, kind: str):
    """ComfyUI's MODEL with fp8 weights: a "mixed" file, or the loader's fp8_e4m3fn weight dtype."""
    transformer = load_transformer(model_dir, dtype=torch.float32)
    with torch.inference_mode():
        if kind == "mixed":
            return comfy.sd.load_diffusion_model_state_dict(fp8_mixed_state_dict(transformer),
                                                            model_options={"dtype": torch.float32})
        sd = diffusers_to_bfl_state_dict(transformer.module.state_dict())
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float8_e4m3fn})


def fp8_reference_patcher(comfy, model_dir, kind: str):
    """A float32 MODEL holding exactly the values of `fp8_patcher`'s weights."""
    transformer = load_transformer(model_dir, dtype=torch.float32)
    if kind == "mixed":
        sd = fp8_mixed_state_dict(transformer, dequantized=True)
    else:  # the loader stores every weight of the model in fp8
        sd = {k: v.to(torch.float8_e4m3fn).float() for k, v in diffusers_to_bfl_state_dict(
            transformer.module.state_dict()).items()}
    with torch.inference_mode():
        return comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})


@pytest.mark.parametrize("kind", ["mixed", "fp8_e4m3fn"])
def test_fp8_weights_are_read_in_place_and_the_blocks_compile(kind, comfy, pack, tmp_path, tiny_pipeline_dir,
                                                               caplog, tiny_activations_move):
    """fp8 weights held on the device are multiplied where they lie (on the CPU, which computes in float32
    here, dequantized per op), with no ComfyUI cast code in the blocks: they compile, and train exactly as
    a float32 model holding the same values does; with a block's activations offloaded, too."""
    from torch._dynamo.utils import counters

    from flux2_train import offload

    patcher = fp8_patcher(comfy, tiny_pipeline_dir, kind)
    model = patcher.model.diffusion_model
    qkv = model.double_blocks[0].img_attn.qkv
    assert type(qkv.weight).__name__ == "QuantizedTensor" if kind == "mixed" else qkv.weight.dtype == torch.float8_e4m3fn
    before = {n: _values(p) for n, p in model.named_parameters()}
    cast_flags = {n: m.__dict__.get("comfy_cast_weights", "class's") for n, m in model.named_modules()}
    assert not pack.ComfyFlux2Backbone.placement_of(patcher).casts_per_op  # the estimate: nothing cast
    if kind == "mixed":  # the weights stay where they are when activations are offloaded: comfy-kitchen's too
        resident = offload.ActivationOffload(torch.device("cpu"), resident=list(model.parameters()))._resident
        assert qkv.weight._qdata.untyped_storage().data_ptr() in resident
    # No validation pass: its no-grad graphs compile in test_compiled_blocks_train_exactly_like_eager_ones.
    common = dict(steps=3, save_every=0, caption_dropout=0.0, lora_dropout=0.0, cache_dir=str(tmp_path / "cache"),
                  compile=True, offload_activations=2, validate_every=0)
    backbone = pack.ComfyFlux2Backbone(patcher)
    torch._dynamo.reset()
    counters.clear()
    try:
        fp8 = run(make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / "fp8", **common), backbone, tiny_pipeline_dir)
        assert backbone.compiled and not backbone.streams_weights
        assert backbone._activation_offload.offloaded_bytes > 0
        # Every adapter on an fp8 Linear goes into its matmul (the reference's float32 Linears add theirs after).
        routed = [m for m in model.modules() if "_lora_in_matmul" in m.__dict__]
        assert routed and not any(m._forward_hooks for m in routed)
    finally:
        backbone.release()
    assert 2 <= counters["stats"]["unique_graphs"] <= 8 and not counters["graph_break"]  # as for bf16 weights
    assert "compile is off" not in caplog.text
    reference_backbone = pack.ComfyFlux2Backbone(fp8_reference_patcher(comfy, tiny_pipeline_dir, kind))
    try:  # eager: compiled blocks train as eager ones do (test_compiled_blocks_train_exactly_like_eager_ones)
        reference = run(make_cfg(DEMO_DATA, tiny_pipeline_dir, tmp_path / "ref", **common | dict(compile=False)),
                        reference_backbone, tiny_pipeline_dir)
    finally:
        reference_backbone.release()
    assert fp8.losses == pytest.approx(reference.losses, rel=1e-4)
    for key, value in reference.adapter.items():
        torch.testing.assert_close(fp8.adapter[key], value, rtol=1e-3, atol=1e-5)
    # The shared model as it was: the same weights, its own forwards and cast flags.
    assert all(torch.equal(_values(p), before[n]) for n, p in model.named_parameters())
    assert not any({"forward", "_weight_in_place", "_lora_in_matmul"} & set(m.__dict__) for m in model.modules())
    assert cast_flags == {n: m.__dict__.get("comfy_cast_weights", "class's") for n, m in model.named_modules()}


def test_a_quantized_format_not_read_in_place_goes_through_comfyuis_casts_and_the_estimate_counts_them(
        comfy, pack, tiny_pipeline_dir):
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(
            fp8_mixed_state_dict(load_transformer(tiny_pipeline_dir, dtype=torch.float32), fmt="float8_e5m2"),
            model_options={"dtype": torch.float32})
    assert pack.ComfyFlux2Backbone.placement_of(patcher).casts_per_op
    backbone = pack.ComfyFlux2Backbone(patcher)
    try:
        backbone.prepare(torch.device("cpu"), torch.float32)
        assert backbone.streams_weights and "stored as TensorCoreFP8E5M2Layout" in backbone.compile_blocks()
    finally:
        backbone.release()


def test_fp8_weights_behind_a_bypass_lora_go_through_comfyuis_casts_and_say_why(comfy, pack, tiny_pipeline_dir):
    patcher = with_upstream_lora(comfy, fp8_patcher(comfy, tiny_pipeline_dir, "fp8_e4m3fn"),
                                 "transformer_blocks.0.attn.to_q", 128, bypass=True)
    backbone = pack.ComfyFlux2Backbone(patcher)
    try:
        backbone.prepare(torch.device("cpu"), torch.float32)
        assert backbone.streams_weights
        reason = backbone.compile_blocks()
        assert "img_attn.qkv: its forward is replaced, e.g. by a bypass LoRA" in reason and not backbone.compiled
    finally:
        backbone.release()


def _values(t: torch.Tensor) -> torch.Tensor:
    return (t.dequantize() if hasattr(t, "dequantize") and type(t) is not torch.nn.Parameter else t).detach().clone()


@pytest.mark.parametrize("autocast", [False, True])
def test_ops_that_run_again_in_the_backward_pass_give_the_same_gradients(comfy, pack, tiny_pipeline_dir, autocast):
    """The path taken for offloaded or streamed weights (`streams_weights`), checked on the CPU (and under
    bf16 autocast: the backward pass's casts and matmuls run in the forward pass's precision)."""
    def lora_grads(recompute: bool):
        patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
        backbone = pack.ComfyFlux2Backbone(patcher)
        backbone.prepare(torch.device("cpu"), torch.float32)
        if recompute:
            backbone._recompute_weighted_ops()
            routes = {getattr(m.forward, "func", None) for m in backbone.module.modules()}
            assert {pack._cast_linear_call, pack._recompute_call} <= routes  # Linears, and ops with a weight
        params = backbone.add_lora(["transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_out"],
                                   rank=4, alpha=4.0, dropout=0.0, seed=0)
        with torch.no_grad():
            for p in params:
                p.add_(0.05)
        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 8, 96, generator=g)
        try:
            with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                loss = backbone.predict(x, torch.tensor([0.5]), ctx).float().square().mean()
            loss.backward()
            return [p.grad.clone() for p in params]
        finally:
            backbone.release()

    for plain, recomputed in zip(lora_grads(False), lora_grads(True)):
        torch.testing.assert_close(recomputed, plain)


def test_a_bypass_lora_applied_upstream_is_trained_on_top_of_and_left_in_place(comfy, pack, tiny_pipeline_dir):
    """Load LoRA (Bypass) before the trainer: ComfyUI injects it into the same modules the adapters hook."""
    patcher = comfy_model(comfy, load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    bypassed = with_upstream_lora(comfy, patcher, "transformer_blocks.0.attn.to_q", 128, bypass=True)
    x, ctx, sigma = probe_inputs()

    def loaded_prediction(p):
        comfy.model_management.load_models_gpu([p])
        with torch.no_grad():
            return pack.ComfyFlux2Backbone(p).predict(x, sigma, ctx)

    plain, reference = loaded_prediction(patcher), loaded_prediction(bypassed)
    backbone = pack.ComfyFlux2Backbone(bypassed)
    backbone.prepare(torch.device("cpu"), torch.float32)
    params = backbone.add_lora(["transformer_blocks.0.attn.to_q"], rank=4, alpha=4.0, dropout=0.0, seed=0)
    try:
        with torch.no_grad():
            start = backbone.predict(x, sigma, ctx)  # fresh adapters add zero
            for p in params:
                p.add_(0.1)
            trained = backbone.predict(x, sigma, ctx)
    finally:
        backbone.release()
    assert not torch.allclose(plain, reference)
    torch.testing.assert_close(start, reference)
    assert not torch.allclose(trained, reference)
    torch.testing.assert_close(loaded_prediction(bypassed), reference)  # the upstream LoRA still works
    torch.testing.assert_close(loaded_prediction(patcher), plain)  # and the plain MODEL is plain again


@pytest.mark.failure_case("Cancel during a step")
def test_cancel_caught_by_the_progress_bar_still_stops_the_run(comfy, pack):
    """ComfyUI's progress hook clears the Cancel flag when it raises; the run must still stop."""
    import comfy.utils

    from flux2_train.events import StepEvent

    training = importlib.import_module(pack.__name__.replace("comfy_model", "training"))

    def cancelled_hook(value, total, preview, node_id=None):
        raise comfy.model_management.InterruptProcessingException()

    sent = []
    saved_hook, comfy.utils.PROGRESS_BAR_HOOK = comfy.utils.PROGRESS_BAR_HOOK, cancelled_hook
    try:
        progress = training.ComfyProgress("7", 10, send=lambda event, data: sent.append((event, data)))
        assert not progress.should_stop()
        progress(StepEvent(step=1, total=10, loss=1.0, smoothed_loss=1.0, lr=1e-4, seconds_per_step=0.5,
                           eta_seconds=4.5, peak_memory_bytes=0, epoch=0))
    finally:
        comfy.utils.PROGRESS_BAR_HOOK = saved_hook
    assert progress.should_stop()
    assert sent[0][0] == "flux2_lora.progress" and sent[0][1]["node"] == "7" and sent[0][1]["step"] == 1


def test_a_forward_put_back_by_an_ejected_bypass_lora_does_not_count_as_replaced(comfy, pack, tiny_pipeline_dir):
    """ComfyUI's bypass LoRA restores a module by setting its own bound forward on the instance."""
    qkv = fp8_patcher(comfy, tiny_pipeline_dir, "fp8_e4m3fn").model.diffusion_model.double_blocks[0].img_attn.qkv
    qkv.forward = qkv.forward
    assert "forward" in qkv.__dict__ and pack._cannot_read_in_place(qkv) is None
    qkv.forward = lambda x: x
    assert pack._cannot_read_in_place(qkv) == "its forward is replaced, e.g. by a bypass LoRA"
