"""Headless entry point: `python -m flux2_train train|demo ...` (also the `flux2-train` script)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import MISSING, fields
from pathlib import Path

from .config import QUICK_PRESETS, SUBJECT_PRESETS, TrainConfig, resolve_config, save_yaml
from .errors import Flux2TrainError, TrainingCancelled

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
        kw = dict(dest=f.name, default=None, help=help_text)
        if f.metadata.get("choices"):
            kw["choices"] = [c for c in f.metadata["choices"] if c]
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(default, list):
            parser.add_argument(flag, type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                                metavar="A,B,...", **kw)
        else:
            parser.add_argument(flag, type=type(default), **kw)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flux2_train", description="FLUX.2 [dev] / [klein] LoRA training.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="Train a LoRA on an image folder.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--preset", choices=SUBJECT_PRESETS, help="Subject preset: sets defaults for the subject.")
    train.add_argument("--quick", choices=QUICK_PRESETS, help="Quick preset: fast, quality or low_vram.")
    train.add_argument("--config", help="YAML file of options (explicit options win).")
    train.add_argument("--resume", help="Run folder (or one of its checkpoints) to continue.")
    train.add_argument("--save-config", help="Write the resolved config to this YAML file and exit.")
    _add_config_options(train)

    demo = sub.add_parser("demo", help="Train the tiny built-in model on the bundled sample images (CPU, < 1 min).")
    demo.add_argument("--steps", type=int, default=120, help="Training steps.")
    demo.add_argument("--output-dir", default="runs", help="Where the demo run folder goes.")
    demo.add_argument("--device", default="cpu", help="Device (the tiny model is fastest on the CPU).")
    return parser


def _install_sigint(flag: dict) -> None:
    """First Ctrl-C: checkpoint and stop after this step. Second: stop at once."""

    def handler(signum, frame):
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\nstopping after this step (a checkpoint is written); press Ctrl-C again to abort at once",
              file=sys.stderr)

    signal.signal(signal.SIGINT, handler)


def run_train(args: argparse.Namespace) -> int:
    from .encoders import load_pipeline_encoders
    from .model import load_transformer
    from .train import Trainer, precision_plan, resolve_device

    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in _HIDDEN_FIELDS}
    config_file = args.config
    if args.resume and not config_file:
        from .checkpoint import find_checkpoint

        saved = find_checkpoint(args.resume).parent.parent / "config.yaml"
        config_file = saved if saved.is_file() else None
    cfg = resolve_config(args.preset, args.quick, config_file, overrides)
    if args.save_config:
        save_yaml(cfg, args.save_config)
        print(f"config written to {args.save_config}")
        return 0

    device = resolve_device(cfg.device)
    weight_dtype, _, _ = precision_plan(cfg.dtype, device)
    encoders_path = cfg.encoders or cfg.model
    # The transformer waits in CPU memory while the encoders fill the cache on the
    # accelerator; the trainer moves it over once they are freed.
    backbone = load_transformer(cfg.model, dtype=weight_dtype)
    encoder = load_pipeline_encoders(encoders_path, device=device, dtype=weight_dtype,
                                     text_layers=cfg.text_encoder_layers or None)
    flag: dict = {}
    _install_sigint(flag)
    trainer = Trainer(cfg, backbone, encoder=encoder, free_encoder=encoder.free, resume=args.resume,
                      should_stop=lambda: flag.get("stop", False), console=True)
    result = trainer.run()
    print(result.summary)
    return 0


def quiet_libraries() -> None:
    """Keep the console to the trainer's own lines: no loader progress bars or cast notices."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    for lib in (dlog, tlog):
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    quiet_libraries()
    try:
        if args.command == "train":
            return run_train(args)
        from .demo import run_demo

        return run_demo(steps=args.steps, output_dir=Path(args.output_dir), device=args.device)
    except TrainingCancelled as e:
        print(f"cancelled: {e}", file=sys.stderr)
        return 130
    except Flux2TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
