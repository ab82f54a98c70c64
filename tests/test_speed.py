"""Speed and memory modes keep the training correct: each gives the plain run's losses within its precision."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from flux2_train.config import resolve_config
from flux2_train.errors import ConfigError
from flux2_train.memory import GIB, Placement, estimate_memory, plan_auto
from flux2_train.model import family_spec, load_transformer
from flux2_train.quantize import Float8Linear, quantize_base
from flux2_train.speed import compile_blocks
from tiny_run import tiny_config, tiny_trainer

# Deterministic runs: no dropout, so two runs differ only by the mode under test.
EXACT = dict(steps=4, save_every=0, lora_dropout=0.0, caption_dropout=0.0, validate_every=0)


def trained(demo_dataset, model_dir, tmp_path, name, **options):
    """The losses of a deterministic tiny run, and its Trainer."""
    cfg = tiny_config(demo_dataset, model_dir, tmp_path / name, tmp_path / "cache", **(EXACT | options))
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    trainer = tiny_trainer(cfg, model_dir, backbone=load_transformer(model_dir, dtype=dtype))
    return trainer.run().losses, trainer


def run_losses(demo_dataset, model_dir, tmp_path, name, **options):
    losses, trainer = trained(demo_dataset, model_dir, tmp_path, name, **options)
    return losses, trainer.backbone


def refused_run(demo_dataset, model_dir, tmp_path, **options):
    """A tiny run with `options`, for the ones refused before any work (in tmp_path/runs)."""
    cfg = tiny_config(demo_dataset, model_dir, tmp_path / "runs", tmp_path / "cache", **(EXACT | options))
    return tiny_trainer(cfg, model_dir).run()


def relative_gaps(a, b):
    return [abs(x - y) / abs(y) for x, y in zip(a, b)]


def test_fp8_linear_matches_its_dequantized_weight_forward_and_backward():
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 384).to(torch.bfloat16)
    fp8 = Float8Linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.shape == (384, 1) and fp8.fp8_matmul
    x = torch.randn(2, 40, 256, dtype=torch.bfloat16, requires_grad=True)
    reference = torch.nn.Linear(256, 384).to(torch.bfloat16)
    with torch.no_grad():  # the weights the fp8 layer holds, exactly
        reference.weight.copy_(fp8.dequantized(torch.bfloat16))
        reference.bias.copy_(linear.bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = fp8(x), reference(x)
    assert y.dtype == torch.bfloat16
    grad = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, grad)
    (gx_ref,) = torch.autograd.grad(y_ref, x, grad)
    # What is left is the input's (and the gradient's) rounding to e4m3: a few percent.
    assert (y - y_ref).float().norm() / y_ref.float().norm() < 0.05
    assert (gx - gx_ref).float().norm() / gx_ref.float().norm() < 0.05
    # A model-wide cast leaves the stored format alone.
    fp8.to(torch.bfloat16)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight_scale.dtype == torch.float32
    # The fallback (no fp8 matmul on the device) computes with the same weight, and keeps the
    # stored weight for its backward pass, not a compute-dtype copy of it.
    fp8.fp8_matmul = False
    saved = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y_dq = fp8(x)
    assert (y_dq - y_ref).float().norm() / y_ref.float().norm() < 0.01
    assert {t.dtype for t in saved} == {torch.float8_e4m3fn, torch.float32}
    (gx_dq,) = torch.autograd.grad(y_dq, x, grad)
    assert (gx_dq - gx_ref).float().norm() / gx_ref.float().norm() < 0.01


@pytest.mark.parametrize("fp8_matmul", [True, False])
def test_fp8_linear_output_takes_in_place_adds(fp8_matmul):
    """ComfyUI's blocks add residuals into a Linear's output in place."""
    from flux2_train import quantize

    torch.manual_seed(0)
    weight, scale = quantize._rowwise_fp8(torch.randn(48, 32))
    x = torch.randn(2, 40, 32, dtype=torch.bfloat16, requires_grad=True)
    y = quantize.fp8_linear(x, weight, scale, None, torch.bfloat16, fp8_matmul)
    y += 1.0
    (y.float() ** 2).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_fp8_linear_takes_an_input_without_rows():
    torch.manual_seed(0)
    layer = Float8Linear(torch.nn.Linear(32, 48).to(torch.bfloat16))
    x = torch.randn(2, 0, 32, dtype=torch.bfloat16, requires_grad=True)
    h = torch.randn(2, 0, 4, dtype=torch.bfloat16, requires_grad=True)
    lora_b = torch.randn(48, 4, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x, (h, lora_b, 0.5))
    assert y.shape == (2, 0, 48)
    y.sum().backward()
    assert x.grad.shape == x.shape and lora_b.grad.shape == lora_b.shape and not lora_b.grad.any()


def test_a_cpu_matmul_without_row_scales_makes_fp8_layers_dequantize(monkeypatch, caplog):
    """Some torch builds' CPU `_scaled_mm` takes one scale per tensor and asserts on row scales."""
    from flux2_train import quantize
    from flux2_train.model import DiffusersFlux2Backbone
    from flux2_train.tiny import tiny_transformer

    real = torch._scaled_mm

    def per_tensor_only(a, b, scale_a, scale_b, **kwargs):
        if scale_a.numel() > 1 or scale_b.numel() > 1:
            raise RuntimeError("Now _scaled_mm only supports per-tensor scaling for CPU backend.")
        return real(a, b, scale_a=scale_a, scale_b=scale_b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    quantize._cpu_matmul_takes_row_scales.cache_clear()
    try:
        backbone = DiffusersFlux2Backbone(tiny_transformer())
        backbone.quantize("fp8", torch.device("cpu"), torch.bfloat16)
        layers = [m for m in backbone.transformer.modules() if isinstance(m, Float8Linear)]
        assert layers and not any(m.fp8_matmul for m in layers)
        assert caplog.text.count("this torch build's fp8 matmul on cpu takes no row scales") == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.isfinite(layers[0](torch.randn(4, layers[0].in_features))).all()
    finally:
        quantize._cpu_matmul_takes_row_scales.cache_clear()


@pytest.mark.parametrize("fp8_matmul,device", [(True, "cpu"), (False, "cpu"),
                                               pytest.param(True, "cuda", marks=pytest.mark.gpu)])
def test_an_fp8_layers_adapter_adds_into_its_matmul_as_peft_adds_it(fp8_matmul, device):
    """The adapter's up-projection goes into the fp8 product in place (its own op, so compiled code
    keeps it in place): output and gradients as PEFT's forward gives them, eager and compiled."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from peft.tuners.lora import Linear as LoraLinear

    from flux2_train.lora import add_lora
    from flux2_train.lora_fp8 import add_adapters_into_fp8_matmuls

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    net = torch.nn.Sequential(Float8Linear(torch.nn.Linear(64, 96, bias=False), fp8_matmul=fp8_matmul))
    add_lora(net, ["0"], rank=4, alpha=8.0)
    net.to(device)
    layer = net[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()  # PEFT starts B at zero: the adapter would add nothing
    x = torch.randn(3, 48, 64, dtype=torch.bfloat16, device=device)
    grad = torch.randn(3, 48, 96, dtype=torch.bfloat16, device=device)
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]

    def run(model):
        xi = x.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.bfloat16):
            y = model(xi)
        return [y, *torch.autograd.grad(y, [xi, *params], grad)]

    peft = run(net)
    assert add_adapters_into_fp8_matmuls(net) == 1
    with Ops() as ops:
        ops.seen = set()
        fused = run(net)
    assert ("flux2_train.fp8_mm_add_lora" in ops.seen) == fp8_matmul
    compiled = run(torch.compile(net))
    for ours in (fused, compiled):
        for a, b in zip(ours, peft):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert (a.float() - b.float()).norm() / b.float().norm() < 1e-2
    layer.lora_dropout["default"] = torch.nn.Dropout(0.5)  # the same seed drops the same inputs
    outputs = []
    for forward in (LoraLinear.forward, type(layer).forward):
        torch.manual_seed(1)
        with torch.autocast(device, dtype=torch.bfloat16):
            outputs.append(forward(layer, x).float())
    assert (outputs[1] - outputs[0]).norm() / outputs[0].norm() < 1e-2
    layer.lora_dropout["default"] = torch.nn.Identity()
    layer.lora_B["default"].bias = torch.nn.Parameter(torch.ones(96, device=device))  # PEFT's `lora_bias`
    with Ops() as ops, torch.autocast(device, dtype=torch.bfloat16):
        ops.seen = set()
        assert torch.equal(net(x), LoraLinear.forward(layer, x))  # PEFT's forward, which adds the bias
    assert "flux2_train.fp8_mm_add_lora" not in ops.seen
    layer.lora_B["default"].bias = None
    layer.enable_adapters(False)  # PEFT's own forward again: the base layer alone
    with torch.autocast(device, dtype=torch.bfloat16):
        assert torch.equal(net(x), layer.base_layer(x))


@pytest.mark.slow
def test_fp8_adapters_compile_to_one_graph_per_block_kind_and_train_as_peft_does():
    """Compiled blocks run the adapters through the fp8 matmuls, and blocks of a kind share one graph
    (a per-layer forward would compile every block anew, and past the recompile limit run eager)."""
    from torch._dynamo.utils import counters

    from flux2_train.lora import add_lora, resolve_targets
    from flux2_train.lora_fp8 import Fp8AdapterLinear, add_adapters_into_fp8_matmuls
    from flux2_train.model import DiffusersFlux2Backbone
    from flux2_train.tiny import tiny_transformer

    backbone = DiffusersFlux2Backbone(tiny_transformer(num_single_layers=3))
    backbone.quantize("fp8", torch.device("cpu"), torch.bfloat16)
    add_lora(backbone.transformer, resolve_targets(backbone.transformer, "attention_mlp"), 4, 16.0)  # scale 4
    for m in backbone.transformer.modules():
        if hasattr(m, "lora_B"):
            torch.nn.init.normal_(m.lora_B["default"].weight, std=0.02)  # PEFT starts B at zero
    params = [p for p in backbone.transformer.parameters() if p.requires_grad]

    def step():
        g = torch.Generator().manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = backbone.predict(torch.randn(1, 128, 16, 16, generator=g), torch.tensor([0.5]),
                                   torch.randn(1, 32, 96, generator=g))
        return [out.float(), *torch.autograd.grad(out.float().square().mean(), params)]

    peft = step()
    routed = add_adapters_into_fp8_matmuls(backbone.transformer)
    assert routed == len(params) // 2 and all(type(m) is Fp8AdapterLinear for m in backbone.transformer.modules()
                                               if hasattr(m, "lora_B"))
    torch._dynamo.reset()
    counters.clear()
    backbone.compile_blocks()
    step()  # compiles
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        compiled = step()
    assert counters["stats"]["unique_graphs"] == 2  # one double-stream block, one single-stream block
    assert sum(e.count for e in prof.key_averages() if e.key == "flux2_train::fp8_mm_add_lora") == routed
    # Compiling PEFT's own forward moves these bf16 gradients of fp8 layers by about 5%; the adapter's
    # scale (4) left out of its gradients moves them by 95%.
    assert max((ours - theirs).norm() / theirs.norm() for ours, theirs in zip(compiled, peft)) < 0.15


def test_eager_quantization_in_slices_of_rows_gives_the_whole_tensors_values(monkeypatch):
    from flux2_train import quantize

    torch.manual_seed(0)
    x = torch.randn(80, 32, dtype=torch.bfloat16) * torch.linspace(0.1, 10, 80, dtype=torch.bfloat16)[:, None]
    column_scale = torch.rand(1, 32) + 0.5
    whole = [quantize._rowwise_fp8(x), quantize._rowwise_fp8(x, column_scale)]
    monkeypatch.setattr(quantize, "_ROWS_AT_ONCE", 16)  # 80 rows: five slices
    sliced = [quantize._rowwise_fp8(x), quantize._rowwise_fp8(x, column_scale)]
    for (values, scales), (values_sliced, scales_sliced) in zip(whole, sliced):
        assert torch.equal(values.view(torch.uint8), values_sliced.view(torch.uint8))
        assert torch.equal(scales, scales_sliced)
    monkeypatch.setattr(quantize, "_ROWS_AT_ONCE", 1024)
    values, scales = quantize._rowwise_fp8(x.t())  # a transposed view, whole: row-major for cuBLASLt
    assert values.is_contiguous() and scales.shape == (32, 1)


def test_quantize_converts_the_block_linears_one_by_one(tiny_pipeline_dir):
    backbone = load_transformer(tiny_pipeline_dir, dtype=torch.bfloat16)
    before = sum(p.numel() * p.element_size() for p in backbone.module.parameters())
    backbone.quantize("fp8", torch.device("cpu"), torch.bfloat16)
    backbone.prepare(torch.device("cpu"), torch.bfloat16)
    blocks = [m for b in backbone.blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    assert blocks and all(isinstance(m, Float8Linear) for m in blocks)
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32 for m in blocks)
    assert not isinstance(backbone.module.x_embedder, Float8Linear)  # outside the blocks: kept as it was
    after = sum(p.numel() * p.element_size() for p in backbone.module.parameters())
    assert after < 0.7 * before
    with pytest.raises(ConfigError, match="unknown --quantize-base"):
        quantize_base(backbone.blocks[0], "fp4", torch.device("cpu"), torch.bfloat16)


@pytest.mark.parametrize("fmt,tolerance", [("fp8", 0.05), ("int8", 0.03), ("nf4", 0.12)])
def test_quantized_base_trains_with_the_plain_runs_losses(demo_dataset, tiny_pipeline_dir, tmp_path, fmt, tolerance):
    if fmt != "fp8":
        pytest.importorskip("bitsandbytes")
    plain, _ = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "plain", dtype="bfloat16")
    losses, backbone = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, fmt, dtype="bfloat16",
                                  quantize_base=fmt)
    assert all(math.isfinite(x) for x in losses)
    assert max(relative_gaps(losses, plain)) < tolerance, (losses, plain)
    lora = {n: p for n, p in backbone.module.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert any(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # it learned


def test_checkpointing_some_or_all_blocks_gives_the_same_losses(demo_dataset, tiny_pipeline_dir, tmp_path):
    plain, _ = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "plain")
    some, backbone = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "some", gradient_checkpointing=True,
                                checkpoint_blocks=1)
    wrapped = [b for b in backbone.blocks if "forward" in b.__dict__]
    assert len(wrapped) == 1 and wrapped[0] is backbone.blocks[0]
    every, backbone = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "all", gradient_checkpointing=True)
    assert all("forward" in b.__dict__ for b in backbone.blocks)
    assert max(relative_gaps(some, plain)) < 1e-5 and max(relative_gaps(every, plain)) < 1e-5


@pytest.mark.slow
def test_compiled_blocks_give_the_eager_losses(demo_dataset, tiny_pipeline_dir, tmp_path):
    eager, _ = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "eager", steps=3)
    compiled, backbone = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "compiled", steps=3, compile=True,
                                    gradient_checkpointing=True, checkpoint_blocks=2)
    checkpointed, rest = backbone.blocks[:2], backbone.blocks[2:]
    # Checkpointed blocks run compiled code inside the checkpoint; the others are compiled whole.
    assert all(hasattr(b.forward.args[0], "_torchdynamo_orig_callable") for b in checkpointed)
    assert rest and all(getattr(b, "_compiled_call_impl", None) is not None for b in rest)
    assert max(relative_gaps(compiled, eager)) < 1e-3, (compiled, eager)


def test_speed_options_are_checked_before_any_work(demo_dataset, tiny_pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match="fp8 computes in bfloat16"):
        tiny_config(demo_dataset, tiny_pipeline_dir, tmp_path, tmp_path / "c", quantize_base="fp8",
                    dtype="float32").validate()
    with pytest.raises(ConfigError, match="--attention"):
        tiny_config(demo_dataset, tiny_pipeline_dir, tmp_path, tmp_path / "c", attention="fast").validate()
    with pytest.raises(ConfigError, match="--checkpoint-blocks"):
        tiny_config(demo_dataset, tiny_pipeline_dir, tmp_path, tmp_path / "c", checkpoint_blocks=-1).validate()


def test_estimate_counts_quantized_weights_and_partial_checkpointing():
    spec = family_spec("dev")
    base = dict(resolution=1024, rank=16, gradient_checkpointing=True)
    bf16 = estimate_memory(spec, resolve_config(overrides=base))
    fp8 = estimate_memory(spec, resolve_config(overrides=base | dict(quantize_base="fp8")))
    nf4 = estimate_memory(spec, resolve_config(overrides=base | dict(quantize_base="nf4")))
    assert fp8.parts["frozen weights"] == pytest.approx(bf16.parts["frozen weights"] / 2, rel=0.01)
    assert nf4.parts["frozen weights"] < 18 * GIB and nf4.total < fp8.total < bf16.total
    klein = estimate_memory(family_spec("klein-4b"), resolve_config(overrides=base | dict(quantize_base="fp8")))
    assert klein.total < 8 * GIB
    half = estimate_memory(spec, resolve_config(overrides=base | dict(checkpoint_blocks=28)))
    none = estimate_memory(spec, resolve_config(overrides=base | dict(gradient_checkpointing=False)))
    assert bf16.total < half.total < none.total
    assert half.settings["checkpointing"] == "28 of 56 blocks"


def test_auto_checkpoints_only_as_many_blocks_as_memory_needs():
    spec = family_spec("klein-9b")
    cfg = resolve_config(overrides=dict(resolution=1024, rank=16), quick_preset="auto")
    everything = estimate_memory(spec, cfg)
    plan = plan_auto(spec, cfg, Placement(), available=int(everything.total * 0.8))
    assert plan.cfg.gradient_checkpointing and 0 < plan.cfg.checkpoint_blocks < 32
    assert "blocks" in plan.reason
    assert plan.estimate.total <= 0.9 * everything.total * 0.8


def saved_for_backward_bytes(backbone) -> int:
    """Bytes autograd keeps from one forward pass of the backbone (a fixed random input)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    g = torch.Generator().manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = backbone.predict(torch.randn(1, 128, 16, 16, generator=g), torch.tensor([0.5]),
                               torch.randn(1, 32, 96, generator=g))
    out.square().mean().backward()
    return total


@pytest.mark.slow
@pytest.mark.inductor
def test_compiled_checkpointed_blocks_keep_only_their_inputs(tiny_pipeline_dir):
    def saved(compile, checkpoint):
        backbone = load_transformer(tiny_pipeline_dir, dtype=torch.float32)
        backbone.add_lora(["transformer_blocks.0.attn.to_q"], 4, 4.0, 0.0, 0)
        if checkpoint:
            backbone.enable_gradient_checkpointing()
        if compile:
            compile_blocks(backbone.blocks)
        saved_for_backward_bytes(backbone)  # the first call compiles
        return saved_for_backward_bytes(backbone)

    eager_checkpointed = saved(False, True)
    assert saved(True, True) == eager_checkpointed < saved(True, False) < saved(False, False)


def test_the_steps_attention_choice_wins_over_a_models_own_sdpa_context():
    """ComfyUI's attention opens its own SDPA context per call; the kernels the run chose still apply,
    so a checkpoint's recomputation runs the kernel its forward pass ran."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flux2_train.speed import attention_kernels, pinned_attention

    comfy_order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                   SDPBackend.MATH]

    def enabled():
        cuda = torch.backends.cuda
        return dict(flash=cuda.flash_sdp_enabled(), cudnn=cuda.cudnn_sdp_enabled(),
                    efficient=cuda.mem_efficient_sdp_enabled(), math=cuda.math_sdp_enabled())

    with attention_kernels("efficient", torch.device("cuda")), sdpa_kernel(comfy_order, set_priority=True):
        with pinned_attention():
            assert enabled() == dict(flash=False, cudnn=False, efficient=True, math=False)
    with sdpa_kernel(comfy_order, set_priority=True), pinned_attention():  # outside a step: never cuDNN
        assert not enabled()["cudnn"] and enabled()["flash"]


def test_offloaded_blocks_give_the_same_losses_and_take_turns_in_two_slots(demo_dataset, tiny_pipeline_dir,
                                                                           tmp_path):
    validated = dict(gradient_checkpointing=True, validate_every=2, validation_split=0.2)
    checkpointed, plain = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "ckpt", **validated)
    offloaded, backbone = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "offload", offload_blocks=3,
                                     **validated)
    # The same arithmetic on the same weights (validation passes included): only where they are kept differs.
    assert offloaded == checkpointed

    _, backbone = run_losses(demo_dataset, tiny_pipeline_dir, tmp_path, "order", steps=1, offload_blocks=3,
                             gradient_checkpointing=True)
    # All three blocks are offloaded and take turns in the two GPU slots. A block out of its slot
    # holds empty stand-ins, so running it out of turn fails instead of computing on stale weights.
    # The backward pass runs the blocks last to first, prefetching the one before: it ends with
    # the first two loaded (the next forward pass starts on them) and the last one released.
    frozen = {i: [p for p in b.parameters() if not p.requires_grad] for i, b in enumerate(backbone.blocks)}
    loaded = [i for i, ps in frozen.items() if all(p.numel() > 0 for p in ps)]
    released = [i for i, ps in frozen.items() if all(p.numel() == 0 for p in ps)]
    assert loaded == [0, 1] and released == [2]
    assert len({p.untyped_storage().data_ptr() for i in loaded for p in frozen[i]}) == 2
    lora = [p for b in backbone.blocks for n, p in b.named_parameters() if "lora_" in n]
    assert lora and all(p.untyped_storage().nbytes() == p.numel() * 4 for p in lora)  # trained in place


def test_offload_needs_checkpointed_blocks_and_plain_or_fp8_weights(demo_dataset, tiny_pipeline_dir, tmp_path):
    run = functools.partial(refused_run, demo_dataset, tiny_pipeline_dir, tmp_path)

    with pytest.raises(ConfigError, match="only checkpointed blocks can be offloaded"):
        run(offload_blocks=1)
    with pytest.raises(ConfigError, match="only checkpointed blocks can be offloaded, and this run checkpoints 1"):
        run(offload_blocks=2, gradient_checkpointing=True, checkpoint_blocks=1)
    with pytest.raises(ConfigError, match="streams plain and fp8 weights"):
        run(offload_blocks=1, gradient_checkpointing=True, quantize_base="nf4", dtype="bfloat16")
    with pytest.raises(ConfigError, match="this model has 3 blocks"):
        run(offload_blocks=4, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="--offload-blocks must be 0"):
        tiny_config(demo_dataset, tiny_pipeline_dir, tmp_path, tmp_path / "c", offload_blocks=-1).validate()
    assert not list((tmp_path / "runs").glob("*"))  # refused before a run folder exists


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_offloaded_activations_give_the_same_losses(demo_dataset, tiny_pipeline_dir, tmp_path, tiny_activations_move,
                                                    compile):
    """Saved tensors leave for CPU memory and come back as the same views: compiled code checks their strides."""
    # Two micro-batches a step and validation passes (no gradients) between steps.
    passes = dict(steps=3, compile=compile, gradient_accumulation=2, validate_every=2, validation_split=0.2)
    kept, _ = trained(demo_dataset, tiny_pipeline_dir, tmp_path, "kept", **passes)
    moved, trainer = trained(demo_dataset, tiny_pipeline_dir, tmp_path, "moved", offload_activations=2, **passes)
    assert moved == kept
    # Block 2, the last, runs its backward pass first: blocks 0 and 1 are the ones.
    offload = trainer.activation_offload
    assert [b.forward.args[:2] for b in trainer.backbone.blocks[:2]] == [(offload, 0), (offload, 1)]
    assert "forward" not in trainer.backbone.blocks[2].__dict__
    assert offload.offloaded_bytes > 0 and not offload._stored  # nothing held once the run is over
    wrapped = trainer.backbone.blocks[1].forward
    if compile:
        assert hasattr(wrapped.args[-1], "_torchdynamo_orig_callable")  # the hooks stay outside the compiled code


def test_checkpointed_blocks_and_offloaded_activations_together_give_the_same_losses(demo_dataset, tiny_pipeline_dir,
                                                                                       tmp_path, tiny_activations_move):
    """One model, some blocks recomputed and others' activations in CPU memory: five blocks, so that after
    the checkpointed one and the last, two offloaded blocks' memory moves."""
    from flux2_train.model import DiffusersFlux2Backbone
    from flux2_train.speed import is_checkpointed
    from flux2_train.tiny import tiny_transformer

    runs = {}
    for name, count in (("kept", 0), ("moved", 3)):
        cfg = tiny_config(demo_dataset, tiny_pipeline_dir, tmp_path / name, tmp_path / "cache", **(EXACT | dict(
            steps=3, gradient_checkpointing=True, checkpoint_blocks=1, offload_activations=count)))
        backbone = DiffusersFlux2Backbone(tiny_transformer(num_single_layers=4))
        trainer = tiny_trainer(cfg, tiny_pipeline_dir, backbone=backbone)
        runs[name] = trainer.run().losses, trainer
    (kept, _), (moved, trainer) = runs["kept"], runs["moved"]
    assert moved == kept
    assert [i for i, b in enumerate(trainer.backbone.blocks) if is_checkpointed(b)] == [0]
    assert trainer.activation_offload.offloaded_bytes > 0


def test_activation_offload_keeps_weights_and_small_tensors_and_frees_the_rest():
    from flux2_train.offload import ActivationOffload

    weight = torch.nn.Parameter(torch.randn(512, 512), requires_grad=False)
    lora = torch.nn.Parameter(torch.zeros(512, 512))
    offload = ActivationOffload(torch.device("cpu"), resident=[weight, lora], in_flight=1)
    x = torch.randn(1024, 512, requires_grad=True)

    def block(x):
        h = (x @ weight.t() + x @ lora.t()).relu()  # saves x (2 MiB), h (2 MiB), the weight and the LoRA's view
        wide = torch.cat([h, h], dim=1)
        return wide[:, :512] * wide[:, 512:] + x[:4].square().sum()  # views of one storage; a small tensor

    with offload.saving(0):
        y0 = block(x)
    first = offload._stored[0]
    assert offload.offloaded_bytes == sum(s.home.numel() for s in first.values()) == 8 * 2**20
    assert all(s.gpu is not None for s in first.values())  # held until the next block starts
    with offload.saving(1):
        y1 = block(y0)
    assert all(s.gpu is None for s in first.values())  # let go: only in CPU memory now
    y1.sum().backward()
    x2 = x.detach().requires_grad_()
    lora2 = lora.detach().clone().requires_grad_()

    def reference(x):
        h = (x @ weight.t() + x @ lora2.t()).relu()
        return h * h + x[:4].square().sum()

    reference(reference(x2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(lora.grad, lora2.grad)
    assert all(s.gpu is None and s.uses == 0 for b in (0, 1) for s in offload._stored[b].values())


def test_the_last_offloaded_blocks_keep_their_memory_and_copy_nothing_out():
    """Their backward pass comes first, before their memory would be let go."""
    from flux2_train.offload import ActivationOffload

    offload = ActivationOffload(torch.device("cpu"), blocks=[0, 1, 2], in_flight=2)
    x = torch.randn(1024, 512, requires_grad=True)
    y = x
    for i in range(3):
        with offload.saving(i):
            y = (y * 1.5).sigmoid()  # saves its output: 2 MiB
    assert offload.offloaded_bytes == 2 * 2**20  # block 0 only
    assert [s.home is None for b in range(3) for s in offload._stored[b].values()] == [False, True, True]
    y.sum().backward()
    reference = x.detach().requires_grad_()
    z = reference
    for _ in range(3):
        z = (z * 1.5).sigmoid()
    z.sum().backward()
    torch.testing.assert_close(x.grad, reference.grad)
    offload.release()
    assert not offload._stored


def test_offload_buffers_are_taken_again_by_the_smallest_request_they_hold():
    """A step takes the buffers of the step before; a smaller bucket's step, a larger one's (no new
    memory). Each buffer starts a page of its own (CUDA registers whole pages; tests/test_gpu.py)."""
    from flux2_train.offload import _PAGE, PinnedBuffers

    pool = PinnedBuffers(pin=False)
    big, small = pool.take(3 * _PAGE + 1), pool.take(_PAGE)
    assert big.numel() == 3 * _PAGE + 1 and big.data_ptr() % _PAGE == 0 == small.data_ptr() % _PAGE
    assert pool.nbytes == 5 * _PAGE
    for buffer in (big, small):
        pool.give_back(buffer)
    assert pool.take(_PAGE).data_ptr() == small.data_ptr()  # the same size again
    assert pool.take(2 * _PAGE).data_ptr() == big.data_ptr()  # the smallest that holds it
    assert pool.take(1).data_ptr() not in (big.data_ptr(), small.data_ptr()) and pool.nbytes == 6 * _PAGE
    pool.release()
    assert pool.nbytes == 0


def test_activation_offload_is_checked_before_any_work(demo_dataset, tiny_pipeline_dir, tmp_path):
    run = functools.partial(refused_run, demo_dataset, tiny_pipeline_dir, tmp_path)

    with pytest.raises(ConfigError, match="can offload those of 2 \\(not the last one\\)"):
        run(offload_activations=3)
    with pytest.raises(ConfigError, match="nor the checkpointed ones"):
        run(offload_activations=2, gradient_checkpointing=True, checkpoint_blocks=1)
    with pytest.raises(ConfigError, match="--offload-activations must be 0"):
        tiny_config(demo_dataset, tiny_pipeline_dir, tmp_path, tmp_path / "c", offload_activations=-1).validate()
    assert not list((tmp_path / "runs").glob("*"))


def test_estimate_counts_offloaded_activations_as_the_blocks_in_flight():
    spec = family_spec("dev")
    ckpt26 = resolve_config(overrides=dict(resolution=1024, gradient_checkpointing=True, checkpoint_blocks=26,
                                           quantize_base="fp8", compile=True))
    kept = estimate_memory(spec, resolve_config(overrides=dict(ckpt26.__dict__, checkpoint_blocks=10)))
    moved = estimate_memory(spec, resolve_config(overrides=dict(ckpt26.__dict__, checkpoint_blocks=10,
                                                                offload_activations=16)))
    per_block = (kept.parts["activations + grads"] - estimate_memory(spec, ckpt26).parts["activations + grads"]) / 16
    # 16 blocks keep nothing on the GPU but the two in flight (a checkpointed block keeps its input).
    saved = kept.parts["activations + grads"] - moved.parts["activations + grads"]
    assert saved == pytest.approx(14 * per_block, rel=0.1)
    assert "16 blocks'" in moved.settings["activations offloaded"] and "pinned CPU memory" in moved.summary()


def test_offloaded_activations_spread_over_the_kept_blocks_but_the_last():
    from flux2_train.offload import activation_offload_indices

    def picked(count, checkpointed):
        cfg = resolve_config(overrides=dict(gradient_checkpointing=bool(checkpointed), checkpoint_blocks=checkpointed,
                                            offload_activations=count))
        return activation_offload_indices(56, cfg)

    assert picked(0, 10) == [] and picked(3, 0) == [0, 19, 37]
    got = picked(16, 10)
    assert len(got) == 16 and got[0] == 10 and got[-1] < 55 and {b - a for a, b in zip(got, got[1:])} <= {2, 3}
    assert picked(45, 10) == list(range(10, 55))


def test_spread_keeps_the_last_block_and_even_gaps():
    from flux2_train.offload import spread

    assert spread(0, 56) == [] and spread(3, 3) == [0, 1, 2] and spread(5, 3) == [0, 1, 2]
    assert spread(2, 4) == [1, 3] and spread(1, 56) == [55]
    picked = spread(28, 56)
    assert len(picked) == 28 and picked[-1] == 55 and {b - a for a, b in zip(picked, picked[1:])} == {2}


def test_compile_without_triton_on_a_gpu_trains_eager_and_says_why(demo_dataset, tiny_pipeline_dir, tmp_path,
                                                                     monkeypatch, caplog):
    """Without Triton, Inductor cannot build CUDA kernels and the first step would fail."""
    import torch.utils._triton

    from flux2_train import speed, train
    from flux2_train.events import EventBus, StatusEvent

    monkeypatch.setattr(torch.utils._triton, "has_triton_package", lambda: False)
    why = speed.compile_unavailable(torch.device("cuda"))
    assert why.startswith("torch.compile builds its GPU kernels with Triton, which is not installed")
    assert speed.compile_unavailable(torch.device("cpu")) is None  # the CPU's kernels are C++
    # The run on a machine where that is so (this CPU stands in for the GPU): eager, with the reason.
    monkeypatch.setattr(train, "compile_unavailable", lambda device: why)
    cfg = tiny_config(demo_dataset, tiny_pipeline_dir, tmp_path / "run", tmp_path / "cache", **(EXACT | dict(compile=True)))
    events = []
    trainer = tiny_trainer(cfg, tiny_pipeline_dir, events=EventBus([events.append]))
    result = trainer.run()
    assert len(result.losses) == cfg.steps and all(b._compiled_call_impl is None for b in trainer.backbone.blocks)
    assert f"compile is off for this run: {why}" in caplog.text
    assert any(isinstance(e, StatusEvent) and e.message == f"compile is off for this run: {why}" for e in events)
