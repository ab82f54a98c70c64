"""The training loop: rectified-flow LoRA training of a FLUX.2 backbone on cached data.

Randomness is a pure function of (seed, micro-step): the data order of an
epoch comes from (seed, epoch), and the noise, sigma, flip, caption dropout and
LoRA dropout of a micro-step from (seed, micro-step). A resumed run therefore sees exactly
the batches and noise the uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import math
import os
import resource
import shlex
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint as ckpt
from . import seeds
from .cache import CachedDataset, FeatureCache, check_unchanged, prepare_cache
from .config import TrainConfig, check_output_folders, check_run_name, save_yaml
from .data import DatasetReport, scan_dataset_for
from .distributed import World, check_precision, lost_a_process, resolve_device
from .ema import AdapterAverage
from .encoders import FeatureEncoder
from .evaluation import RunWatcher, best_step, load_png, preview_prompts, split_validation
from .errors import ConfigError, DiskFull, OutOfMemory, ProcessLost, TrainingCancelled, TrainingDiverged
from .events import EventBus, JsonlMetrics, StatusEvent, StepEvent, tensorboard_logger
from .flow import flow_loss, noisy_latents, sample_sigmas, velocity_target
from .fsutil import atomic_write_text, out_of_space
from .lora import check_rank, full_tensor, resolve_targets, sharded_like
from .lora_files import lora_metadata, read_metadata, save_lora
from .loss_reader import LateLossReader, skips_updates_on_device
from .memory import MemoryEstimate, device_available_memory, plan_processes
from .model import Flux2Backbone, ModelSpec, spec_linear_shapes
from .offload import (ACTIVATIONS_IN_FLIGHT, ActivationOffload, activation_offload_indices, activation_offload_room,
                      check_activation_offload, check_offload, offloaded_indices)
from .plot import Smoother, save_loss_plot
from .quantize import check_quantize
from .speed import (attention_implementation, attention_kernels, check_attention, checkpointed_count,
                    compile_unavailable)

log = logging.getLogger(__name__)

_WEIGHT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_MIXED_PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "no"}


@dataclass
class TrainResult:
    run_dir: Path
    lora_path: Path
    extra_lora_paths: list[Path]
    steps: int
    losses: list[float]
    smoothed: list[float]
    targets: list[str]
    spec: ModelSpec
    seconds: float
    peak_memory_bytes: int
    dataset: DatasetReport
    summary: str = ""
    checkpoints: list[Path] = field(default_factory=list)
    adapter: dict[str, torch.Tensor] = field(default_factory=dict)  # final LoRA weights, PEFT naming
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation loss)
    previews: list[Path] = field(default_factory=list)  # the last round's files
    preview_images: list[torch.Tensor] = field(default_factory=list)  # the same, (3, H, W) in [0, 1]

    @property
    def best_validation(self) -> tuple[int, float] | None:
        return best_step(self.validation)


def precision_plan(dtype: str, device: torch.device) -> tuple[torch.dtype, str, str]:
    """Weight dtype, accelerate mixed_precision, and the sentence that says so in the log.

    One option sets both: float16 weights with bf16 autocast (or the reverse) would
    cast every matmul twice and lose the benefit of either.
    """
    if dtype == "float16" and device.type != "cuda":
        raise ConfigError("--dtype float16 needs a CUDA GPU (fp16 autocast with loss scaling); on the CPU use bfloat16 or float32")
    weight = _WEIGHT_DTYPES[dtype]
    mp = _MIXED_PRECISION[dtype]
    if mp == "no":
        text = "dtype float32: frozen weights and compute in float32 (no mixed precision)"
    else:
        text = (f"dtype {dtype}: frozen weights in {dtype}, autocast {dtype} (accelerate mixed_precision={mp}), "
                "LoRA weights and optimizer state in float32")
    return weight, mp, text


def make_accelerator(mixed_precision: str, accumulation: int, device: torch.device, processes: int = 1):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one process-wide state; a ComfyUI session or a test run trains
    # several times with different settings, so a single-process state is rebuilt.
    state = AcceleratorState._shared_state
    if state and state.get("num_processes", 1) == 1:
        AcceleratorState._reset_state(reset_partial_state=False)
    # A run of one process stays one whatever a launcher's variables say (a host started by one).
    hidden = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK") if processes == 1 and k in os.environ}
    try:
        return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=accumulation,
                           cpu=device.type == "cpu")
    finally:
        os.environ.update(hidden)


# The optimizer settings that come from the options: a resumed run takes them from its options, not
# from the checkpoint's optimizer state (which holds the moments, and Prodigy's step size, to continue).
_CONFIGURED = ("initial_lr", "betas", "eps", "weight_decay")


def keep_configured(optimizer, lr_scheduler, configured: list[dict]) -> None:
    """Put back, after a checkpoint's optimizer and scheduler state, the settings the options gave
    (`configured`, per parameter group), and the learning rate of the step the schedule is at."""
    for group, values in zip(optimizer.param_groups, configured):
        group.update(values)
    if isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):  # every schedule diffusers builds
        lr_scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        for group, base, factor in zip(optimizer.param_groups, lr_scheduler.base_lrs, lr_scheduler.lr_lambdas):
            group["lr"] = base * factor(lr_scheduler.last_epoch)
        lr_scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def build_optimizer(cfg: TrainConfig, params: list[torch.nn.Parameter], device: torch.device):
    return optimizer_factory(cfg, device)(params)


def optimizer_factory(cfg: TrainConfig, device: torch.device) -> Callable[[list], torch.optim.Optimizer]:
    """The optimizer as a function of the parameters; refuses one this machine cannot run,
    so a run can be checked before any heavy work."""
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optimizer == "adamw":
        return lambda params: torch.optim.AdamW(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                                weight_decay=cfg.weight_decay, fused=device.type in ("cuda", "cpu"))
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError("--optimizer adamw8bit runs on CUDA GPUs only (bitsandbytes); use --optimizer adamw here")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes "
                              "(or use --optimizer adamw)") from None
        return lambda params: bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon,
                                                  weight_decay=cfg.weight_decay)
    if cfg.optimizer == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise ConfigError("--optimizer prodigy needs prodigyopt: pip install prodigyopt "
                              "(or pip install 'comfyui-flux2-lora-trainer[optimizers]')") from None
        return lambda params: Prodigy(params, lr=cfg.learning_rate, betas=betas, weight_decay=cfg.weight_decay,
                                      safeguard_warmup=cfg.lr_warmup_steps > 0)
    if cfg.optimizer == "adafactor":
        try:
            from transformers.optimization import Adafactor
        except ImportError:
            raise ConfigError("--optimizer adafactor needs transformers' Adafactor: pip install -U transformers "
                              "(or use --optimizer adamw)") from None

        return lambda params: Adafactor(params, lr=cfg.learning_rate, scale_parameter=False, relative_step=False,
                                        warmup_init=False, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}")


def whole_state(optimizer_state: dict) -> dict:
    """An optimizer state dict with sharded (FSDP) tensors gathered whole, as one process saves it."""
    state = {i: {k: full_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in optimizer_state["state"].items()}
    return {**optimizer_state, "state": state}


def shard_like(optimizer_state: dict, params: list[torch.nn.Parameter]) -> dict:
    """A saved (whole) optimizer state cut like `params` where they are sharded (FSDP), for any process count."""
    state = {}
    for i, s in optimizer_state["state"].items():
        p = params[int(i)] if int(i) < len(params) else None
        if p is not None:
            s = {k: sharded_like(v, p) if isinstance(v, torch.Tensor) and v.shape == p.shape else v
                 for k, v in s.items()}
        state[i] = s
    return {**optimizer_state, "state": state}


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class _PendingReport:
    """What a step's report needs, gathered while it runs: its loss may be read a step later."""

    started: float  # when its iteration began (time.perf_counter)
    epoch: int = 0
    lr: float = 0.0  # after the step


@dataclass
class MicroBatch:
    """One micro-step's inputs on the training device."""

    index: int  # the micro-step they are for
    epoch: int
    dropout_seed: int
    noisy: torch.Tensor  # noised latents, in the weights' dtype
    sigmas: torch.Tensor
    text: torch.Tensor
    target: torch.Tensor  # the velocity to predict


def _micro_generator(seed: int, micro_step: int) -> torch.Generator:
    return seeds.generator(seed * 1_000_003 + micro_step)


class EpochPlan:
    """Batches of one bucket each, in a seeded order per epoch."""

    def __init__(self, data: CachedDataset, repeats: int, batch_size: int, seed: int):
        self.data, self.repeats, self.batch_size, self.seed = data, repeats, batch_size, seed
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(data.samples):
            by_bucket.setdefault(s.bucket, []).extend([i] * repeats)
        self.by_bucket = by_bucket
        self.batches_per_epoch = sum(math.ceil(len(v) / batch_size) for v in by_bucket.values())
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache and self._cache[0] == epoch:
            return self._cache[1]
        g = seeds.generator(self.seed * 7919 + epoch)
        batches = []
        for bucket in sorted(self.by_bucket):
            idx = self.by_bucket[bucket]
            perm = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            batches += [perm[k:k + self.batch_size] for k in range(0, len(perm), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[j] for j in order]
        self._cache = (epoch, batches)
        return batches

    def batch(self, micro_step: int) -> tuple[int, list[int]]:
        epoch, pos = divmod(micro_step, self.batches_per_epoch)
        return epoch, self.epoch_batches(epoch)[pos]


def default_run_name(spec: ModelSpec) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"flux2-{spec.family}-lora-{stamp}"


def _new_run_dir(output_dir: Path, name: str) -> Path:
    check_run_name(name)
    run = output_dir / name
    n = 2
    while run.exists() and any(run.iterdir()):
        run = output_dir / f"{name}-{n}"
        n += 1
    run.mkdir(parents=True, exist_ok=True)
    return run


def _keep_earlier_lora(path: Path) -> None:
    """A finished run continued to more steps: its earlier LoRA keeps its file, renamed by its steps
    (`name.step-000400.safetensors`), rather than being replaced."""
    if not path.is_file():
        return
    steps = read_metadata(path).get("flux2_train.steps", "")
    if steps.isdigit():
        aside = path.with_name(f"{path.name.removesuffix('.safetensors')}.step-{int(steps):06d}.safetensors")
        if not aside.exists():
            os.replace(path, aside)


class Trainer:
    """One training run. `run()` returns a TrainResult or raises a Flux2TrainError."""

    def __init__(
        self,
        cfg: TrainConfig,
        backbone: Flux2Backbone,
        *,
        encoder: FeatureEncoder | None = None,
        dataset: DatasetReport | None = None,
        events: EventBus | None = None,
        should_stop: Callable[[], bool] | None = None,
        resume: str | Path | None = None,
        free_encoder: Callable[[], None] | None = None,
        console: bool = False,
        stop_exceptions: tuple[type[BaseException], ...] = (),
        available_memory: int | None | str = "device",
        several_processes: bool = True,
    ):
        self.cfg = cfg.validate()
        self.backbone = backbone
        self.encoder = encoder
        self.dataset = dataset
        self.events = events or EventBus()
        self.should_stop = should_stop or (lambda: False)
        self.resume = resume
        self.free_encoder = free_encoder
        self.console = console
        # Raised inside a step when the host stops it there (ComfyUI's Cancel): the step
        # is dropped and the run ends as if stopped between steps.
        self.stop_exceptions = stop_exceptions
        self.step_hooks: list[Callable[[int, "Trainer"], None]] = []
        # Bytes the run may use on the device: "device" asks the device; a host that manages
        # the memory itself (ComfyUI) passes its own figure; None: no limit known.
        self.available_memory = available_memory
        self.estimate: MemoryEstimate | None = None
        # Whether a launcher's processes (WORLD_SIZE) make one run; a host that trains in its
        # own process (ComfyUI) says no.
        self.several_processes = several_processes
        self.world = World()
        self.strategy = ""  # "ddp" or "fsdp" with several processes
        self.average: AdapterAverage | None = None  # of the LoRA weights, with --ema-decay
        self.resume_path: Path | None = None  # the checkpoint folder a resume continues from
        self._resumed_from: int | None = None  # its step, until the resumed run's first checkpoint
        self.activation_offload: ActivationOffload | None = None  # --offload-activations
        self.step = 0  # the last step done, for the events of a failure

    # ------------------------------------------------------------------
    def run(self) -> TrainResult:
        cfg, spec = self.cfg, self.backbone.spec
        # Before any heavy work (and before a run folder exists): the options this machine can
        # run, the dataset's buckets and the memory plan. A run that cannot fit stops here.
        try:
            device = resolve_device(cfg.device)
            world = self.world = World.join(device, allowed=self.several_processes)
            device = world.device(device)
            weight_dtype, mixed_precision, precision_text = precision_plan(cfg.dtype, device)
            optimizer_factory(cfg, device)  # an optimizer this machine cannot run
            world.accumulation(cfg.gradient_accumulation, cfg.keep_effective_batch)  # refuses one it cannot share
            if world.size > 1:
                check_precision(mixed_precision)
            check_attention(cfg.attention, device, spec.head_dim, weight_dtype)
            check_quantize(cfg.quantize_base, self.backbone)
            layers = spec_linear_shapes(spec)  # the adapters' targets and rank, from the model's config
            check_rank(layers, resolve_targets(layers, cfg.targets, cfg.target_modules), cfg.rank)
            blocks = spec.num_double + spec.num_single
            check_offload(cfg.offload_blocks, self.backbone, blocks, cfg.quantize_base)
            report = self.dataset = self.dataset or scan_dataset_for(cfg)
            cfg = self._preflight(cfg, spec, device, report)
            checkpointed = checkpointed_count(blocks, cfg.gradient_checkpointing, cfg.checkpoint_blocks)
            check_offload(cfg.offload_blocks, self.backbone, blocks, cfg.quantize_base, checkpointed)
            check_activation_offload(cfg.offload_activations, blocks, checkpointed)
            if world.size > 1 and (cfg.quantize_base != "none" or cfg.compile or cfg.offload_blocks
                                   or cfg.offload_activations):
                # None has run under DDP or FSDP yet (fp8 and 4-bit weights in NCCL broadcasts and
                # FSDP shards, FSDP's hooks in compiled blocks, FSDP's own offload).
                raise ConfigError("--quantize-base, --compile, --offload-blocks and --offload-activations train in "
                                  "one process; leave them out with several GPUs")
        except Exception as e:
            self.events.emit(StatusEvent("failed", str(e), total=cfg.steps))
            self.events.close()
            raise

        resume_info = None
        if self.resume:
            ckpt_path = self.resume_path = ckpt.find_checkpoint(self.resume)
            resume_info = ckpt.load_checkpoint(ckpt_path)
            changed = ckpt.check_resumable(resume_info[0], cfg, spec)
            if changed:
                log.warning("resuming with changed options: %s", ", ".join(changed))
            run_dir = ckpt_path.parent.parent
            start = int(resume_info[0].get("step", 0))
            ckpt.check_not_finished(run_dir, start, cfg)
            if world.is_main:
                ckpt.remove_leftovers(run_dir)  # of writes cut short by a crash or a kill
            self._resumed_from = start
            if not cfg.name:
                cfg.name = run_dir.name
            self._note_world_change(resume_info[0], cfg)
        else:
            cfg.name = cfg.name or default_run_name(spec)
            check_run_name(cfg.name)  # on every process: the main one alone creates the folder
            check_output_folders(cfg)
            # The main process names the folder (a free one); the others write nothing.
            run_dir = world.share(_new_run_dir(Path(cfg.output_dir), cfg.name) if world.is_main else None)
            cfg.name = run_dir.name
        if world.is_main:
            save_yaml(cfg, run_dir / "config.yaml")
            metrics = JsonlMetrics(run_dir / "metrics.jsonl")
            self.events.subscribe(metrics)
            if cfg.tensorboard:
                tb = tensorboard_logger(run_dir / "tensorboard")
                if tb:
                    self.events.subscribe(tb)
        try:
            # The loop reseeds the global RNG (LoRA dropout) every micro-step; fork it so the
            # host process (ComfyUI, a test session) keeps its own random state.
            with (torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
                  attention_implementation(cfg.attention, device)):
                return self._run(cfg, spec, device, weight_dtype, mixed_precision, precision_text, run_dir,
                                 resume_info)
        except TrainingCancelled as e:
            self.events.emit(StatusEvent("cancelled", str(e), step=e.step, total=cfg.steps))
            raise
        except Exception as e:
            error = e
            if isinstance(e, DiskFull) or out_of_space(e):  # named with what survived, wherever it happened
                text = str(e) if isinstance(e, DiskFull) else f"the disk is full: {e}"
                error = DiskFull(f"{text}. {self._last_checkpoint_text(run_dir)}")
            self.events.emit(StatusEvent("failed", str(error), step=self.step, total=cfg.steps))
            if error is e:
                raise
            raise error from None
        finally:
            if self.activation_offload:  # what the last pass left in it, on the GPU and pinned
                self.activation_offload.release()
            self.events.close()

    # ------------------------------------------------------------------
    def _run(self, cfg, spec, device, weight_dtype, mixed_precision, precision_text, run_dir, resume_info):
        started = time.perf_counter()
        log.info("%s on %s: %s", spec.title, device, precision_text)
        self.events.emit(StatusEvent("info", precision_text, total=cfg.steps,
                                     data={"model": spec.title, "family": spec.family}))

        report = self.dataset
        cache = FeatureCache(cfg.cache_dir or Path(cfg.output_dir) / "cache")
        if self.encoder is None:
            raise ConfigError("no text encoder / VAE given to fill the cache; pass --encoders with a FLUX.2 pipeline folder")
        self.events.emit(StatusEvent("caching", f"caching latents and text embeddings of {len(report.items)} images",
                                     total=len(report.items)))

        def caching_progress(i, n, name):
            self.events.emit(StatusEvent("caching", f"cached {name}", step=i, total=n))

        world = self.world
        # Several processes stop together, at a step; a stop asked while they cache waits for it.
        should_stop = self.should_stop if world.size == 1 else None
        try:
            if world.size > 1:  # each process encodes its share, then all read the whole cache
                prepare_cache(report, self.encoder, cache, max_sequence_length=cfg.max_sequence_length,
                              flip=cfg.flip, share=(world.rank, world.size))
                world.barrier()
            data = prepare_cache(report, self.encoder, cache, max_sequence_length=cfg.max_sequence_length,
                                 flip=cfg.flip, on_progress=caching_progress, should_stop=should_stop)
        except self.stop_exceptions:
            raise TrainingCancelled("stopped while caching; the images cached so far are kept for the next run",
                                    0, None) from None
        # Held-out images stay cached (the validation loss reads them) but leave the training data.
        all_data = data
        train_ids, held_ids = split_validation(len(data.samples), cfg.validation_split, cfg.seed)
        if held_ids:
            data = dataclasses.replace(data, samples=[data.samples[i] for i in train_ids])
            log.info("validation: %d image(s) held out of training: %s", len(held_ids),
                     ", ".join(all_data.samples[i].path.name for i in held_ids[:5]))
        preview_texts, decoder = [], None
        if cfg.preview_every:
            make_decoder = getattr(self.encoder, "decoder", None)
            if make_decoder is None:
                log.warning("previews are off: %s has no VAE decoder", type(self.encoder).__name__)
            else:
                preview_texts = [self.encoder.encode_text([p], cfg.max_sequence_length)[0].float().cpu()
                                 for p in preview_prompts(cfg)]
                decoder = make_decoder()
        elif cfg.clip_model:
            log.warning("--clip-model scores preview images, and --preview-every is 0: no CLIP score this run")
        if self.free_encoder:
            self.free_encoder()
        self.encoder = None

        backbone = self.backbone
        # FSDP shards the model from CPU memory: no GPU ever holds all of it.
        home = torch.device("cpu") if self.strategy == "fsdp" else device
        # Offloaded blocks are spread over the checkpointed ones, and never sit on the GPU together.
        offloaded = tuple(offloaded_indices(len(backbone.blocks), cfg))
        placed = dict(offloaded=offloaded) if offloaded else {}
        if cfg.quantize_base != "none":
            backbone.quantize(cfg.quantize_base, home, weight_dtype, **placed)
        backbone.prepare(home, weight_dtype, training_bytes=self.estimate.training_bytes, **placed)
        module = backbone.module
        targets = resolve_targets(backbone.lora_layers(), cfg.targets, cfg.target_modules)
        params = backbone.add_lora(targets, cfg.rank, cfg.alpha, cfg.lora_dropout, seed=cfg.seed)
        for p in params:  # trainable weights in float32 whatever the base dtype
            p.data = p.data.to(device=home, dtype=torch.float32)
        if resume_info:  # before the model is spread over processes: every process loads the whole adapter
            expected = {k: v.shape for k, v in backbone.lora_state_dict().items()}
            ckpt.check_adapter(self.resume_path, resume_info[1], expected)
            backbone.load_lora_state_dict({k: v.to(home) for k, v in resume_info[1].items()})
        if cfg.gradient_checkpointing:
            backbone.enable_gradient_checkpointing(cfg.checkpoint_blocks)
        kept_out = activation_offload_indices(len(backbone.blocks), cfg)
        if kept_out:
            self.activation_offload = ActivationOffload(device, resident=[*module.parameters(), *module.buffers()],
                                                        blocks=kept_out)
            backbone.offload_activations(kept_out, self.activation_offload)
            log.info("activations of %d blocks (%s) kept in %sCPU memory", len(kept_out),
                     ", ".join(map(str, kept_out)), "pinned " if device.type == "cuda" else "")
        eager_reason = (compile_unavailable(device) or backbone.compile_blocks()) if cfg.compile else None
        if eager_reason:
            log.warning("compile is off for this run: %s", eager_reason)
            self.events.emit(StatusEvent("info", f"compile is off for this run: {eager_reason}", total=cfg.steps))
        if offloaded:
            backbone.offload(list(offloaded), device)
        module.train()

        accumulation = world.accumulation(cfg.gradient_accumulation, cfg.keep_effective_batch)
        accelerator = make_accelerator(mixed_precision, accumulation, device, world.size)
        train_module = module
        if world.size > 1:
            train_module = self._distribute(accelerator)
            params = [p for p in module.parameters() if p.requires_grad]  # FSDP replaces them with shards
            if self.strategy == "fsdp" and device.type == "cuda":
                torch.cuda.empty_cache()  # a model that came from this GPU left its blocks cached
        optimizer = build_optimizer(cfg, params, device)
        self.average = AdapterAverage(params, cfg.ema_decay, module) if cfg.ema_decay else None
        from diffusers.optimization import get_scheduler

        # Stepped by the loop once per optimizer step (accelerate's wrapper would step it
        # once per process and step).
        lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                     num_training_steps=cfg.steps, num_cycles=cfg.lr_num_cycles)
        optimizer = accelerator.prepare(optimizer)

        watcher = self.watcher = RunWatcher(
            cfg, spec, backbone, all_data, held_ids or train_ids, device=device, weight_dtype=weight_dtype,
            autocast=accelerator.autocast, world=world, events=self.events, run_dir=run_dir, decoder=decoder,
            preview_texts=preview_texts, negative_text=all_data.cache.load("text", all_data.empty_text_key))
        step, micro_step, losses = 0, 0, []
        prefetched = None  # the next micro-batch's inputs (or the error preparing them raised)
        if resume_info:
            info, adapter, state = resume_info
            configured = [{k: g[k] for k in _CONFIGURED if k in g} for g in optimizer.param_groups]
            optimizer.load_state_dict(shard_like(state["optimizer"], params))
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            keep_configured(optimizer, lr_scheduler, configured)
            step, micro_step, losses = int(state["step"]), int(state["micro_step"]), list(state["losses"])
            self.step = step
            watcher.load_state(state)
            if self.average and "ema" in state:
                self.average.load_state(state["ema"], cfg.ema_decay)
            elif self.average:
                log.info("the checkpoint keeps no average of the LoRA weights: it starts from step %d's weights", step)

        plan = EpochPlan(data, cfg.repeats, cfg.batch_size, cfg.seed)
        console = None
        if self.console and world.is_main:
            from .events import ConsoleProgress

            console = ConsoleProgress(cfg.steps, initial=step)
            self.events.subscribe(console)
        processes = (f"; {world.size} processes ({self.strategy.upper()}): effective batch {cfg.batch_size} x "
                     f"{accumulation} x {world.size} = {cfg.batch_size * accumulation * world.size}"
                     if world.size > 1 else "")
        self.events.emit(StatusEvent("training", f"training {len(params)} LoRA tensors on {len(targets)} layers, "
                                     f"{len(data.samples)} images, {plan.batches_per_epoch} batches per epoch"
                                     + processes + ("; compile is off" if eager_reason else ""),
                                     step=step, total=cfg.steps))
        if processes:
            log.info("%s", processes[2:])
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        state = dict(module=module, optimizer=optimizer, lr_scheduler=lr_scheduler, accelerator=accelerator,
                     targets=targets, data=data, report=report, run_dir=run_dir, device=device,
                     weight_dtype=weight_dtype, spec=spec, accumulation=accumulation)
        smoother = Smoother(cfg.smoothing)
        smoothed_all = [smoother.add(x) for x in losses]  # history of a resumed run
        if resume_info:  # with the earlier losses, so a live chart can draw the whole run
            done = "; the run had reached its last step, so only its LoRA files are written" if step == cfg.steps else ""
            self.events.emit(StatusEvent("info", f"resumed from step {step}{done}", step=step, total=cfg.steps,
                                         data={"losses": list(losses), "smoothed_losses": list(smoothed_all),
                                               "validation": [[s, v] for s, v in watcher.history]}))
        checkpoints = []
        # Where the optimizer can skip an update on the GPU, each step's loss is read a step late,
        # while the GPU runs the next one (see loss_reader); otherwise at once, and several processes
        # agree on it before any of them steps.
        late = LateLossReader(optimizer, device, world.size) if skips_updates_on_device(optimizer) else None
        stop_agreed = False  # several processes: a stop one of them was asked, as read with a step's loss
        unreported: dict[int, _PendingReport] = {}  # step -> what its report needs, until it is reported
        step_time_avg = None

        def step_done(done: int, loss_value: float, now: float, where: str = "") -> None:
            """A finished step: checked, logged and sent to the listeners."""
            nonlocal step_time_avg
            if not math.isfinite(loss_value):  # the update was skipped on the GPU (late) or never made
                optimizer.zero_grad(set_to_none=True)
                if late:
                    late.drop()
                raise self._diverged(done, f"{loss_value}{where}", run_dir)
            self.step = done
            losses.append(loss_value)
            smoothed_all.append(smoother.add(loss_value))
            info = unreported.pop(done)
            dt = now - info.started
            step_time_avg = dt if step_time_avg is None else 0.9 * step_time_avg + 0.1 * dt
            self.events.emit(StepEvent(
                step=done, total=cfg.steps, loss=loss_value, smoothed_loss=smoothed_all[-1],
                lr=info.lr, seconds_per_step=dt,
                eta_seconds=step_time_avg * (cfg.steps - done), peak_memory_bytes=peak_memory_bytes(device),
                epoch=info.epoch))
            for hook in self.step_hooks:
                hook(done, self)

        def report_late(before: int | None = None) -> None:
            """Read the losses still on the GPU: of every step, or of the steps before `before`.

            Every process reads at the same points of the loop (each step, and the checkpoints and
            evaluations, which are the same for all), so they stop at the same step."""
            nonlocal stop_agreed
            while late and (oldest := late.oldest()) is not None and (before is None or oldest < before):
                read = late.read()
                stop_agreed = stop_agreed or read.stop_asked
                where = f" (on {read.not_finite_on} of the {world.size} processes)" if world.size > 1 else ""
                step_done(read.step, read.loss, unreported[read.step + 1].started if read.step + 1 in unreported
                          else time.perf_counter(), where)

        def report_late_if_possible() -> None:
            """On the way out with another error: report the steps that did finish, if the GPU can still tell."""
            try:
                report_late()
            except Exception as e:  # noqa: BLE001 - the error on the way out is the one raised
                log.warning("while stopping on another error: %s", e)

        if step == 0:
            self._watch(0, False, device)  # where the validation loss and previews start from
        while step < cfg.steps:
            unreported[step + 1] = _PendingReport(started=time.perf_counter())
            micro_losses = []
            step_start = micro_step
            try:
                for k in range(accumulation):
                    # The step's micro-batches are numbered as one process would number them;
                    # process r of n takes every n-th, so n processes train what one would.
                    index = micro_step + k * world.size + world.rank
                    # Prepared during the micro-step before, except for a run's (or resumed run's) first.
                    inputs, prefetched = prefetched or self._prefetch(index, plan, data, device, weight_dtype), None
                    if isinstance(inputs, Exception):
                        raise inputs
                    assert inputs.index == index, f"prepared micro-step {inputs.index} for {index}"
                    unreported[step + 1].epoch = inputs.epoch
                    with accelerator.accumulate(train_module), attention_kernels(cfg.attention, device):
                        loss = self._micro_step(inputs, accelerator)
                        accelerator.backward(loss)
                        if not (step + 1 == cfg.steps and k + 1 == accumulation):  # not the run's last
                            prefetched = self._prefetch(index + world.size, plan, data, device, weight_dtype)
                        if late:
                            late.add(loss)
                            if accelerator.sync_gradients:  # this micro-batch's optimizer.step() updates
                                late.agree()
                        else:
                            # Checked after backward is queued, and before any weight changes.
                            loss_value = loss.item()
                            finite = math.isfinite(loss_value)
                            if world.size > 1:  # every process stops, or none
                                bad = world.sum([0.0 if finite else 1.0], device)[0]
                                if bad and finite:
                                    loss_value = f"not finite on {int(bad)} of the {world.size} processes"
                                finite = bad == 0
                            if not finite:
                                optimizer.zero_grad(set_to_none=True)
                                raise self._diverged(step + 1, loss_value, run_dir)
                            micro_losses.append(loss_value)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        optimizer.step()
                        if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                            lr_scheduler.step()
                            if self.average:
                                self.average.step()
                        optimizer.zero_grad(set_to_none=True)
                micro_step += accumulation * world.size
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                report_late_if_possible()
                raise OutOfMemory(self._oom_message(device)) from None
            except self.stop_exceptions:
                optimizer.zero_grad(set_to_none=True)  # the interrupted step is redone on resume
                report_late()  # the steps before it are in the checkpoint
                path = self._save_checkpoint(state, step, step_start, losses)
                self.events.emit(StatusEvent("checkpoint", f"checkpoint at step {step}: {path}", step=step,
                                             total=cfg.steps, data={"path": str(path)}))
                raise TrainingCancelled(f"stopped during step {step + 1} of {cfg.steps}; checkpoint {path} holds "
                                        "the run: resume from it to continue", step, str(path)) from None
            except RuntimeError as e:
                if world.size > 1 and lost_a_process(e):
                    raise ProcessLost(self._lost_message(step + 1, run_dir, e)) from None
                report_late_if_possible()
                raise
            except Exception:
                report_late_if_possible()
                raise
            step += 1
            last = step == cfg.steps
            unreported[step].lr = float(lr_scheduler.get_last_lr()[0])
            if late:
                # Several processes send a stop asked of any of them (Ctrl-C) with the step's loss.
                asked = world.size > 1 and not last and self.should_stop()
                self._together(lambda: late.end_step(step, asked), step, run_dir)
                report_late(before=step)  # the step before this one, while the GPU runs this one
            else:
                total = self._sum([sum(micro_losses)], device, step, run_dir)[0]
                step_done(step, total / (len(micro_losses) * world.size), time.perf_counter())

            if last or self.step_hooks or self.watcher.due(step, last):
                report_late()  # the weights checked before they are evaluated; hooks see their own step
            self._watch(step, last, device, state, micro_step, losses)
            if world.size == 1:
                stop = not last and self.should_stop()
            elif late:  # as read with the losses: the step after the one it was asked in, or a checkpoint's
                stop = not last and stop_agreed
            else:  # a stop asked of any process stops all of them
                stop = not last and self._sum([float(self.should_stop())], device, step, run_dir)[0] > 0
            if last or stop or (cfg.save_every and step % cfg.save_every == 0):
                report_late()  # a checkpoint holds every loss up to its step
                path = self._save_checkpoint(state, step, micro_step, losses)
                checkpoints.append(path)
                self.events.emit(StatusEvent("checkpoint", f"checkpoint at step {step}: {path}", step=step,
                                             total=cfg.steps, data={"path": str(path)}))
                # A stop asked while the checkpoint was written ends the run on it, not a step later.
                asked_since = self.should_stop() if world.size == 1 else late is not None and stop_agreed
                stop = stop or (not last and asked_since)
            if stop:
                raise TrainingCancelled(f"stopped at step {step} of {cfg.steps}; checkpoint {checkpoints[-1]} "
                                        "holds the run: resume from it to continue", step, str(checkpoints[-1]))

        result = self._finish(state, losses, smoothed_all, started, checkpoints)
        self.events.emit(StatusEvent("finished", f"LoRA written to {result.lora_path}", step=step, total=cfg.steps,
                                     data={"lora_path": str(result.lora_path)}))
        return result

    # ------------------------------------------------------------------
    def _preflight(self, cfg: TrainConfig, spec: ModelSpec, device: torch.device, report: DatasetReport) -> TrainConfig:
        """Estimate the run's peak memory (adjusting the settings under `auto`) and refuse one that cannot fit."""
        available = device_available_memory(device) if self.available_memory == "device" else self.available_memory
        available = self.world.smallest(available, device)  # one plan for every process
        if self.resume and cfg.quick_preset == "auto":
            cfg = self._batch_as_checkpointed(cfg)
        self.strategy, why, plan = plan_processes(spec, cfg, self.backbone.memory_placement(), available,
                                                  self.world.size, list(report.bucket_counts),
                                                  resuming=bool(self.resume))
        if why:
            log.info("%s", why)
            self.events.emit(StatusEvent("info", why, total=cfg.steps))
        if plan.reason:
            log.info("%s", plan.reason)
            self.events.emit(StatusEvent("info", plan.reason, total=cfg.steps))
        self.cfg = cfg = plan.cfg
        self.estimate = plan.estimate
        log.info("memory: %s", plan.estimate.summary().replace("\n", "; "))
        self.events.emit(StatusEvent("info", plan.estimate.summary(), total=cfg.steps,
                                     data={"estimate_bytes": plan.estimate.total, "available_bytes": available}))
        if cfg.memory_check:
            plan.estimate.check()
        return cfg

    def _batch_as_checkpointed(self, cfg: TrainConfig) -> TrainConfig:
        """A resumed `auto` run keeps the batch layout it was checkpointed with (it sets the data order)."""
        try:
            saved = ckpt.checkpoint_info(ckpt.find_checkpoint(self.resume))["config"]
            return dataclasses.replace(cfg, batch_size=int(saved["batch_size"]),
                                       gradient_accumulation=int(saved["gradient_accumulation"]))
        except (OSError, KeyError, ValueError, TypeError):
            return cfg  # the resume itself names what is wrong with the checkpoint

    def _distribute(self, accelerator) -> torch.nn.Module:
        """The backbone's model spread over the processes (DDP or FSDP, as the preflight chose)."""
        distribute = getattr(self.backbone, "distribute", None)
        if distribute is None:
            raise ConfigError(f"{type(self.backbone).__name__} trains in one process only; several processes "
                              "need the engine's diffusers model (python -m flux2_train train --num-gpus N)")
        return distribute(accelerator, self.strategy)

    def _note_world_change(self, info: dict, cfg: TrainConfig) -> None:
        """Say how a resume on another number of processes changes the effective batch."""
        before, now = int(info.get("processes", 1)), self.world.size
        if before == now:
            return
        saved = info.get("config", {})
        old = int(saved.get("batch_size", cfg.batch_size)) * int(info.get("accumulation_per_process",
                                                                         saved.get("gradient_accumulation", 1))) * before
        new = cfg.batch_size * self.world.accumulation(cfg.gradient_accumulation, cfg.keep_effective_batch) * now
        text = f"the checkpoint was written by {before} process(es); resuming on {now}"
        if not self.world.is_main:
            return
        if old == new:
            log.info("%s, with the same effective batch (%d)", text, new)
            return
        per_process, rest = divmod(old, cfg.batch_size * now)
        keep = (f"; --gradient-accumulation {per_process * now} --keep-effective-batch keeps it"
                if per_process and not rest else "")
        log.warning("%s: the effective batch changes from %d to %d%s", text, old, new, keep)

    def _micro_step(self, inputs: MicroBatch, accelerator) -> torch.Tensor:
        """The loss of one micro-batch; its backward pass is the caller's."""
        torch.manual_seed(inputs.dropout_seed)  # dropout masks of this micro-step
        with accelerator.autocast():
            pred = self.backbone.predict(inputs.noisy, inputs.sigmas.to(inputs.noisy.dtype), inputs.text,
                                         guidance=self.cfg.guidance_scale)
        return flow_loss(pred, inputs.target, inputs.sigmas, self.cfg.loss_weighting)

    def _micro_batch(self, micro_step, plan, data, device, weight_dtype) -> MicroBatch:
        """A micro-batch's inputs on `device`: cached latents and text, noise and timesteps from its own seed."""
        cfg = self.cfg
        epoch, batch = plan.batch(micro_step)
        g = _micro_generator(cfg.seed, micro_step)
        dropout_seed = int(torch.randint(2**62, (1,), generator=g))
        latents, texts = [], []
        for i in batch:
            s = data.samples[i]
            check_unchanged(s)
            flip = len(s.latent_keys) > 1 and bool(torch.rand(1, generator=g) < 0.5)
            drop = cfg.caption_dropout > 0 and bool(torch.rand(1, generator=g) < cfg.caption_dropout)
            latents.append(data.cache.load("latents", s.latent_keys[1 if flip else 0]))
            texts.append(data.cache.load("text", data.empty_text_key if drop else s.text_key))
        x0 = torch.stack(latents).float()
        text = torch.stack(texts)
        noise = torch.randn(x0.shape, generator=g)
        image_tokens = x0.shape[-1] * x0.shape[-2]
        sigmas = sample_sigmas(len(batch), sampling=cfg.timestep_sampling, shift=cfg.timestep_shift,
                               image_tokens=image_tokens, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                               mode_scale=cfg.mode_scale, generator=g)
        if device.type == "cuda":  # pinned: the copies queue behind the GPU's work instead of waiting for it
            x0, noise, sigmas, text = (t.pin_memory() for t in (x0, noise, sigmas, text))
        x0, noise, sigmas = (t.to(device, non_blocking=True) for t in (x0, noise, sigmas))
        return MicroBatch(micro_step, epoch, dropout_seed, noisy_latents(x0, noise, sigmas).to(weight_dtype), sigmas,
                          text.to(device, weight_dtype, non_blocking=True), velocity_target(x0, noise))

    def _prefetch(self, micro_step, plan, data, device, weight_dtype) -> MicroBatch | Exception:
        """A micro-batch's inputs, prepared while the GPU runs the backward pass of the one before.

        An error is kept for the micro-step that needs these inputs: it surfaces where it would
        have without the prefetch, after the steps before it finished (and checkpointed).
        """
        try:
            return self._micro_batch(micro_step, plan, data, device, weight_dtype)
        except Exception as e:  # noqa: BLE001 - raised again where the inputs are used
            return e

    def _watch(self, step: int, last: bool, device, st=None, micro_step: int = 0, losses=()) -> None:
        """The validation loss and previews due at `step`; a host's stop inside them (ComfyUI's
        Cancel) ends the run with a checkpoint of `step`, as between steps."""
        try:
            with self._averaged() if self.watcher.due(step, last) else nullcontext():
                self.watcher.after_step(step, last)
            history = self.watcher.history
            if history and history[-1][0] == step and not math.isfinite(history[-1][1]):
                # Before this step's checkpoint: the weights that gave it are not kept as good.
                raise self._diverged(step, history[-1][1], st and st["run_dir"], "validation loss", bad_weights_from=step)
        except self.stop_exceptions:
            path = self._save_checkpoint(st, step, micro_step, losses) if step > 0 else None
            raise TrainingCancelled(f"stopped at step {step} of {self.cfg.steps}"
                                    + (f"; checkpoint {path} holds the run: resume from it to continue" if path
                                       else " (before training)"), step, str(path) if path else None) from None
        except torch.OutOfMemoryError:
            raise OutOfMemory(self._oom_message(device) + " (It ran out in the validation loss or the previews: "
                              "--preview-resolution, --validate-every 0 or --preview-every 0 lower that part.)") from None

    def _save_checkpoint(self, st, step, micro_step, losses) -> Path:
        cfg = self.cfg
        # Every process takes part in gathering sharded (FSDP) weights and state; the main one writes.
        adapter = self.backbone.lora_state_dict()  # the weights to train on
        with self._averaged():
            lora_weights = self.backbone.lora_state_dict() if self.average else adapter  # the LoRA file's
        optimizer_state = whole_state(st["optimizer"].state_dict())
        average = self.average.state() if self.average else None
        if not self.world.is_main:
            return ckpt.checkpoint_dir(st["run_dir"], step)
        if self._resumed_from is not None:
            # The run's later checkpoints hold the path this resume left; from its first checkpoint on, the
            # run's newest is its own (a resume that failed before saving one leaves them as they were).
            for aside in ckpt.set_aside_from(st["run_dir"], self._resumed_from + 1, "superseded"):
                log.warning("resumed from step %d: the later checkpoint is set aside as %s", self._resumed_from,
                            aside.name)
            self._resumed_from = None
        meta = lora_metadata(cfg=cfg, spec=st["spec"], steps=step, image_count=len(st["report"].items),
                             fmt=cfg.lora_format, targets=st["targets"])
        state = {
            "step": step,
            "micro_step": micro_step,
            "losses": list(losses),
            "optimizer": optimizer_state,
            "lr_scheduler": st["lr_scheduler"].state_dict(),
            **self.watcher.state(),
            **({"ema": average} if average else {}),
        }
        info = {"step": step, "config": cfg.to_dict(), "model": st["spec"].to_dict(), "targets": st["targets"],
                "processes": self.world.size, "accumulation_per_process": st["accumulation"],
                "multi_gpu": self.strategy,
                "saved": _dt.datetime.now().isoformat(timespec="seconds")}
        return ckpt.save_checkpoint(
            st["run_dir"], step, adapter=adapter, state=state, info=info, keep=cfg.keep_checkpoints,
            best_step=self.watcher.best[0] if self.watcher.best else None,
            write_lora=lambda p: save_lora(p, lora_weights, rank=cfg.rank, alpha=cfg.alpha,
                                                         fmt=cfg.lora_format, metadata=meta))

    def _finish(self, st, losses, smoothed, started, checkpoints) -> TrainResult:
        cfg, run_dir = self.cfg, st["run_dir"]
        with self._averaged():
            adapter = self.backbone.lora_state_dict()
        n_images = len(st["report"].items)
        paths = []
        for i, fmt in enumerate([cfg.lora_format] + [f for f in cfg.extra_formats if f != cfg.lora_format]):
            name = f"{cfg.name}.safetensors" if i == 0 else f"{cfg.name}.{fmt}.safetensors"
            if not self.world.is_main:
                paths.append(run_dir / name)
                continue
            meta = lora_metadata(cfg=cfg, spec=st["spec"], steps=len(losses), image_count=n_images, fmt=fmt,
                                 targets=st["targets"])
            _keep_earlier_lora(run_dir / name)
            paths.append(save_lora(run_dir / name, adapter, rank=cfg.rank, alpha=cfg.alpha, fmt=fmt, metadata=meta))
        if self.world.is_main:
            history = self.watcher.history
            save_loss_plot(run_dir / "loss.png", list(range(1, len(losses) + 1)), losses, smoothed,
                           title=f"{cfg.name}: {st['spec'].title}, rank {cfg.rank}",
                           val_steps=[s for s, _ in history] or None, val_losses=[v for _, v in history] or None)
        previews = self.watcher.latest_round()
        result = TrainResult(
            run_dir=run_dir, lora_path=paths[0], extra_lora_paths=paths[1:], steps=len(losses), losses=losses,
            smoothed=smoothed, targets=st["targets"], spec=st["spec"], seconds=time.perf_counter() - started,
            peak_memory_bytes=peak_memory_bytes(st["device"]), dataset=st["report"], checkpoints=checkpoints,
            adapter=adapter, validation=list(self.watcher.history), previews=previews,
            preview_images=list(self.watcher.preview_images) or [load_png(p) for p in previews])
        result.summary = summarize(result, cfg)
        if self.world.is_main:
            atomic_write_text(run_dir / "summary.txt", result.summary)
        return result

    def _averaged(self) -> AbstractContextManager:
        """With --ema-decay, the average in the LoRA weights while they are evaluated or saved."""
        return self.average.applied() if self.average else nullcontext()

    # ------------------------------------------------------------------
    @staticmethod
    def _last_checkpoint_text(run_dir) -> str:
        last = ckpt.list_checkpoints(run_dir)
        return (f"The last checkpoint, {last[-1]}, is intact: {_resume_hint(run_dir)}" if last
                else "No checkpoint had been written yet")

    def _diverged(self, step, value, run_dir, what: str = "loss", bad_weights_from: int | None = None):
        """The error for a NaN or infinite `what` at `step`. `bad_weights_from`: the first step whose weights
        gave it. A training loss at step s comes from the weights after step s - 1, so that step's
        checkpoint would give it again on resume: such checkpoints are set aside, and a resume of the
        run starts from the last good one."""
        bad_from = step - 1 if bad_weights_from is None else bad_weights_from
        good, aside = [], []
        if run_dir:
            good = [c for c in ckpt.list_checkpoints(run_dir) if ckpt.checkpoint_step(c) < bad_from]
            if self.world.is_main:
                aside = ckpt.set_aside_from(run_dir, bad_from, "diverged")
        keep = (f"the last good checkpoint is {good[-1]}: {_resume_hint(run_dir)}" if good
                else "no checkpoint was written before it")
        if aside:
            keep += f" (the later ones, whose weights gave it, are set aside as {', '.join(p.name for p in aside)})"
        fp16 = ", or use --dtype bfloat16 instead of float16" if self.cfg.dtype == "float16" else ""
        return TrainingDiverged(f"the {what} became {value} at step {step}; training stopped and {keep}. Lower "
                                f"--learning-rate (now {self.cfg.learning_rate:g}), keep --max-grad-norm on{fp16}",
                                step)

    def _sum(self, values, device, step, run_dir) -> list[float]:
        """`World.sum`, naming a process that is gone."""
        return self._together(lambda: self.world.sum(values, device), step, run_dir)

    def _together(self, collective: Callable[[], Any], step, run_dir) -> Any:
        """`collective()`, a call every process makes, naming a process that is gone."""
        try:
            return collective()
        except RuntimeError as e:
            if self.world.size > 1 and lost_a_process(e):
                raise ProcessLost(self._lost_message(step, run_dir, e)) from None
            raise

    def _lost_message(self, step, run_dir, error) -> str:
        last = ckpt.list_checkpoints(run_dir)
        keep = (f"the last checkpoint, {last[-1]}, is intact: {_resume_hint(run_dir)}, on any number "
                "of processes" if last else "no checkpoint was written before it")
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return (f"another process of this {self.world.size}-process run stopped during step {step} (its own "
                f"error is above, or it was killed); {keep}. ({first})")

    def _oom_message(self, device) -> str:
        cfg = self.cfg
        card = (f" ({torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB card)"
                if device.type == "cuda" else "")
        tips = []
        placement = dataclasses.replace(self.backbone.memory_placement(), processes=self.world.size)
        if not cfg.gradient_checkpointing:
            tips.append("--gradient-checkpointing")
        elif cfg.checkpoint_blocks:
            tips.append("--checkpoint-blocks 0 (all blocks)" + (" --offload-activations 0" if cfg.offload_activations
                                                                else ""))
        blocks = len(self.backbone.blocks)
        room = activation_offload_room(blocks, checkpointed_count(blocks, cfg.gradient_checkpointing,
                                                                  cfg.checkpoint_blocks))
        if not cfg.offload_activations and room > ACTIVATIONS_IN_FLIGHT and placement.offloads_activations(cfg):
            tips.append("--offload-activations N (N blocks' activations in CPU memory)")
        if placement.offloads_blocks(cfg):
            tips.append("--offload-blocks N (N blocks' weights in CPU memory)")
        if cfg.quantize_base in ("none", "int8") and hasattr(self.backbone, "quantize"):
            tips.append("--quantize-base fp8" if cfg.quantize_base == "none" and cfg.dtype == "bfloat16"
                        else "--quantize-base nf4")
        if cfg.batch_size > 1:
            tips.append(f"--batch-size 1 --gradient-accumulation {cfg.batch_size * cfg.gradient_accumulation}")
        if cfg.resolution > 512:
            tips.append(f"--resolution {max(512, cfg.resolution * 3 // 4 // 16 * 16)}")
        if cfg.optimizer == "adamw":
            tips.append("--optimizer adamw8bit")
        if cfg.rank > 16:
            tips.append("--rank 16")
        return (f"out of GPU memory{card} at resolution {cfg.resolution}, batch {cfg.batch_size}, "
                f"rank {cfg.rank}, dtype {cfg.dtype}, gradient checkpointing "
                f"{'on' if cfg.gradient_checkpointing else 'off'}; try " + (", ".join(tips) or "a smaller model")
                + ". The last checkpoint is intact; resume from it with the new settings.")


def _resume_option(run_dir: Path) -> str:
    return f"--resume {shlex.quote(str(run_dir))}"  # pasted into a shell as it is


def _resume_hint(run_dir: Path) -> str:
    return f"resume from it ({_resume_option(run_dir)}; in ComfyUI, the training node's resume input {Path(run_dir).name})"


def summarize(result: TrainResult, cfg: TrainConfig) -> str:
    first = sum(result.losses[:5]) / max(1, len(result.losses[:5]))
    last = sum(result.losses[-5:]) / max(1, len(result.losses[-5:]))
    lines = [
        f"run          {result.run_dir}",
        f"model        {result.spec.title}",
        f"LoRA         {result.lora_path}  ({cfg.lora_format} format, rank {cfg.rank}, alpha {cfg.alpha:g}, "
        f"{len(result.targets)} layers" + (f"; the average of its weights, decay {cfg.ema_decay:g}" if cfg.ema_decay
                                           else "") + ")",
    ]
    lines += [f"also         {p}" for p in result.extra_lora_paths]
    lines += [
        f"data         {len(result.dataset.items)} images, buckets "
        + ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(result.dataset.bucket_counts.items())),
        f"steps        {result.steps} in {result.seconds:.1f} s; loss {first:.4f} (first 5) -> {last:.4f} (last 5)",
        f"peak memory  {result.peak_memory_bytes / 2**30:.2f} GiB",
    ]
    if result.best_validation:
        (best_step, best), (last_step, last_val) = result.best_validation, result.validation[-1]
        kept = ckpt.nearest_checkpoint(ckpt.list_checkpoints(result.run_dir), best_step)
        lines.append(f"validation   best {best:.4f} at step {best_step} (step {last_step}: {last_val:.4f})"
                     + (f"; the checkpoint nearest it, {kept.name}, is kept" if kept else ""))
    if result.previews:
        lines.append(f"previews     {result.previews[0].parent}  ({len(result.previews)} per round)")
    lines += [
        f"loss curve   {result.run_dir / 'loss.png'}",
        f"metrics      {result.run_dir / 'metrics.jsonl'}",
        f"checkpoints  {result.run_dir / ckpt.CHECKPOINTS}  (resume: {_resume_option(result.run_dir)})",
    ]
    return "\n".join(lines) + "\n"
