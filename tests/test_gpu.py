"""The same loop on a CUDA GPU: bf16 and fp16 mixed precision on the tiny model, with the validation loss and
previews, and a real CUDA out-of-memory error (skipped without a GPU)."""

from __future__ import annotations

import math

import pytest
import torch

from flux2_train.config import resolve_config
from flux2_train.encoders import load_pipeline_encoders
from flux2_train.events import EventBus
from flux2_train.model import load_transformer
from flux2_train.train import Trainer


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_tiny_model_trains_on_the_gpu_with_mixed_precision(dtype, demo_dataset, tiny_pipeline_dir, tmp_path):
    weight_dtype = getattr(torch, dtype)
    cfg = resolve_config(overrides=dict(
        dataset=str(demo_dataset), model=str(tiny_pipeline_dir), output_dir=str(tmp_path), name="gpu",
        trigger_word="r0b0t", resolution=64, max_upscale=4.0, max_sequence_length=32, steps=6, rank=4,
        dtype=dtype, device="cuda", save_every=3, tensorboard=False, gradient_checkpointing=True,
        validate_every=3, preview_every=3, preview_resolution=64, preview_steps=2))
    backbone = load_transformer(tiny_pipeline_dir, dtype=weight_dtype)
    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cuda", dtype=torch.float32)
    result = Trainer(cfg, backbone, encoder=encoder, free_encoder=encoder.free).run()
    assert all(math.isfinite(x) for x in result.losses)
    assert result.peak_memory_bytes > 0 and result.lora_path.is_file()
    # The validation loss and previews under the same mixed precision, with checkpointing on.
    assert [s for s, _ in result.validation] == [0, 3, 6] and all(math.isfinite(v) for _, v in result.validation)
    assert len(list((result.run_dir / "previews").glob("*.png"))) == 3 * len(result.preview_images) == 3
    assert all(torch.isfinite(img).all() for img in result.preview_images)


@pytest.mark.gpu
@pytest.mark.failure_case("out of memory mid-run")
def test_a_real_cuda_out_of_memory_mid_run_keeps_the_checkpoint_and_resumes(demo_dataset, tiny_pipeline_dir,
                                                                          tmp_path):
    from flux2_train import checkpoint as ckpt
    from flux2_train.errors import OutOfMemory

    def run(out, hooks=(), resume=None):
        cfg = resolve_config(overrides=dict(
            dataset=str(demo_dataset), model=str(tiny_pipeline_dir), output_dir=str(out), name="oom",
            trigger_word="r0b0t", resolution=64, max_upscale=4.0, max_sequence_length=32, steps=5, rank=4,
            dtype="float32", device="cuda", save_every=2, tensorboard=False, memory_check=False, lora_dropout=0.0))
        trainer = Trainer(cfg, load_transformer(tiny_pipeline_dir, dtype=torch.float32), resume=resume,
                          encoder=load_pipeline_encoders(tiny_pipeline_dir, device="cuda", dtype=torch.float32))
        trainer.step_hooks.extend(hooks)
        return trainer.run()

    def squeeze(step, trainer):  # from step 3 on the process may not grow: CUDA's own out-of-memory error
        if step == 2:
            torch.cuda.set_per_process_memory_fraction(1e-6)
            torch.cuda.empty_cache()

    try:
        with pytest.raises(OutOfMemory) as err:
            run(tmp_path / "a", hooks=[squeeze])
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert "out of GPU memory" in str(err.value) and "checkpoint is intact" in str(err.value)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "a" / "oom")] == ["step-000002"]

    resumed = run(tmp_path / "a", resume=tmp_path / "a" / "oom")
    full = run(tmp_path / "b")
    assert resumed.losses == pytest.approx(full.losses, rel=1e-4)


GPU_MODES = {
    "fp8": (dict(quantize_base="fp8"), 0.05),
    "int8": (dict(quantize_base="int8"), 0.03),
    "nf4": (dict(quantize_base="nf4"), 0.12),
    "compile": (dict(compile=True), 0.02),
    "checkpoint some blocks": (dict(gradient_checkpointing=True, checkpoint_blocks=1), 0.02),
    "flash attention": (dict(attention="flash"), 0.02),
    "cudnn attention": (dict(attention="cudnn"), 0.02),
    "efficient attention": (dict(attention="efficient"), 0.02),
    "fa4 attention": (dict(attention="fa4"), 0.02),
    "fp8 + compile + checkpointing": (dict(quantize_base="fp8", compile=True, gradient_checkpointing=True), 0.05),
    "offload every block": (dict(gradient_checkpointing=True, offload_blocks=3), 0.02),
    "fp8 + compile + offload": (dict(quantize_base="fp8", compile=True, gradient_checkpointing=True,
                                     offload_blocks=3), 0.05),
    "offloaded activations": (dict(offload_activations=2), 0.02),
    # The tiny model's three blocks leave no room for checkpointed blocks beside moved ones (tests/test_speed.py
    # trains that mix on five blocks): block 0's memory moves here.
    "fp8 + compile + offloaded activations": (dict(quantize_base="fp8", compile=True, offload_activations=2), 0.05),
}


def count_flash_attention_4_calls(monkeypatch) -> list:
    """Skips where FlashAttention 4 cannot run; else a list that grows by one per FlashAttention 4 forward."""
    pytest.importorskip("flash_attn.cute", reason="flash-attn-4 is not installed")
    if torch.cuda.get_device_capability()[0] not in (9, 10):
        pytest.skip("FlashAttention 4 runs on Hopper and data-center Blackwell GPUs")
    from flux2_train import speed

    calls = []
    forward = speed._flash_attn_fwd
    monkeypatch.setattr(speed, "_flash_attn_fwd", lambda *a, **k: calls.append(1) or forward(*a, **k))
    return calls


def sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def speed_attention(name: str):
    from flux2_train.speed import attention_implementation

    return attention_implementation(name, torch.device("cuda"))


@pytest.mark.gpu
def test_flash_attention_4_serves_sdpa_for_a_run_and_flash_attention_2_after_it_even_a_failed_one(
        monkeypatch, demo_dataset, tiny_pipeline_dir, tmp_path):
    """ComfyUI samples in the process that trained: FlashAttention 4 must not outlive the run."""
    calls = count_flash_attention_4_calls(monkeypatch)
    q, k, v = (torch.randn(1, 2, 256, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    before = sdpa_flash(q, k, v)
    with speed_attention("fa4"):
        during = sdpa_flash(q, k, v)
    assert len(calls) == 1
    torch.testing.assert_close(during, before, atol=2e-3, rtol=0)  # another kernel, the same attention
    sdpa_flash(q, k, v)
    assert len(calls) == 1

    def fail(step, trainer):
        if step == 2:
            raise RuntimeError("a failure mid-run")

    trainer = bf16_trainer(demo_dataset, tiny_pipeline_dir, tmp_path, attention="fa4")
    trainer.step_hooks.append(fail)
    with pytest.raises(RuntimeError, match="a failure mid-run"):
        trainer.run()
    ran = len(calls)
    assert ran > 1
    sdpa_flash(q, k, v)
    assert len(calls) == ran


@pytest.mark.gpu
def test_between_its_reports_a_run_makes_no_blocking_copy_or_stream_sync(demo_dataset, tiny_pipeline_dir, tmp_path):
    """Such a wait (a CPU tensor copied in, an `.item()`) drains the GPU's queue, and the GPU then idles
    while the host queues the next kernels. CUDA's sync check raises on one from the first reported
    step to the last. (It does not see `torch.cuda.synchronize()` or event waits; the late loss read
    waits on an event.)"""
    from flux2_train.events import StepEvent

    reported = []

    def strict_between_reports(ev):
        if isinstance(ev, StepEvent):
            reported.append(ev.step)
            torch.cuda.set_sync_debug_mode("error" if ev.step < ev.total else "default")

    try:
        bf16_losses(demo_dataset, tiny_pipeline_dir, tmp_path, EventBus([strict_between_reports]), steps=6)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reported == [1, 2, 3, 4, 5, 6]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(GPU_MODES))
def test_each_speed_and_memory_mode_tracks_the_bf16_losses_on_the_gpu(mode, demo_dataset, tiny_pipeline_dir,
                                                                      tmp_path, tiny_activations_move, monkeypatch):
    """bf16 on the GPU is not bit-reproducible across kernels: a mode's losses stay within its tolerance.

    16 image and 48 text tokens: a sequence length cuDNN's attention handles (a multiple of 64).
    """
    options, tolerance = GPU_MODES[mode]
    if options.get("quantize_base") in ("int8", "nf4"):
        pytest.importorskip("bitsandbytes")
    fa4_calls = count_flash_attention_4_calls(monkeypatch) if options.get("attention") == "fa4" else None

    def losses(name, **extra):
        return bf16_losses(demo_dataset, tiny_pipeline_dir, tmp_path / name, **extra)

    plain, moded = losses("plain"), losses("mode", **options)
    assert all(math.isfinite(x) for x in moded)
    assert fa4_calls is None or fa4_calls  # the run's attention was FlashAttention 4's
    gaps = [abs(a - b) / abs(b) for a, b in zip(moded, plain)]
    assert max(gaps) < tolerance, (mode, moded, plain)


def bf16_losses(dataset, model, out, events: EventBus | None = None, **options) -> list[float]:
    """bf16 steps of the tiny model on the GPU (16 image and 48 text tokens): five unless `steps` is given."""
    return bf16_trainer(dataset, model, out, events, **options).run().losses


def bf16_trainer(dataset, model, out, events: EventBus | None = None, **options) -> Trainer:
    """The Trainer of `bf16_losses`."""
    cfg = resolve_config(overrides=dict(
        dataset=str(dataset), model=str(model), output_dir=str(out), name="run", cache_dir=str(out / "cache"),
        trigger_word="r0b0t", resolution=64, max_upscale=4.0, max_sequence_length=48, steps=5, rank=4,
        learning_rate=1e-3, dtype="bfloat16", device="cuda", save_every=0, tensorboard=False, validate_every=0,
        lora_dropout=0.0, caption_dropout=0.0) | options)
    backbone = load_transformer(model, dtype=torch.bfloat16)
    encoder = load_pipeline_encoders(model, device="cuda", dtype=torch.float32)
    return Trainer(cfg, backbone, encoder=encoder, free_encoder=encoder.free, events=events)


@pytest.mark.gpu
def test_a_block_waits_for_its_weights_when_the_copies_are_slow(monkeypatch, demo_dataset, tiny_pipeline_dir,
                                                                 tmp_path):
    """Each copy starts late on the side stream; a block that ran before its copy landed would
    compute on the slot's previous block and change the losses."""
    from flux2_train.offload import BlockOffload

    load = BlockOffload._load

    def late_load(self, index, keep):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(50_000_000)  # tens of milliseconds of the side stream
        return load(self, index, keep)

    validated = dict(gradient_checkpointing=True, validate_every=2, validation_split=0.2)  # no-grad passes too
    checkpointed = bf16_losses(demo_dataset, tiny_pipeline_dir, tmp_path / "a", **validated)
    monkeypatch.setattr(BlockOffload, "_load", late_load)
    offloaded = bf16_losses(demo_dataset, tiny_pipeline_dir, tmp_path / "b", offload_blocks=3, **validated)
    assert offloaded == pytest.approx(checkpointed, rel=2e-3)


@pytest.mark.gpu
def test_offloaded_activations_wait_for_their_copies_when_the_bus_is_slow(monkeypatch, demo_dataset, tiny_pipeline_dir,
                                                                          tmp_path, tiny_activations_move):
    """Every copy, out and back, starts late on the side stream: memory reused before its copy out
    was done, or read before its copy back was, would change the losses."""
    from flux2_train import offload

    kept = bf16_losses(demo_dataset, tiny_pipeline_dir, tmp_path / "a")
    for name in ("_pack", "_bring_back"):  # both copies of block 0 start late
        def late(self, *args, _real=getattr(offload.ActivationOffload, name), **kwargs):
            with torch.cuda.stream(self.stream):
                torch.cuda._sleep(20_000_000)  # about ten milliseconds of the side stream
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(offload.ActivationOffload, name, late)
    moved = bf16_losses(demo_dataset, tiny_pipeline_dir, tmp_path / "b", offload_activations=2)
    assert moved == pytest.approx(kept, rel=2e-3)


@pytest.mark.gpu
def test_offloaded_activations_are_pinned_at_their_own_size_and_reused_by_the_next_step(
        demo_dataset, tiny_pipeline_dir, tmp_path, tiny_activations_move):
    """PyTorch's pinned allocator would round each buffer up to a power of two; these are registered
    with CUDA at their own size (to a page), and each step takes the buffers the step before gave back."""
    import time

    from flux2_train.offload import _PAGE

    steps = 4
    trainer = bf16_trainer(demo_dataset, tiny_pipeline_dir, tmp_path, steps=steps, offload_activations=2)
    seen = []

    def copies_queue(buffers) -> bool:
        """Whether copies into `buffers` queue behind the GPU's work and let the host go on: pinned
        memory (PyTorch's is_pinned() knows only its own allocator's), where pageable memory waits."""
        torch.cuda._sleep(400_000_000)  # about 0.2 s
        started = time.perf_counter()
        for buffer in buffers:
            buffer.copy_(torch.zeros(buffer.numel(), dtype=torch.uint8, device="cuda"), non_blocking=True)
        went_on = time.perf_counter() - started < 0.05
        torch.cuda.synchronize()
        return went_on

    def look(step, t):
        offload = t.activation_offload
        homes = [s.home for group in offload._stored.values() for s in group.values() if s.home is not None]
        # At the last step the last backward pass has read them; a pageable buffer shows the check tells.
        pinned = step == steps and copies_queue(homes) and not copies_queue([torch.empty(_PAGE, dtype=torch.uint8)])
        seen.append((offload._pinned.nbytes, offload.offloaded_bytes, homes, pinned))

    trainer.step_hooks.append(look)
    trainer.run()
    held, offloaded, homes, pinned = seen[-1]
    assert homes and pinned
    assert offloaded <= held <= offloaded + len(homes) * _PAGE  # one pass's buffers, each to a page
    assert [s[0] for s in seen] == [held] * len(seen)  # no step pinned more
    assert {h.data_ptr() for h in seen[0][2]} == {h.data_ptr() for h in homes}  # the same buffers again
    assert trainer.activation_offload._pinned.nbytes == 0  # unregistered at the end of the run


@pytest.mark.gpu
def test_comfyuis_model_compiles_and_multiplies_its_fp8_weights_in_fp8_on_the_gpu(tmp_path):
    """The training node's path on ComfyUI's own FLUX.2 class, fully on the GPU (a regular ModelPatcher):
    bf16 weights and fp8 ones (the loader's fp8_e4m3fn, an fp8 "mixed" file) train with compiled blocks,
    fp8 multiplying in fp8, and the losses track the eager bf16 run's. Each run is a process of its own
    (`bench/comfy_train_speed.py`), as ComfyUI picks its device when it is imported."""
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from comfyui_harness import SKIP_REASON, locate_comfyui

    comfyui = locate_comfyui()
    if comfyui is None:
        pytest.skip(SKIP_REASON)
    repo = Path(__file__).resolve().parents[1]
    runs = {"eager": [], "compiled": ["--compile"], "fp8_e4m3fn": ["--compile", "--weight-dtype", "fp8_e4m3fn"]}
    if importlib.util.find_spec("comfy_kitchen"):  # ComfyUI's fp8 "mixed" files need it
        runs["fp8_mixed"] = ["--compile", "--weight-dtype", "fp8_mixed"]
    records = {}
    for name, options in runs.items():
        out = tmp_path / name
        out.mkdir()
        done = subprocess.run([sys.executable, str(repo / "bench" / "comfy_train_speed.py"), "--comfyui", str(comfyui),
                               "--family", "tiny", "--resolution", "64", "--steps", "6", "--warmup", "1",
                               "--no-dynamic-vram", *options], env=os.environ | {"OUT": str(out)},
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (records[name],) = json.loads((out / "comfy_bench.json").read_text())
    plain = records["eager"]["losses"]
    for name, rec in records.items():
        assert rec["compiled"] == (name != "eager") and not rec["streams_weights"], name
        assert (rec["fp8_layers"] > 0) == name.startswith("fp8"), name
        gaps = [abs(a - b) / abs(b) for a, b in zip(rec["losses"], plain)]
        assert all(math.isfinite(x) for x in rec["losses"]) and max(gaps) < 0.05, (name, rec["losses"], plain)


@pytest.mark.gpu
def test_a_model_that_dynamic_vram_streams_trains_compiled_on_a_resident_copy_and_stays_as_it_was(tmp_path):
    """DynamicVRAM (ComfyUI's default on NVIDIA) casts each weight per op, which does not compile. A MODEL
    from Load Diffusion Model that fits trains on ComfyUI's non-dynamic delegate of it: compiled, with
    the losses of a resident MODEL, and the streamed MODEL gives the output it gave before the run. A
    MODEL that ComfyUI cannot load again (no loader to repeat) trains streamed, eager. Nothing keeps the
    copy's weights after the run."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from comfyui_harness import SKIP_REASON, locate_comfyui

    comfyui = locate_comfyui()
    if comfyui is None:
        pytest.skip(SKIP_REASON)
    repo = Path(__file__).resolve().parents[1]
    runs = {"resident": ["--no-dynamic-vram", "--from-file"],
            "streamed copy": ["--from-file", "--compile", "--check-shared"],
            "streamed": ["--compile", "--check-shared"]}
    records = {}
    for name, options in runs.items():
        out = tmp_path / name.replace(" ", "-")
        out.mkdir()
        done = subprocess.run([sys.executable, str(repo / "bench" / "comfy_train_speed.py"), "--comfyui", str(comfyui),
                               "--family", "tiny", "--resolution", "64", "--steps", "6", "--warmup", "1", *options],
                              env=os.environ | {"OUT": str(out)}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (records[name],) = json.loads((out / "comfy_bench.json").read_text())
    if records["streamed"]["patcher"] != "ModelPatcherDynamic":
        pytest.skip("comfy-aimdo (DynamicVRAM) did not start on this machine")
    copy, streamed, plain = records["streamed copy"], records["streamed"], records["resident"]
    assert copy["patcher"] == "ModelPatcherDynamic" and copy["trains_resident_copy"]
    assert copy["compiled"] and not copy["streams_weights"]
    assert not streamed["trains_resident_copy"] and streamed["streams_weights"] and not streamed["compiled"]
    assert copy["shared_output_change"] == 0 and streamed["shared_output_change"] == 0  # sampling: as before
    # The copy's weights, and the views of them that trained, are gone once the run ends (the MODEL's own,
    # which trained streamed, are not).
    assert copy["trained_weights"] > 0 and copy["trained_weights_alive"] == 0
    assert streamed["trained_weights_alive"] > 0
    for rec in (copy, streamed):
        gaps = [abs(a - b) / abs(b) for a, b in zip(rec["losses"], plain["losses"])]
        assert all(math.isfinite(x) for x in rec["losses"]) and max(gaps) < 0.05, (rec["losses"], plain["losses"])


@pytest.mark.gpu
def test_the_preview_decoder_of_a_vae_dynamic_vram_streams_leaves_the_vae_working():
    """A copy of a streamed VAE's modules carried DynamicVRAM's native buffers and freed them when it went:
    the process aborted (glibc: "corrupted double-linked list") at the VAE's next use."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from comfyui_harness import SKIP_REASON, locate_comfyui

    comfyui = locate_comfyui()
    if comfyui is None:
        pytest.skip(SKIP_REASON)
    driver = Path(__file__).with_name("streamed_vae_driver.py")
    done = subprocess.run([sys.executable, str(driver), str(comfyui)], env=os.environ, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    if not found["streamed"]:
        pytest.skip("comfy-aimdo (DynamicVRAM) did not start on this machine")
    assert found["vae_difference"] == 0.0
    assert found["preview_difference"] < 1e-2  # the preview in float32 on the CPU, the VAE in bf16 on the GPU
