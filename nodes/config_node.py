"""Flux2LoraConfig: presets, the knobs people change, and every other engine option as YAML."""

from __future__ import annotations

import yaml

from comfy_api.latest import io, ui
from flux2_train.config import DTYPES, OPTIMIZERS, SUBJECT_PRESETS, TrainConfig, field_help
from flux2_train.errors import ConfigError
from flux2_train.evaluation import preview_prompts
from flux2_train.fsutil import resolve_within

from . import paths
from .messages import widget_words
from .training import CATEGORY, ConfigHandle, ConfigType, quick_preset_options

PRESET = "preset"  # a combo value that leaves the option to the presets
CONFIG_NODE, DATASET_NODE, TRAIN_NODE = "FLUX.2 LoRA Config", "FLUX.2 LoRA Dataset", "FLUX.2 Train LoRA"


def _widgets(node: str, options: dict[str, str]) -> dict[str, str]:
    return {option: f"the {widget} widget of {node}" for option, widget in options.items()}


# Options set by a widget, another node or ComfyUI itself, and who sets them. Typed in the advanced box
# they would be overwritten (or, for the dataset's, miss the scan), so they are refused there; a config
# widget's only where the widget sets it (0 or preset leaves the option to advanced: `config_handle`).
_CONFIG_WIDGETS = _widgets(CONFIG_NODE, {"subject_preset": "subject", "quick_preset": "quick_preset", "rank": "rank",
                             "alpha": "alpha", "steps": "steps", "learning_rate": "learning_rate",
                             "optimizer": "optimizer", "batch_size": "batch_size",
                             "gradient_accumulation": "gradient_accumulation", "dtype": "dtype",
                             "gradient_checkpointing": "gradient_checkpointing", "save_every": "save_every",
                             "seed": "seed", "preview_every": "preview_every", "preview_prompts": "preview_prompts"})
SET_ELSEWHERE = {
    **_CONFIG_WIDGETS,
    **_widgets(DATASET_NODE, {"dataset": "folder", "caption_ext": "caption_extension", "trigger_word": "trigger_word",
                              "default_caption": "default_caption", "repeats": "repeats", "resolution": "resolution",
                              "max_aspect_ratio": "buckets", "flip": "flip", "prepend_trigger": "prepend_trigger",
                              "max_upscale": "max_upscale"}),
    "model": f"the model input of {TRAIN_NODE}",
    "encoders": f"the clip and vae inputs of {TRAIN_NODE}",
    "resume": f"the resume input of {TRAIN_NODE}",
    "output_dir": "ComfyUI (its output folder)",
    "cache_dir": "ComfyUI (its output folder)",
    "device": "ComfyUI",
    "max_sequence_length": "ComfyUI's FLUX.2 text encoder",
}


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
    typed = parse_advanced(advanced or "")
    widgets = dict(rank=rank, alpha=alpha, steps=steps, learning_rate=learning_rate, batch_size=batch_size,
                   gradient_accumulation=gradient_accumulation, save_every=save_every, preview_every=preview_every)
    widgets = {k: v for k, v in widgets.items() if v}  # 0 leaves the option to the presets, or to advanced
    prompts = [line.strip() for line in (preview_prompts or "").splitlines() if line.strip()]
    if prompts:
        widgets["preview_prompts"] = prompts
    if optimizer != PRESET:
        widgets["optimizer"] = optimizer
    if gradient_checkpointing != PRESET:
        widgets["gradient_checkpointing"] = gradient_checkpointing == "on"
    widgets.update(dtype=dtype, seed=seed)
    both = [k for k in typed if k in widgets or k in ("subject_preset", "quick_preset")]
    if both:
        raise ConfigError("remove from advanced the options set elsewhere: "
                          + "; ".join(f"{k} is set by {SET_ELSEWHERE[k]}" for k in both)
                          + " (a widget at 0 or preset leaves its option to advanced)")
    overrides = typed | widgets
    if rank and "alpha" not in overrides:
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
    not_names = [k for k in values if not isinstance(k, str)]
    if not_names:
        raise ConfigError(f"the advanced options have {', '.join(repr(k) for k in not_names)} where an option name "
                          "belongs (YAML reads unquoted on, off, yes and no as true and false, and numbers as "
                          "numbers); write option names as text, e.g. 'lora_dropout: 0.1'")
    known = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown advanced option(s) {', '.join(unknown)}; see `python -m flux2_train train --help`"
                          " for the names (with _ instead of -)")
    owned = [k for k in values if k in SET_ELSEWHERE and k not in _CONFIG_WIDGETS]  # those: `config_handle`
    if owned:
        raise ConfigError("remove from advanced the options set elsewhere: "
                          + "; ".join(f"{k} is set by {SET_ELSEWHERE[k]}" for k in owned))
    if values.get("clip_model"):  # a server path: only inside the folders the trainer may read, as a dataset
        values["clip_model"] = str(resolve_within(str(values["clip_model"]), paths.allowed_clip_model_roots(),
                                                  "CLIP model folder (clip_model)"))
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
