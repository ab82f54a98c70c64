"""Speed and memory of the real training loop (`flux2_train.train.Trainer`) on real-size FLUX.2 transformers.

What runs is the engine's own loop, unchanged: dataset scan, feature cache, PEFT
LoRA injection, accelerate autocast, AdamW, gradient clipping, the LR schedule,
checkpoint and LoRA files at the end. Only two things are stand-ins:

* the transformer has the real architecture and size of the chosen family
  (diffusers' `Flux2Transformer2DModel` built from the family's config), but
  random weights (PyTorch's default init), built directly on the device in bf16;
* the text encoder and VAE are replaced by `SyntheticEncoder`, which returns
  random prompt embeddings of the family's context size (512 tokens) and random
  latents of the right shape. The real encoders (Qwen3 4B/8B for [klein],
  Mistral Small 3.1 24B for [dev]) only fill the cache once before training
  and are freed before the first step, so the loop's speed does not depend on
  them; this benchmark does not measure the caching phase.

Per-step seconds come from the loop's own `StepEvent`s (wall time from the
start of one step's loop iteration to the next: the loss is read a step late,
so the host's work between steps counts), the median is
taken over the steps after the warm-up, and the peak memory is
`torch.cuda.max_memory_allocated` (the loop resets it just before step 1, so
it holds the frozen weights plus training).

Examples:

    python bench/train_speed.py --family tiny --device cpu --resolution 128 --steps 5
    python bench/train_speed.py --family klein-4b --resolution 1024 --steps 25 --rank 16
    python bench/train_speed.py --family dev --resolution 1024 --steps 20 --rank 16 --gradient-checkpointing

Under `accelerate launch` (several GPUs) every process runs the loop on its own GPU,
the engine's DDP averages the LoRA gradients, and the main process reports the step
time (images per second: processes x batch / s per step):

    accelerate launch --multi_gpu --num_processes 2 bench/train_speed.py --family klein-4b --resolution 1024

Several `--family` values run one after another, each in its own subprocess,
so one that runs out of memory leaves the others' results intact. A markdown
row per run is printed; with the environment variable OUT set, the runs are
also appended to $OUT/bench.json.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from flux2_train.config import ATTENTION_BACKENDS  # noqa: E402

# Dense bf16 peak of one H100 SXM by the vendor's datasheet; a large bf16 matmul
# reaches about 790-800 TFLOP/s on the card in practice.
H100_BF16_PEAK = 989.4e12
TEXT_TOKENS = 512

FAMILY_EXTRA = dict(patch_size=1, in_channels=128, attention_head_dim=128, mlp_ratio=3.0,
                    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, timestep_guidance_channels=256, eps=1e-6)


def family_config(family: str) -> dict:
    """diffusers `Flux2Transformer2DModel` config of a released FLUX.2 family (or the tiny test size)."""
    if family == "tiny":
        from flux2_train.tiny import TINY_TRANSFORMER

        return dict(TINY_TRANSFORMER, guidance_embeds=False)
    from flux2_train.model import KNOWN_FAMILIES

    if family not in KNOWN_FAMILIES:
        raise SystemExit(f"unknown --family {family!r}; choose tiny, " + ", ".join(KNOWN_FAMILIES))
    return dict(KNOWN_FAMILIES[family], **FAMILY_EXTRA, guidance_embeds=family == "dev")


def build_transformer(config: dict, device: torch.device, seed: int = 0):
    """The real diffusers class with random weights, built directly on `device` in bf16 (no CPU copy)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Flux2Transformer2DModel(**config)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    return model.eval()


class SyntheticEncoder:
    """`FeatureEncoder` stand-in for FLUX.2's text encoder and VAE (random features of the right shapes).

    It replaces the 4B-24B text encoders and the VAE, which only fill the cache
    before training; the benchmark does not measure them.
    """

    def __init__(self, context_dim: int, seed: int = 0):
        self.context_dim = context_dim
        self.identity = f"synthetic-{context_dim}-{seed}"
        self.g = torch.Generator().manual_seed(seed)

    def encode_text(self, captions: list[str], max_sequence_length: int) -> torch.Tensor:
        return torch.randn(len(captions), max_sequence_length, self.context_dim, generator=self.g).to(torch.bfloat16)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        b, c, h, w = pixels.shape
        assert c == 3 and h % 16 == 0 and w % 16 == 0, pixels.shape
        return torch.randn(b, 128, h // 16, w // 16, generator=self.g)


def write_dataset(folder: Path, resolution: int, count: int, seed: int = 0,
                  size: tuple[int, int] | None = None) -> None:
    """`count` random RGB PNGs of resolution x resolution (or `size` = (width, height)) with a caption file each."""
    import numpy as np
    from PIL import Image

    width, height = size or (resolution, resolution)
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        # Smooth colour fields plus noise: realistic PNG sizes, quick to write.
        small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((width, height), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, (height, width, 3))
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(f"a photo of sks object number {i}, random test image", encoding="utf-8")


class LinearFlopCounter:
    """Counts 2*M*K*N of every nn.Linear call while `active` (one forward pass, recomputation excluded)."""

    def __init__(self):
        self.active = False
        self.flops = 0
        self.handle = torch.nn.modules.module.register_module_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        if self.active and isinstance(module, torch.nn.Linear) and inputs and torch.is_tensor(inputs[0]):
            x = inputs[0]
            self.flops += 2 * (x.numel() // module.in_features) * module.in_features * module.out_features

    def remove(self):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def attention_forward_flops(config: dict, image_tokens: int, text_tokens: int, batch: int = 1) -> int:
    """QK^T and PV of the joint attention of every block, forward only."""
    hidden = config["num_attention_heads"] * config["attention_head_dim"]
    t = image_tokens + text_tokens
    blocks = config["num_layers"] + config["num_single_layers"]
    return 4 * batch * t * t * hidden * blocks


def run_one(args, family: str) -> dict:
    from flux2_train.config import resolve_config
    from flux2_train.distributed import World
    from flux2_train.errors import OutOfMemory, TrainingDiverged
    from flux2_train.events import EventBus, StepEvent
    from flux2_train.model import DiffusersFlux2Backbone
    from flux2_train.offload import offloaded_indices
    from flux2_train.train import Trainer

    device = torch.device(args.device)
    world = World.join(device)
    device = world.device(device)
    config = family_config(family)
    res = args.resolution
    image_tokens = (res // 16) ** 2
    rec = dict(family=family, resolution=res, steps=args.steps, rank=args.rank, targets=args.targets,
               gradient_checkpointing=args.gradient_checkpointing, checkpoint_blocks=args.checkpoint_blocks,
               offload_activations=args.offload_activations,
               quantize_base=args.quantize_base, attention=args.attention, compile=args.compile,
               mode=mode_text(args), batch_size=1, dtype="bfloat16",
               device=str(device), text_tokens=TEXT_TOKENS, image_tokens=image_tokens, warmup=args.warmup,
               config={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()},
               status="ok", error="", processes=world.size, multi_gpu=args.multi_gpu)
    rec.update(env_info(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    # One folder for all processes: the main one writes the images, all share the cache.
    work = Path(world.share(tempfile.mkdtemp(prefix=f"train_speed_{family}_") if world.is_main else None))
    counter = None
    try:
        if world.is_main:
            write_dataset(work / "data", res, args.images)
        world.barrier()
        t0 = time.perf_counter()
        try:
            transformer = build_transformer(config, device, seed=args.seed)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        except torch.OutOfMemoryError as e:
            rec.update(status="oom", error=f"building the transformer: {str(e).splitlines()[0]}")
            return rec
        rec["build_seconds"] = time.perf_counter() - t0
        rec["param_count"] = sum(p.numel() for p in transformer.parameters())
        rec["weights_gib"] = rec["param_count"] * 2 / 2**30
        backbone = DiffusersFlux2Backbone(transformer)
        rec["spec_family"] = backbone.spec.family
        rec["title"] = backbone.spec.title
        if args.quantize_base != "none":  # here rather than in the loop, so the cap below holds for training
            t0 = time.perf_counter()
            backbone.quantize(args.quantize_base, device, torch.bfloat16)
            rec["quantize_seconds"] = time.perf_counter() - t0
        rec["resident_weights_gib"] = sum(t.numel() * t.element_size() for t in
                                          [*transformer.parameters(), *transformer.buffers()]) / 2**30

        # Linear FLOPs of one forward pass of the frozen model, counted eagerly before training
        # (a compiled block calls no hooks); the LoRA pairs (under 1% at rank 16) are left out.
        counter = LinearFlopCounter()
        counter.active = True
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            backbone.predict(torch.randn(1, 128, res // 16, res // 16, device=device, dtype=torch.bfloat16),
                             torch.full((1,), 0.5, device=device, dtype=torch.bfloat16),
                             torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], device=device,
                                         dtype=torch.bfloat16))
        counter.remove()

        cfg = resolve_config(overrides=dict(
            dataset=str(work / "data"), output_dir=str(work / "runs"), cache_dir=str(work / "cache"),
            name=f"bench-{family}", resolution=res, steps=args.steps, rank=args.rank, alpha=float(args.rank),
            targets=args.targets, gradient_checkpointing=args.gradient_checkpointing, dtype="bfloat16",
            device=args.device, batch_size=1, gradient_accumulation=1, caption_dropout=0.0, save_every=0,
            keep_checkpoints=1, tensorboard=False, seed=args.seed, max_sequence_length=TEXT_TOKENS,
            learning_rate=args.learning_rate, multi_gpu=args.multi_gpu, quantize_base=args.quantize_base,
            attention=args.attention, compile=args.compile, checkpoint_blocks=args.checkpoint_blocks,
            offload_activations=args.offload_activations, validate_every=0))
        if str(args.offload_blocks) != "0":
            cfg.offload_blocks = offload_count(args, cfg, backbone.spec, device)
            rec["offload_blocks"] = cfg.offload_blocks
            rec["mode"] = rec["mode"].replace("offload auto blocks", f"offload {cfg.offload_blocks} blocks (auto)")
            # Placed here, before the cap, as the trainer would place them: this model was built on the GPU.
            backbone.prepare(device, torch.bfloat16, offloaded=tuple(offloaded_indices(len(backbone.blocks), cfg)))
        if args.memory_cap_gib and device.type == "cuda":
            torch.cuda.empty_cache()
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total,
                                                       device.index or torch.cuda.current_device())
            rec["memory_cap_gib"] = args.memory_cap_gib

        steps: list[dict] = []

        profiler = StepProfiler(args.profile, family, args.warmup) if args.profile else None
        host_times = HostTimes(args.warmup) if args.host_times else None

        def on_event(ev):
            if isinstance(ev, StepEvent):
                steps.append(dict(step=ev.step, loss=ev.loss, seconds=ev.seconds_per_step,
                                  peak_gib=ev.peak_memory_bytes / 2**30))
                if profiler:
                    profiler.step(ev.step)
                if host_times:
                    host_times.step(ev.step, ev.total)
                if world.is_main and (args.verbose or ev.step <= 3 or ev.step % 5 == 0 or ev.step == ev.total):
                    print(f"  [{family}] step {ev.step}/{ev.total} loss {ev.loss:.4f} "
                          f"{ev.seconds_per_step:.3f} s peak {ev.peak_memory_bytes / 2**30:.2f} GiB", flush=True)
            elif world.is_main and getattr(ev, "kind", "") in ("training", "failed", "info"):
                print(f"  [{family}] {ev.kind}: {ev.message}", flush=True)

        events = EventBus([on_event])
        t1 = time.perf_counter()
        try:
            trainer = Trainer(cfg, backbone, encoder=SyntheticEncoder(config["joint_attention_dim"], args.seed),
                              events=events)
            try:
                with host_times or contextlib.nullcontext():
                    result = trainer.run()
            finally:
                if profiler:
                    rec["profile"] = profiler.finish()
                if host_times:
                    rec["host_ms_per_call"] = host_times.report(family)
            rec["strategy"] = trainer.strategy
            if trainer.activation_offload:  # what one forward pass moved to CPU memory
                rec["offloaded_activations_gib"] = trainer.activation_offload.offloaded_bytes / 2**30
                print(f"  [{family}] activations offloaded per step: {rec['offloaded_activations_gib']:.2f} GiB",
                      flush=True)
            rec["lora_tensors"] = len(result.targets) * 2
            rec["lora_layers"] = len(result.targets)
            rec["run_seconds"] = result.seconds
        except OutOfMemory as e:
            rec.update(status="oom", error=str(e))
        except TrainingDiverged as e:
            rec.update(status="diverged", error=str(e))
        except torch.OutOfMemoryError as e:  # outside the loop's own OOM guard (e.g. LoRA injection)
            rec.update(status="oom", error=str(e).splitlines()[0])
        rec["wall_seconds"] = time.perf_counter() - t1

        losses = [s["loss"] for s in steps]
        secs = [s["seconds"] for s in steps]
        rec["steps_done"] = len(steps)
        rec["losses"] = losses
        rec["step_seconds"] = secs
        rec["finite_loss"] = bool(losses) and all(math.isfinite(x) for x in losses) and rec["status"] != "diverged"
        timed = secs[args.warmup:] if len(secs) > args.warmup else secs[-1:]
        if timed:
            rec["median_s_per_step"] = statistics.median(timed)
            rec["mean_s_per_step"] = statistics.fmean(timed)
            rec["min_s_per_step"] = min(timed)
            rec["max_s_per_step"] = max(timed)
            rec["timed_steps"] = len(timed)
        if device.type == "cuda":
            rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
        else:
            rec["peak_rss_gib"] = steps[-1]["peak_gib"] if steps else None

        # FLOP estimate: Linear layers counted in step 1's forward; attention from the shapes.
        # LoRA trains no base weight, so the backward pass costs one forward for the Linear layers
        # (input gradients only) and two for attention; recomputation is not counted.
        lin = counter.flops if counter else 0
        attn = attention_forward_flops(config, image_tokens, TEXT_TOKENS)
        rec["forward_linear_tflop"] = lin / 1e12
        rec["forward_attention_tflop"] = attn / 1e12
        model_flops = 2 * lin + 3 * attn
        rec["model_tflop_per_step"] = model_flops / 1e12
        if rec.get("median_s_per_step"):
            rec["images_per_second"] = world.size / rec["median_s_per_step"]
        if lin and rec.get("median_s_per_step"):  # per GPU
            rec["model_tflops"] = model_flops / rec["median_s_per_step"] / 1e12
            if device.type == "cuda":
                rec["mfu_vs_989"] = model_flops / rec["median_s_per_step"] / H100_BF16_PEAK
    except Exception as e:  # report, do not lose the other families' numbers
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if counter:
            counter.remove()
        world.barrier()
        if world.is_main:
            shutil.rmtree(work, ignore_errors=True)
    return rec


class StepProfiler:
    """torch.profiler over `steps` training steps after the warm-up: the top GPU kernels by time, and
    where the GPU idles (`gpu_idle`)."""

    def __init__(self, steps: int, family: str, warmup: int):
        from torch.profiler import ProfilerActivity, profile

        self.first, self.last, self.family = warmup + 1, warmup + steps, family
        # GPU activity only: the table and the idle gaps need nothing else, and recording CPU ops adds
        # host work to every op, which moves the gaps.
        self.prof = profile(activities=[ProfilerActivity.CUDA])
        self.running = False
        if warmup == 0:  # from the first step
            self.prof.start()
            self.running = True

    def step(self, done: int) -> None:
        if done == self.first - 1 and not self.running:
            self.prof.start()
            self.running = True
        elif done == self.last and self.running:
            self.prof.stop()
            self.running = False

    def finish(self, top: int = 40) -> str:
        if self.running:
            self.prof.stop()
        try:
            table = self.prof.key_averages().table(sort_by="self_device_time_total", row_limit=top,
                                                   max_name_column_width=70)
        except (AssertionError, RuntimeError):  # the run ended before the profiled steps
            return ""
        table += "\n" + gpu_idle(self.prof.events(), self.last - self.first + 1)
        print(table, flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"profile-{self.family}.txt").write_text(table)
        return table


class HostTimes:
    """`--host-times`: the host's time in each part of the loop, per call, waits for the GPU included.

    Counted over the steps queued after the warm-up's last report (reports come a step late), without
    the last loss read, which waits for the whole last step. A part that takes the
    host longer than the GPU needs for its work leaves the GPU waiting; where the host is ahead, it
    waits in whichever call finds CUDA's launch queue full.
    """

    def __init__(self, warmup: int):
        from flux2_train.loss_reader import LateLossReader
        from flux2_train.train import Trainer

        self.calls = {
            "prepare a micro-batch": (Trainer, "_micro_batch"),
            "queue the forward pass": (Trainer, "_micro_step"),
            "queue the backward pass": (torch.autograd, "backward"),
            "clip the gradients": (torch.nn.utils, "clip_grad_norm_"),
            "read a loss a step late": (LateLossReader, "read"),
        }
        self.warmup, self.counting = warmup, False
        self.spent: dict[str, list[float]] = {name: [] for name in [*self.calls, "optimizer step"]}
        self.stack = contextlib.ExitStack()

    def step(self, done: int, total: int) -> None:
        self.counting = self.warmup <= done < total - 1

    def __enter__(self):
        from unittest import mock

        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        with contextlib.ExitStack() as stack:  # undone at once if a patch fails
            for name, (owner, attr) in self.calls.items():
                stack.enter_context(mock.patch.object(owner, attr, self._timed(name, getattr(owner, attr))))
            # Every optimizer, through torch's global step hooks rather than a patched class.
            started = []
            stack.callback(register_optimizer_step_pre_hook(lambda *_: started.append(time.perf_counter())).remove)
            stack.callback(register_optimizer_step_post_hook(
                lambda *_: self._add("optimizer step", started.pop()) if started else None).remove)
            self.stack = stack.pop_all()
        return self

    def __exit__(self, *exc):
        self.stack.close()

    def _add(self, name: str, start: float) -> None:
        if self.counting:
            self.spent[name].append(time.perf_counter() - start)

    def _timed(self, name, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._add(name, start)
        return timed

    def report(self, family: str) -> dict[str, float]:
        means = {name: 1e3 * sum(ts) / len(ts) for name, ts in self.spent.items() if ts}
        for name, ms in means.items():
            print(f"  [{family}] host ms per call, {name}: {ms:.2f} ({len(self.spent[name])} calls)", flush=True)
        return means


def gpu_idle(events, steps: int, largest: int = 12) -> str:
    """Where the GPU waits in the profiled window: its busy time, its idle time by gap size, and the
    largest gaps with the kernels on either side. Many small gaps mean launch-bound code (the host
    queues kernels no faster than they run); a few large ones mean a host wait or host-side work."""
    from torch.autograd import DeviceType

    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                   if e.device_type == DeviceType.CUDA)
    if not spans:
        return "no GPU activity recorded"
    busy, gaps = 0.0, []
    start, end, last = spans[0]
    for s, e, name in spans[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, last, name))
            start = s
        if e >= end:
            end, last = e, name
    busy += end - start
    window = end - spans[0][0]  # microseconds; the last activity to end may not be the last to start
    lines = [f"GPU busy {busy / steps / 1e3:.1f} ms of {window / steps / 1e3:.1f} ms per step "
             f"({100 * (1 - busy / window):.1f}% idle, {len(spans) / steps:.0f} GPU activities per step)"]
    for lo, hi in ((0, 5), (5, 20), (20, 100), (100, float("inf"))):
        sizes = [g for g, *_ in gaps if lo <= g < hi]
        lines.append(f"  gaps {lo}-{hi} us: {len(sizes) / steps:.0f} per step, "
                     f"{sum(sizes) / steps / 1e3:.2f} ms per step")
    lines.append("largest gaps (us, kernel before -> kernel after):")
    for g, before, after in sorted(gaps, reverse=True)[:largest]:
        lines.append(f"  {g:8.0f}  {before[:60]} -> {after[:60]}")
    return "\n".join(lines)


def offload_count(args, cfg, spec, device) -> int:
    """--offload-blocks N, or for "auto" the trainer's own `auto` choice for the memory cap."""
    if args.offload_blocks != "auto":
        return int(args.offload_blocks)
    import dataclasses

    from flux2_train.memory import CUDA_CONTEXT, Placement, plan_auto

    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else 0
    cap = args.memory_cap_gib or total
    plan = plan_auto(spec, dataclasses.replace(cfg, quick_preset="auto"), Placement("engine"),
                     int(cap * 2**30) + CUDA_CONTEXT["native"], split_batch=False)
    print(f"  {plan.reason}", flush=True)
    return plan.cfg.offload_blocks


def mode_text(args) -> str:
    """The speed and memory settings of a run, in a few words."""
    parts = [f"{args.quantize_base} base" if args.quantize_base != "none" else "bf16 base"]
    if args.gradient_checkpointing:
        parts.append(f"ckpt {args.checkpoint_blocks} blocks" if args.checkpoint_blocks else "ckpt all")
    if args.compile:
        parts.append("compile")
    if str(args.offload_blocks) != "0":
        parts.append(f"offload {args.offload_blocks} blocks")
    if args.offload_activations:
        parts.append(f"{args.offload_activations} blocks' activations offloaded")
    if args.attention != "auto":
        parts.append(f"{args.attention} attention")
    if args.memory_cap_gib:
        parts.append(f"capped {args.memory_cap_gib:g} GiB")
    return ", ".join(parts)


def env_info(device: torch.device) -> dict:
    import importlib.metadata as md

    info = dict(torch=torch.__version__, python=platform.python_version())
    for pkg in ("diffusers", "peft", "accelerate", "transformers"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=p.total_memory / 2**30, cuda=torch.version.cuda)
    else:
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads())
    return info


HEADER = ("| family | device | GPUs | res | steps | rank | targets | mode | median s/step | images/s "
          "| peak alloc GiB (per GPU) | finite loss | loss first→last | model TFLOP/s per GPU (MFU) | status |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    dev = r.get("gpu") or r.get("device")
    med = f"{r['median_s_per_step']:.3f}" if r.get("median_s_per_step") is not None else "–"
    peak = r.get("peak_allocated_gib", r.get("peak_rss_gib"))
    peak = f"{peak:.2f}" if peak is not None else "–"
    losses = r.get("losses") or []
    lr = f"{losses[0]:.3f}→{losses[-1]:.3f}" if losses else "–"
    tf = "–"
    if r.get("model_tflops"):
        tf = f"{r['model_tflops']:.0f}"
        if r.get("mfu_vs_989"):
            tf += f" ({100 * r['mfu_vs_989']:.0f}%)"
    status = r["status"] + (f": {r['error'][:160]}" if r.get("error") else "")
    ips = f"{r['images_per_second']:.2f}" if r.get("images_per_second") else "–"
    gpus = f"{r.get('processes', 1)}" + (f" ({r['strategy'].upper()})" if r.get("strategy") else "")
    return (f"| {r['family']} | {dev} | {gpus} | {r['resolution']} | {r.get('steps_done', 0)}/{r['steps']} "
            f"| {r['rank']} | {r['targets']} | {r.get('mode') or ('ckpt all' if r['gradient_checkpointing'] else '')} | {med} | {ips} | {peak} "
            f"| {'yes' if r.get('finite_loss') else 'no'} | {lr} | {tf} | {status} |")


def run_each_family(script: Path, argv: list[str], families: list[str], failed) -> list[dict]:
    """Run `script` once per family, each in its own process (one that runs out of memory loses
    nothing else), with `argv` less its --family options; the records, or `failed(family, exit code)`."""
    from flux2_train.cli import without_option

    cleaned = without_option(argv, "--family")
    runs = []
    for fam in families:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result_file = f.name
        cmd = [sys.executable, str(script.resolve()), *cleaned, "--family", fam, "--result-file", result_file]
        print(f"== {fam}: {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd)
        try:
            runs.append(json.loads(Path(result_file).read_text()))
        except (OSError, json.JSONDecodeError):
            runs.append(failed(fam, proc.returncode))
        Path(result_file).unlink(missing_ok=True)
    return runs


def report(runs: list[dict], header: str, row, file_name: str) -> int:
    """Print the runs as a markdown table, append them to $OUT/<file_name> when OUT is set, and
    return the exit code: 0 when every run succeeded."""
    print()
    print(header)
    for r in runs:
        print(row(r))
    if out := os.environ.get("OUT"):
        path = Path(out) / file_name
        data = {"runs": []}
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError:
                pass
        data.setdefault("runs", []).extend(runs)
        path.write_text(json.dumps(data, indent=1))
        print(f"wrote {path}")
    return 0 if all(r["status"] == "ok" for r in runs) else 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", action="append", help="klein-4b, klein-9b, dev or tiny; repeat for several")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="attention_mlp", choices=("attention", "attention_mlp", "all_linear"))
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--checkpoint-blocks", type=int, default=0, help="with checkpointing: the first N blocks only")
    ap.add_argument("--quantize-base", default="none", choices=("none", "fp8", "int8", "nf4"))
    ap.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    ap.add_argument("--offload-blocks", default="0",
                    help="keep N checkpointed blocks' weights in CPU memory; auto: as many as the trainer's auto "
                         "plan offloads under --memory-cap-gib")
    ap.add_argument("--offload-activations", type=int, default=0, metavar="N",
                    help="keep the activations of N blocks that are not checkpointed in pinned CPU memory")
    ap.add_argument("--profile", type=int, default=0, metavar="STEPS",
                    help="profile STEPS steps after the warm-up; print the top GPU kernels by time and where "
                         "the GPU idles")
    ap.add_argument("--host-times", action="store_true",
                    help="print the host's time in each part of the loop (waits for the GPU included)")
    ap.add_argument("--memory-cap-gib", type=float, default=0.0,
                    help="cap the process's GPU memory (torch.cuda.set_per_process_memory_fraction) after the "
                         "model is built, quantized and placed: a smaller card")
    ap.add_argument("--multi-gpu", default="auto", choices=("auto", "ddp", "fsdp"),
                    help="under accelerate launch: DDP, FSDP, or the trainer's choice")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every step")
    ap.add_argument("--result-file", help=argparse.SUPPRESS)  # used by the parent for subprocess runs
    args = ap.parse_args(argv)

    def one(family: str) -> dict | None:
        rec = run_one(args, family)
        if rec.get("processes", 1) > 1:
            from flux2_train.distributed import leave

            leave()
            if os.environ.get("RANK", "0") != "0":  # the main process reports
                return None
        return rec

    def failed(family: str, code: int) -> dict:
        return dict(family=family, resolution=args.resolution, steps=args.steps, rank=args.rank,
                    targets=args.targets, gradient_checkpointing=args.gradient_checkpointing,
                    status="error", error=f"subprocess exited with {code} and no result")

    return run_families(Path(__file__), args, argv, one, failed, HEADER, row, "bench.json")


def run_families(script: Path, args, argv, run_one, failed, header: str, row, file_name: str) -> int:
    """Run `args.family` (one in this process, several each in its own) and `report` the records.

    `run_one(family)` returns the record, or None in a process that leaves the reporting to another.
    """
    families = args.family or ["klein-4b"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU visible; use --device cpu (with --family tiny)", file=sys.stderr)
        return 2
    if len(families) > 1:
        runs = run_each_family(script, argv if argv is not None else sys.argv[1:], families, failed)
        return report(runs, header, row, file_name)
    rec = run_one(families[0])
    if rec is None:
        return 0
    if args.result_file:
        Path(args.result_file).write_text(json.dumps(rec))
        return 0
    return report([rec], header, row, file_name)


if __name__ == "__main__":
    sys.exit(main())
