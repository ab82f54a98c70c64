"""Headless entry point: `python -m flux2_train train|demo ...` (also the `flux2-train` script)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .config import QUICK_PRESETS, SUBJECT_PRESETS, TrainConfig, resolve_config, save_yaml
from .errors import ConfigError, Flux2TrainError, TrainingCancelled
from .memory import ALLOCATORS, HOSTS, WEIGHT_FORMATS

log = logging.getLogger("flux2_train")

_HIDDEN_FIELDS = {"subject_preset", "quick_preset"}


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, with the field's own help text; default None = not given."""
    for f in fields(TrainConfig):
        if f.name in _HIDDEN_FIELDS:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default!r})".replace("%", "%%")
        kw = dict(dest=f.name, default=None, help=help_text)  # None: not given (the help says the real default)
        if f.metadata.get("choices"):
            kw["choices"] = [c for c in f.metadata["choices"] if c]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            sep = f.metadata["separator"]
            parser.add_argument(flag, type=lambda s, sep=sep: [x.strip() for x in s.split(sep) if x.strip()],
                                metavar=f"A{sep}B{sep}...", **kw)
        else:
            parser.add_argument(flag, type=type(default), **kw)


def _gib(allow_zero: bool):
    """An argparse type: a finite number of GiB, positive (or zero where allowed)."""
    import math

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{text} GiB: give a finite number above 0")
        return value

    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Says an option's default, where it has one: no "(default: None)" on an option that is off unless given."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2_train", description="FLUX.2 [dev] / [klein] LoRA training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train a LoRA on an image folder.",
                           formatter_class=_HelpFormatter)
    train.add_argument("--preset", choices=SUBJECT_PRESETS, help="Subject preset: sets defaults for the subject.")
    train.add_argument("--quick", choices=QUICK_PRESETS,
                       help="Quick preset: fast, quality, low_vram, or auto (schedule from the dataset, memory "
                            "settings from the GPU).")
    train.add_argument("--config", help="YAML file of options (explicit options win).")
    train.add_argument("--resume", help="Run folder (or one of its checkpoints) to continue.")
    train.add_argument("--save-config", help="Write the resolved config to this YAML file and exit.")
    train.add_argument("--num-gpus", type=int, default=1,
                       help="Train on this many processes, one per GPU (with --device cpu: CPU processes): "
                            "starts `accelerate launch` with this command.")
    _add_config_options(train)

    est = sub.add_parser("estimate", help="Peak GPU memory of a run: breakdown, what to change, what fits which card.",
                         formatter_class=_HelpFormatter)
    est.add_argument("--preset", choices=SUBJECT_PRESETS, help="Subject preset: sets defaults for the subject.")
    est.add_argument("--quick", choices=QUICK_PRESETS, help="Quick preset (auto: also shows what it would pick).")
    est.add_argument("--config", help="YAML file of options (explicit options win).")
    est.add_argument("--weights", choices=sorted(WEIGHT_FORMATS),
                     help="How the frozen weights are stored (default: as in --model's file, else --dtype).")
    est.add_argument("--host", choices=HOSTS, default="engine",
                     help="engine: this CLI (diffusers); comfyui: the ComfyUI training node (can offload weights).")
    est.add_argument("--allocator", choices=ALLOCATORS,
                     help="ComfyUI's allocator: async (cudaMallocAsync, its default) or native (--disable-cuda-malloc).")
    est.add_argument("--offload-gb", type=_gib(allow_zero=True), default=0.0,
                     help="GiB (2^30 bytes) of frozen weights kept in CPU memory; --host comfyui only.")
    est.add_argument("--gpu-memory", type=_gib(allow_zero=False),
                     help="GiB (2^30 bytes) the GPU gives the run (default: this machine's GPU, if any).")
    est.add_argument("--num-gpus", type=int, default=1,
                     help="Estimate per GPU for a run on this many (engine only): DDP or FSDP as --multi-gpu says.")
    _add_config_options(est)
    for action in est._actions:  # --model here also takes a name: dev, klein-4b, klein-9b
        if action.dest == "model":
            action.help = "dev, klein-4b, klein-9b, or a FLUX.2 transformer file or diffusers folder."

    runs = sub.add_parser("runs", help="The runs of an output folder as a table; compare two; save one's options as a preset.")
    runs.add_argument("--output-dir", default="runs", help="Folder holding the run folders.")
    runs_sub = runs.add_subparsers(dest="runs_command")
    compare = runs_sub.add_parser("compare", help="Two runs' option differences, and their curves in one PNG.")
    compare.add_argument("a", help="Run name (in --output-dir) or run folder.")
    compare.add_argument("b", help="Run name (in --output-dir) or run folder.")
    compare.add_argument("--out", help="PNG of the curves (default: <output-dir>/compare-A-B.png).")
    preset = runs_sub.add_parser("save-preset", help="Write a run's training options to a YAML file for train --config.")
    preset.add_argument("run", help="Run name (in --output-dir) or run folder.")
    preset.add_argument("file", help="YAML file to write.")

    demo = sub.add_parser("demo", help="Train the tiny built-in model on the bundled sample images (CPU, < 1 min).")
    demo.add_argument("--steps", type=int, default=120, help="Training steps.")
    demo.add_argument("--output-dir", default="runs", help="Where the demo run folder goes.")
    demo.add_argument("--device", default="cpu", help="Device (the tiny model is fastest on the CPU).")
    return parser


def _install_sigint(flag: dict) -> None:
    """First Ctrl-C: checkpoint and stop after this step. Second: stop at once.

    SIGTERM (a launcher stopping its processes, a cluster preempting the job) asks for the
    same checkpoint and stop, and never aborts: a launcher sends it after Ctrl-C too.
    """

    def handler(signum, frame):
        if flag.get("stop"):
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        flag["stop"] = True
        print("\nstopping after this step (a checkpoint is written); press Ctrl-C again to abort at once",
              file=sys.stderr)

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _overrides(args: argparse.Namespace) -> dict:
    return {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in _HIDDEN_FIELDS}


def _resolve(args: argparse.Namespace, config_file=None, dataset_required: bool = False, check_places: bool = True):
    """The config, the model's spec (headers only), and the dataset's scan when it names one, or
    always with `dataset_required` (the scan names what is wrong: no folder, no images, ...).

    The scan gives the buckets for the estimate and the image count for the `auto` schedule.
    """
    from .data import scan_dataset_for
    from .encoders import pipeline_class
    from .model import spec_for

    overrides = _overrides(args)
    cfg = resolve_config(args.preset, args.quick, config_file, overrides)
    if not cfg.model:
        raise ConfigError("--model is required: a FLUX.2 file or diffusers folder"
                          + (" (or dev, klein-4b, klein-9b)" if args.command == "estimate" else ""))
    if args.command == "train":
        _refuse_size_name(cfg.model)
    spec, stored = spec_for(cfg.model)
    if args.command == "train":  # the text encoder and VAE come from a pipeline folder
        pipeline_class(cfg.encoders or cfg.model)
        if check_places:
            _check_run_places(cfg)
    report = scan_dataset_for(cfg) if cfg.dataset or dataset_required else None
    if report and cfg.quick_preset == "auto":
        cfg = resolve_config(args.preset, args.quick, config_file, overrides, image_count=len(report.items))
    return cfg, report, spec, stored


def _check_run_places(cfg) -> None:
    """Where the run would go, before anything loads: its device, name, and folders."""
    from .config import check_output_folders, check_run_name
    from .distributed import resolve_device

    resolve_device(cfg.device)
    if cfg.name:
        check_run_name(cfg.name)
    check_output_folders(cfg)
    if cfg.clip_model and cfg.preview_every:  # without previews it is unused (the run says so)
        from .evaluation import check_clip_model

        check_clip_model(cfg.clip_model)


def _refuse_size_name(model: str) -> None:
    """`train` needs files: a size name (dev, klein-4b, klein-9b) is for `estimate`. Checked before
    `spec_for`, which would build the named size's class to count it."""
    from .model import is_size_name

    if is_size_name(model):
        raise ConfigError(f"--model {model} names a FLUX.2 size, which estimate takes; train needs the model's "
                          "files: a FLUX.2 diffusers pipeline folder, or a transformer .safetensors file with --encoders")


def _config_file(args: argparse.Namespace):
    """--config, or with --resume and no --config the run's own config.yaml."""
    if args.resume and not args.config:
        from .checkpoint import find_checkpoint

        saved = find_checkpoint(args.resume).parent.parent / "config.yaml"
        return saved if saved.is_file() else None
    return args.config


def check_before_launch(args: argparse.Namespace) -> None:
    """What every process of a --num-gpus run would refuse, said once before any starts: the
    options, the model's files, the dataset, a count it cannot use on the run's device (from
    --device or --config), an accumulation the processes cannot share."""
    from .distributed import accumulation_per_process

    cfg, _, _, _ = _resolve(args, _config_file(args), dataset_required=True, check_places=False)
    check_process_count(args.num_gpus, cfg.device)  # before the device: it says how many there are
    _check_run_places(cfg)
    accumulation_per_process(cfg.gradient_accumulation, args.num_gpus, cfg.keep_effective_batch)


def run_train(args: argparse.Namespace) -> int:
    config_file = _config_file(args)
    if args.save_config:
        return save_config(args, config_file)
    cfg, report, spec, _ = _resolve(args, config_file, dataset_required=True)

    # Imported once the options, the paths and the dataset have passed: a mistyped path is named
    # in a second or two, not after the seconds diffusers and PEFT take to import.
    from .distributed import World, check_precision, resolve_device
    from .encoders import load_pipeline_encoders
    from .memory import Placement, device_available_memory, host_memory_free, plan_processes
    from .model import load_transformer
    from .train import Trainer, precision_plan

    quiet_libraries()
    device = resolve_device(cfg.device)
    world = World.join(device)  # under a launcher: this process's GPU from here on
    device = world.device(device)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    else:  # what the scan found and left out, before the minutes the models take to load
        print(report.summary(max_warnings=0))
    # Preflight before the model and the encoders load: refuse (or, with auto, adjust) a run
    # that cannot fit. The Trainer repeats it on the loaded model.
    available = world.smallest(device_available_memory(device), device)  # one verdict for every process
    placement = Placement("engine", host_free=host_memory_free())
    _, _, plan = plan_processes(spec, cfg, placement, available, world.size, list(report.bucket_counts),
                                resuming=bool(args.resume))
    if cfg.memory_check:
        plan.estimate.check()
    weight_dtype, mixed_precision, _ = precision_plan(cfg.dtype, device)
    check_precision(mixed_precision)  # before the models load
    encoders_path = cfg.encoders or cfg.model
    # The transformer waits in CPU memory while the encoders fill the cache on the
    # accelerator; the trainer moves it over once they are freed.
    backbone = load_transformer(cfg.model, dtype=weight_dtype)
    encoder = load_pipeline_encoders(encoders_path, device=device, dtype=weight_dtype,
                                     text_layers=cfg.text_encoder_layers or None)
    flag: dict = {}
    _install_sigint(flag)
    trainer = Trainer(cfg, backbone, encoder=encoder, dataset=report, free_encoder=encoder.free, resume=args.resume,
                      should_stop=lambda: flag.get("stop", False), console=True)
    result = trainer.run()
    world.barrier()  # the main process has written the LoRA: now all leave the process group together
    if world.is_main:
        print(result.summary)
    return 0


def save_config(args: argparse.Namespace, config_file) -> int:
    """--save-config: the options as the run would take them, written to a file; nothing trains.

    With --quick auto and a dataset, the schedule auto picks for that dataset (steps, learning rate,
    repeats): the file's values win over auto's when it is used again.
    """
    cfg = resolve_config(args.preset, args.quick, config_file, _overrides(args))
    note = ""
    if cfg.quick_preset == "auto":
        if cfg.dataset:
            from .data import scan_dataset_for

            count = len(scan_dataset_for(cfg).items)
            cfg = resolve_config(args.preset, args.quick, config_file, _overrides(args), image_count=count)
            note = f" (steps, learning rate and repeats as auto picks them for the {count} images of {cfg.dataset})"
        else:
            note = (" (without --dataset: steps, learning rate and repeats are the defaults, and the file's values "
                    "win over auto's; add --dataset to write the schedule auto picks)")
    path = Path(args.save_config).expanduser()
    if path.is_dir():
        raise ConfigError(f"--save-config {args.save_config} is a folder; give a file name such as run.yaml")
    try:
        save_yaml(cfg, path)
    except OSError as e:
        raise ConfigError(f"--save-config {args.save_config}: cannot write it ({e.strerror or e})") from None
    print(f"config written to {path}{note}")
    return 0


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less every `option VALUE` and `option=VALUE`."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            rest.append(a)
    return rest


def check_process_count(count: int, device: str) -> None:
    """--num-gpus: 2 or more, and no more than the GPUs PyTorch sees (unless the processes run on the CPU)."""
    import torch

    if count < 2:
        raise ConfigError(f"--num-gpus {count}: give 2 or more, or leave it out to train in this process")
    if device != "cpu":
        visible = torch.cuda.device_count()
        if visible < count:
            fewer = f"use --num-gpus {visible}, or " if visible > 1 else "leave out --num-gpus, or use "
            raise ConfigError(f"--num-gpus {count}, but {visible} GPU(s) are visible to PyTorch; {fewer}"
                              "--device cpu for CPU processes")


def launch_processes(argv: list[str], count: int) -> int:
    """Run this train command again under `accelerate launch` with `count` processes (--num-gpus),
    once `check_before_launch` has passed."""
    import subprocess

    rest = without_option(argv, "--num-gpus")
    # The launcher waits this long for its processes to finish their step and checkpoint after
    # Ctrl-C, before it kills them (PyTorch's default, 30 s, can be shorter than a [dev] step and save).
    env = dict(os.environ)
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "120")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count),
               "--num_machines", "1", "--main_process_port", "0",  # a free port: runs side by side do not collide
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "flux2_train"] + rest
    log.info("launching %d processes: %s", count, " ".join(command))
    # Ctrl-C reaches the processes too: they write a checkpoint and stop; this one waits for them.
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        code = subprocess.call(command, env=env)
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted and code != 0:
        print("cancelled: the processes stopped after a step; the checkpoint they wrote is named above "
              "(\"[cancelled]\"): resume with --resume RUN_FOLDER, on any number of processes", file=sys.stderr)
        return 130
    if code not in (0, 130):
        print(f"error: the {count}-process run ended with exit code {code}; the first process to fail is named "
              "above (\"Root Cause\"), with its own message before it. Checkpoints written before the failure are "
              "intact: resume with --resume RUN_FOLDER, on any number of processes.", file=sys.stderr)
    return code


# Common cards and the memory they report (MiB).
CARDS = (("16 GB (RTX 4080)", 16376), ("24 GB (RTX 4090)", 24564), ("32 GB (RTX 5090)", 32607),
         ("48 GB (RTX 6000 Ada)", 49140), ("80 GB (H100)", 81559), ("96 GB (RTX PRO 6000)", 97887),
         ("141 GB (H200)", 143771))


def run_estimate(args: argparse.Namespace) -> int:
    from .config import suggest_schedule
    from .memory import (DTYPE_FORMATS, GIB, Placement, choose_strategy, device_available_memory, estimate_memory,
                         host_memory_free, plan_auto, stored_format)

    if args.num_gpus < 1:
        raise ConfigError(f"--num-gpus {args.num_gpus}: give 1 or more")
    cfg, report, spec, stored = _resolve(args, args.config)
    if args.host == "engine":
        if args.offload_gb:
            raise ConfigError("--offload-gb needs --host comfyui: the engine offloads whole blocks (--offload-blocks N)")
        if args.weights and args.weights != DTYPE_FORMATS[cfg.dtype]:
            raise ConfigError(f"the engine stores the weights in --dtype ({cfg.dtype}); --weights {args.weights} "
                              "needs --host comfyui")
        placement = Placement("engine", host_free=host_memory_free())  # it loads any file in the run's dtype
    elif args.num_gpus > 1:
        raise ConfigError("--num-gpus needs --host engine: the ComfyUI training node runs on one GPU")
    else:
        fmt = args.weights or stored_format(stored, spec.param_count)
        placement = Placement("comfyui", fmt, None if args.weights else stored,
                              offloaded_bytes=int(args.offload_gb * GIB), allocator=args.allocator or "",
                              host_free=host_memory_free())
    if args.gpu_memory is not None:
        available = int(args.gpu_memory * GIB)
    elif cfg.device != "cpu":
        from .distributed import resolve_device

        available = device_available_memory(resolve_device(cfg.device))
    else:
        available = None
    buckets = list(report.bucket_counts) if report else None
    strategy_line = ""
    if args.num_gpus > 1:
        _, placement, strategy_line = choose_strategy(spec, cfg, available, args.num_gpus, buckets, cfg.multi_gpu)
    est = estimate_memory(spec, cfg, placement, available, buckets)
    print(f"{spec.title}, {spec.param_count / 1e9:.2f} B parameters, on the {args.host} path")
    print("; ".join(f"{k} {v}" for k, v in est.settings.items()))
    print()
    print(est.table())
    print()
    print(est.summary().splitlines()[0] + " (calibrated on measured H100 peaks: bench/README.md)")
    if strategy_line:
        print(f"{strategy_line} (per GPU above)")
    if cfg.quick_preset == "auto" and available:
        try:
            print(plan_auto(spec, cfg, placement, available, buckets).reason)
        except Flux2TrainError as e:
            print(f"auto: {e}".splitlines()[0])
    if est.advice:
        print("to use less (cheapest in speed first):")
        for a in est.advice:
            print(f"  - {a}")
    print()
    print("| GPU | as given | auto would train with |")
    print("|---|---|---|")
    for name, mib in CARDS:
        card = mib * 2**20
        verdict = estimate_memory(spec, cfg, placement, card, buckets, advise=False).verdict
        try:
            plan = plan_auto(spec, cfg, placement, card, buckets)
            picked = f"{', '.join(plan.changes) or 'the settings as given'} ({plan.estimate.total / GIB:.1f} GiB)"
        except Flux2TrainError:
            picked = "nothing fits (see the advice)"
        print(f"| {name} | {verdict} | {picked} |")
    if report:
        plan = suggest_schedule(len(report.items), cfg.subject_preset, cfg.effective_batch, cfg.rank)
        print(f"\nfor this dataset: {plan['reason']}")
        for warning in report.warnings:
            print(f"  warning: {warning}")
    return 0


def run_runs(args: argparse.Namespace) -> int:
    from . import runs

    if args.runs_command == "compare":
        a, b = runs.resolve_run(args.a, args.output_dir), runs.resolve_run(args.b, args.output_dir)
        png = Path(args.out) if args.out else Path(args.output_dir) / f"compare-{a.name}-{b.name}.png"
        print(runs.compare_runs(a, b, png), end="")
    elif args.runs_command == "save-preset":
        path = runs.save_preset(runs.resolve_run(args.run, args.output_dir), args.file)
        print(f"saved {path}; train with it: python -m flux2_train train --config {path} --dataset DIR --model PATH")
    else:
        found = runs.find_runs(args.output_dir)
        print(runs.runs_table(found) if found else f"no runs in {args.output_dir}\n", end="")
    return 0


def quiet_libraries() -> None:
    """Keep the console to the trainer's own lines: no loader progress bars or cast notices.
    Called where a command starts on the models, not before its checks: importing these takes seconds."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    from .distributed import launched_processes, leave

    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    # Set before CUDA starts: fewer fragments, so the peak stays near the estimate (bench/README.md).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        processes = launched_processes()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = f" (process {os.environ.get('RANK', '?')} of {processes})" if processes > 1 else ""
    try:
        # --save-config writes the options and trains nothing: no processes to start for it.
        if args.command == "train" and args.num_gpus != 1 and processes == 1 and not args.save_config:
            check_before_launch(args)
            return launch_processes(argv, args.num_gpus)
        if args.command == "train":
            return run_train(args)
        if args.command == "estimate":
            return run_estimate(args)
        if args.command == "runs":
            return run_runs(args)
        from .demo import run_demo
        from .distributed import resolve_device

        resolve_device(args.device)  # named before the tiny model is built
        quiet_libraries()
        return run_demo(steps=args.steps, output_dir=Path(args.output_dir), device=args.device)
    except TrainingCancelled as e:
        print(f"cancelled{where}: {e}", file=sys.stderr)
        return 130
    except Flux2TrainError as e:
        print(f"error{where}: {e}", file=sys.stderr)
        return 2
    finally:
        leave()


def entry_point() -> None:
    """The console script and `python -m flux2_train`: `main`, then exit with its code.

    A process of a multi-process run exits without running interpreter teardown: the process
    group is already destroyed, and gloo's threads can otherwise abort the exit (SIGABRT,
    "terminate called without an active exception") after a run that succeeded.
    """
    from .distributed import launched_processes

    try:
        several = launched_processes() > 1
    except ConfigError:  # main says what is wrong with it
        several = False
    code = main()
    if several:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
