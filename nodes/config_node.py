"""Flux2LoraConfig: presets, the knobs people change, and every other engine option as YAML."""

from __future__ import annotations

import yaml

from comfy_api.latest import io, ui
from flux2_train.config import DTYPES, OPTIMIZERS, SUBJECT_PRESETS, TrainConfig, field_help
from flux2_train.errors import ConfigError
from flux2_train.evaluation import preview_prompts

from .messages import widget_words
from .training import CATEGORY, ConfigHandle, ConfigType, quick_preset_options

PRESET = "preset"  # a combo value that leaves the option to the presets
# Options that other nodes own: the dataset node, or ComfyUI itself (folders, device).
SET_ELSEWHERE = {"dataset", "caption_ext", "trigger_word", "default_caption", "repeats", "resolution",
             "max_aspect_ratio", "flip", "model", "encoders", "output_dir", "cache_dir", "device", "resume",
             "subject_preset", "quick_preset", "max_sequence_length"}


def _zero_is_preset(tip: str) -> str:
    return tip + " 0 = from the presets."


class Flux2LoraConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        helps = field_help()
        return io.Schema(
            node_id="Flux2LoraConfig",
            display_name="FLUX.2 LoRA Config",
            category=CATEGORY,
            description="Training options: a subject preset, a speed/quality preset, and explicit values that win "
                        "over both. Shows the resolved options.",
            inputs=[
                io.Combo.Input("subject", options=list(SUBJECT_PRESETS), default="character",
                               tooltip="What the LoRA learns: a character (person, object), a style, or a concept; "
                                       "sets targets, learning rate, caption dropout, flip and accumulation."),
                io.Combo.Input("quick_preset", options=quick_preset_options(), default="fast",
                               tooltip="fast: 800 steps rank 16; quality: 2000 steps rank 32, cosine schedule; "
                                       "low_vram: checkpointing, 8-bit Adam; auto: steps, learning rate and repeats "
                                       "from the dataset, and the fastest memory settings that fit the GPU."),
                io.Int.Input("rank", default=0, min=0, max=256, tooltip=_zero_is_preset(helps["rank"])),
                io.Float.Input("alpha", default=0.0, min=0.0, max=256.0, step=0.5,
                               tooltip=_zero_is_preset(helps["alpha"])),
                io.Int.Input("steps", default=0, min=0, max=100000, tooltip=_zero_is_preset(helps["steps"])),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=10.0, step=1e-6, round=1e-7,
                               tooltip=_zero_is_preset(helps["learning_rate"])),
                io.Combo.Input("optimizer", options=[PRESET, *OPTIMIZERS], default=PRESET,
                               tooltip=helps["optimizer"]),
                io.Int.Input("batch_size", default=0, min=0, max=64, tooltip=_zero_is_preset(helps["batch_size"])),
                io.Int.Input("gradient_accumulation", default=0, min=0, max=256,
                             tooltip=_zero_is_preset(helps["gradient_accumulation"])),
                io.Combo.Input("dtype", options=["auto", *DTYPES], default="auto",
                               tooltip="Precision of the frozen weights; autocast (mixed precision) follows it. "
                                       "auto: the precision the MODEL was loaded in."),
                io.Combo.Input("gradient_checkpointing", options=[PRESET, "on", "off"], default=PRESET,
                               tooltip=helps["gradient_checkpointing"]),
                io.Int.Input("save_every", default=0, min=0, max=100000,
                             tooltip=_zero_is_preset("Write a checkpoint every N steps (also at the end and on "
                                                     "Cancel).")),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip=helps["seed"]),
                io.String.Input("advanced", default="", multiline=True, optional=True, advanced=True,
                                tooltip="Any other training option as YAML, one per line, e.g. "
                                        "'lora_dropout: 0.1', 'checkpoint_blocks: 24', 'attention: cudnn' or "
                                        "'compile: true'. Names as in `python -m flux2_train train --help` with _ for -."),
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Sample preview images every N steps, at the start and at the end; they appear "
                                     "on the training node as they come and are its previews output. 0 = from the "
                                     "presets (fast: none, quality: every 250). Each round costs about "
                                     "preview_steps forward passes per prompt (the node shows the seconds)."),
                io.String.Input("preview_prompts", default="", multiline=True, optional=True,
                                tooltip="One prompt per line for the previews (seeds fixed). Empty: the trigger "
                                        "word in a short prompt for the subject preset."),
            ],
            outputs=[ConfigType.Output(display_name="config")],
        )

    @classmethod
    def execute(cls, **widgets) -> io.NodeOutput:
        with widget_words():
            handle = config_handle(**widgets)
            return io.NodeOutput(handle, ui=ui.PreviewText(describe(handle)))


def config_handle(subject, quick_preset, rank, alpha, steps, learning_rate, optimizer, batch_size,
                  gradient_accumulation, dtype, gradient_checkpointing, save_every, seed, advanced="",
                  preview_every=0, preview_prompts="") -> ConfigHandle:
    """The node's widget values as engine overrides (also used for the vRAM bar before the graph runs)."""
    overrides = parse_advanced(advanced or "")
    prompts = [line.strip() for line in (preview_prompts or "").splitlines() if line.strip()]
    if prompts:
        overrides["preview_prompts"] = prompts
    explicit = dict(rank=rank, alpha=alpha, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                    gradient_accumulation=gradient_accumulation, save_every=save_every, preview_every=preview_every)
    overrides.update({k: v for k, v in explicit.items() if v})
    if optimizer != PRESET:
        overrides["optimizer"] = optimizer
    if gradient_checkpointing != PRESET:
        overrides["gradient_checkpointing"] = gradient_checkpointing == "on"
    overrides.update(dtype=dtype, seed=seed)
    if rank and not alpha:
        overrides["alpha"] = float(rank)  # alpha = rank: scale 1, the usual choice
    quick = None if quick_preset == "none" else quick_preset
    return ConfigHandle(subject_preset=subject, quick_preset=quick, overrides=overrides)


def parse_advanced(text: str) -> dict:
    if not text or not text.strip():
        return {}
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"the advanced options are not valid YAML ({e}); write one 'name: value' per line") from None
    if not isinstance(values, dict):
        raise ConfigError("the advanced options must be 'name: value' lines, e.g. 'lora_dropout: 0.1'")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown advanced option(s) {', '.join(unknown)}; see `python -m flux2_train train --help`"
                          " for the names (with _ instead of -)")
    owned = sorted(set(values) & SET_ELSEWHERE)
    if owned:
        raise ConfigError(f"set {', '.join(owned)} on the dataset node (or leave it to ComfyUI), not in advanced")
    return values


def describe(handle: ConfigHandle) -> str:
    """The options as they will train (the MODEL settles the dtype; `auto` settles the schedule from the
    dataset and the memory settings from the GPU when training starts)."""
    cfg = handle.preview()
    lines = [f"subject {handle.subject_preset}, quick preset {handle.quick_preset or 'none'}"
             + (" (steps from the dataset, memory settings from the GPU when training starts)"
                if handle.quick_preset == "auto" else ""),
             f"rank {cfg.rank}, alpha {cfg.alpha:g}, targets {cfg.targets}",
             f"{cfg.steps} steps, learning rate {cfg.learning_rate:g} ({cfg.lr_scheduler}), optimizer {cfg.optimizer}",
             f"batch {cfg.batch_size} x accumulation {cfg.gradient_accumulation}, dtype {handle.overrides['dtype']}, "
             f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}",
             f"checkpoint every {cfg.save_every or 'end only'}, seed {cfg.seed}, timesteps {cfg.timestep_sampling}"
             + (f", saves the average of the weights (ema_decay {cfg.ema_decay:g})" if cfg.ema_decay else ""),
             f"validation loss every {cfg.validate_every or 'never'}; previews "
             + (f"every {cfg.preview_every} steps, {cfg.preview_resolution}px, {cfg.preview_steps} steps: "
                + " | ".join(preview_prompts(cfg)) if cfg.preview_every else "off")]
    return "\n".join(lines)
