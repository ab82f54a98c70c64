"""The one typed training configuration, its presets and its validation.

Precedence, lowest first: field defaults < subject preset < quick preset <
YAML file < explicit options. `resolve_config` applies that order; the CLI and
the ComfyUI nodes both go through it, so no option is lost between them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

DTYPES = ("bfloat16", "float16", "float32")
BASE_FORMATS = ("none", "fp8", "int8", "nf4")
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fa4")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
TIMESTEP_SAMPLING = ("logit_normal", "uniform", "mode")
LOSS_WEIGHTING = ("none", "sigma_sqrt", "cosmap")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
TARGET_PRESETS = ("attention", "attention_mlp", "all_linear")
LORA_FORMATS = ("diffusers", "comfyui", "kohya")
SUBJECT_PRESETS = ("character", "style", "concept")
QUICK_PRESETS = ("fast", "quality", "low_vram", "auto")


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None, separator: str = ",",
         item: type = str, **kw: Any) -> Any:
    # separator: of a list's items on the command line; item: their type (the command line gives text)
    meta = {"help": help, "separator": separator, "item": item}
    if choices:
        meta["choices"] = choices
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------
    dataset: str = _opt("", "Folder of training images (.png .jpg .jpeg .webp) with optional same-name caption files.")
    caption_ext: str = _opt(".txt", "Extension of the caption file next to each image.")
    trigger_word: str = _opt("", "Word that names the subject; used as the caption of images without one.")
    prepend_trigger: bool = _opt(True, "Put the trigger word in front of every caption that does not contain it.")
    default_caption: str = _opt("", "Caption for images without a caption file (the trigger word is used when empty).")
    caption_dropout: float = _opt(0.05, "Probability of training a step on the empty caption (keeps the LoRA usable without its prompt).")
    repeats: int = _opt(1, "How many times each image appears per epoch.")
    resolution: int = _opt(1024, "Training resolution: buckets keep about resolution x resolution pixels (multiple of 16).")
    max_aspect_ratio: float = _opt(3.0, "Widest (or tallest) bucket, as long side / short side.")
    max_upscale: float = _opt(2.0, "Largest upscale allowed to reach a bucket; smaller images are refused.")
    flip: bool = _opt(False, "Randomly mirror images left-right (not for subjects with text or asymmetric features).")
    max_sequence_length: int = _opt(512, "Text tokens per caption (FLUX.2 uses 512); longer captions are truncated with a warning.")
    cache_dir: str = _opt("", "Folder for the latent and text-embedding cache (default: <output_dir>/cache).")

    # --- model ------------------------------------------------------------
    model: str = _opt("", "FLUX.2 transformer: a diffusers pipeline or transformer folder, or a single .safetensors file.")
    encoders: str = _opt("", "Diffusers FLUX.2 pipeline folder with text_encoder/, tokenizer/ and vae/ (default: --model when it is a pipeline).")
    guidance_scale: float = _opt(1.0, "Guidance input fed to FLUX.2 [dev] while training; [klein] has none.")
    text_encoder_layers: list = _opt([], "Hidden layers of the text encoder stacked into the embedding (default: the pipeline's own). Other layers give the transformer conditioning it was not trained on: the LoRA then works only with the same layers at inference.", item=int)

    # --- LoRA -------------------------------------------------------------
    rank: int = _opt(16, "LoRA rank: size of the low-rank update (16 for a subject, 32 for a style).")
    alpha: float = _opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.")
    lora_dropout: float = _opt(0.0, "Dropout on the LoRA input.")
    targets: str = _opt("attention_mlp", "Layers that get adapters.", TARGET_PRESETS)
    target_modules: list = _opt([], "Explicit module names or regular expressions; overrides --targets when given.")

    # --- optimisation -----------------------------------------------------
    steps: int = _opt(800, "Optimizer steps.")
    batch_size: int = _opt(1, "Images per forward pass (all from one aspect bucket).")
    gradient_accumulation: int = _opt(1, "Forward passes per optimizer step.")
    multi_gpu: str = _opt("auto", "With several processes: ddp (the whole model on every GPU, LoRA gradients averaged), fsdp (the frozen weights sharded, each GPU holds 1/N), or auto (ddp where the model fits one GPU).", ("auto", "ddp", "fsdp"))
    keep_effective_batch: bool = _opt(False, "With several processes (accelerate launch, --num-gpus), share --gradient-accumulation among them so batch x accumulation x processes stays as configured; otherwise every process adds its own batch.")
    learning_rate: float = _opt(1e-4, "Peak learning rate (Prodigy: use 1.0).")
    optimizer: str = _opt("adamw", "Optimizer of the LoRA weights (adamw8bit and prodigy need extra packages).", OPTIMIZERS)
    weight_decay: float = _opt(1e-4, "Decoupled weight decay.")
    adam_beta1: float = _opt(0.9, "Adam beta1 (momentum of the gradient average).")
    adam_beta2: float = _opt(0.999, "Adam beta2 (momentum of the squared-gradient average).")
    adam_epsilon: float = _opt(1e-8, "Adam epsilon (added to the denominator for stability).")
    max_grad_norm: float = _opt(1.0, "Gradient clipping norm (0 turns clipping off).")
    ema_decay: float = _opt(0.0, "Keep an exponential moving average of the LoRA weights with this decay (e.g. 0.999) "
                                 "and validate, preview and save the average instead of the last step's weights; "
                                 "0: off. It averages over about 1 / (1 - decay) steps.")
    lr_scheduler: str = _opt("constant_with_warmup", "Learning-rate schedule (diffusers' schedulers).", LR_SCHEDULERS)
    lr_warmup_steps: int = _opt(0, "Warm-up steps of the schedule.")
    lr_num_cycles: int = _opt(1, "Cycles for cosine_with_restarts.")
    timestep_sampling: str = _opt("logit_normal", "Distribution of the noise level sigma.", TIMESTEP_SAMPLING)
    logit_mean: float = _opt(0.0, "Mean of the logit-normal sigma draw.")
    logit_std: float = _opt(1.0, "Standard deviation of the logit-normal sigma draw.")
    mode_scale: float = _opt(1.29, "Scale of the 'mode' sigma draw.")
    timestep_shift: str = _opt("auto", "Shift of sigma: 'auto' (FLUX.2's resolution-dependent shift), 'none', or a number.")
    loss_weighting: str = _opt("none", "Per-sigma loss weighting.", LOSS_WEIGHTING)
    seed: int = _opt(42, "Seed for data order, noise, sigma and LoRA initialisation.")

    # --- precision and memory --------------------------------------------
    dtype: str = _opt("bfloat16", "Precision of the frozen weights; autocast follows it (float32 turns mixed precision off).", DTYPES)
    gradient_checkpointing: bool = _opt(False, "Recompute block activations in the backward pass ([klein] 4B at 1024²: 60% less memory, 43% slower; bench/README.md).")
    checkpoint_blocks: int = _opt(0, "With --gradient-checkpointing: recompute only the first N blocks and keep the others' activations (0: all blocks; the auto preset picks the fewest that fit).")
    quantize_base: str = _opt("none", "Store the frozen block weights as fp8 (scaled, with fp8 matmuls on Ada/Hopper), int8 or nf4 (QLoRA; both need bitsandbytes). Engine path only: in ComfyUI pick the weight dtype in the model loader.", BASE_FORMATS)
    offload_blocks: int = _opt(0, "Keep the frozen weights of N checkpointed blocks in CPU memory and copy each in on a side stream while the block before it computes (needs --gradient-checkpointing; engine path only; the auto preset picks the fewest that fit).")
    offload_activations: int = _opt(0, "Keep the activations of N blocks that are not checkpointed in pinned CPU memory, copied out and back on a side stream while other blocks compute: memory of checkpointing without its recomputation, where the copies keep up (spread over those blocks; the last one stays).")
    attention: str = _opt("auto", "Attention kernel (PyTorch SDPA): auto, or one of flash, cudnn, efficient, math; fa4: FlashAttention 4 (pip install --pre flash-attn-4; Hopper and data-center Blackwell GPUs).", ATTENTION_BACKENDS)
    compile: bool = _opt(False, "torch.compile each transformer block (regional): the first step compiles for tens of seconds, later steps run faster.")
    device: str = _opt("auto", "Device to train on: auto, cuda, cuda:N, cpu.")
    memory_check: bool = _opt(True, "Refuse, before any heavy work, a run whose estimated peak exceeds the GPU's free memory (--no-memory-check: try anyway).")

    # --- output -----------------------------------------------------------
    output_dir: str = _opt("runs", "Folder that receives one sub-folder per run.")
    name: str = _opt("", "Run name (default: flux2-<family>-lora-<date>-<time>).")
    save_every: int = _opt(250, "Write a checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = _opt(3, "Checkpoints kept in the run folder (older ones are removed, except the one nearest the best validation loss).")
    lora_format: str = _opt("diffusers", "Key format of the final LoRA file.", LORA_FORMATS)
    extra_formats: list = _opt([], "Further LoRA files to write next to the main one, by format name.")
    smoothing: float = _opt(0.9, "Exponential smoothing of the displayed loss.")
    tensorboard: bool = _opt(True, "Log scalars to tensorboard when it is installed.")

    # --- watching the run: validation, previews, CLIP score ----------------
    validate_every: int = _opt(100, "Evaluate the validation loss every N steps, and at the end (0: never). No gradients, the optimizer state untouched.")
    validation_split: float = _opt(0.0, "Fraction of the images held out of training for the validation loss (0: fixed noise and noise levels over the training images).")
    validation_samples: int = _opt(8, "(image, noise level) pairs the validation loss averages.")
    preview_every: int = _opt(0, "Sample preview images every N steps, and at the end (0: never; each preview costs about preview_steps forward passes).")
    preview_prompts: list = _opt([], "Prompts of the previews, separated by | (default: the trigger word in a short prompt per subject preset).", separator="|")
    preview_resolution: int = _opt(512, "Side of the square preview images (multiple of 16).")
    preview_steps: int = _opt(0, "Sampling steps per preview image (0: 20, or 4 for a distilled [klein]).")
    preview_guidance: float = _opt(4.0, "Guidance of the previews: [dev]'s guidance input; for [klein] base, classifier-free guidance against the empty prompt (1: none); a distilled [klein] takes none.")
    clip_model: str = _opt("", "Folder of a transformers CLIPModel (e.g. openai/clip-vit-large-patch14): score each preview against its prompt.")

    # --- provenance (set by presets; kept for the metadata) ---------------
    subject_preset: str = _opt("", "Subject preset that set the defaults.", ("",) + SUBJECT_PRESETS)
    quick_preset: str = _opt("", "Quick preset that set the defaults.", ("",) + QUICK_PRESETS)

    # ------------------------------------------------------------------
    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming every invalid option at once."""
        problems = []

        def need(cond: bool, msg: str) -> None:
            if not cond:
                problems.append(msg)

        for f in fields(self):
            value, choices = getattr(self, f.name), f.metadata.get("choices")
            if choices and value not in choices:
                problems.append(f"--{_flag(f.name)} is {value!r}; choose one of {', '.join(c for c in choices if c)}")
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"--{_flag(f.name)} must be a finite number (got {value})")
        need(self.rank > 0, f"--rank must be at least 1 (got {self.rank})")
        need(self.alpha > 0, f"--alpha must be positive (got {self.alpha})")
        need(self.steps > 0, f"--steps must be at least 1 (got {self.steps})")
        need(self.batch_size > 0, f"--batch-size must be at least 1 (got {self.batch_size})")
        need(self.gradient_accumulation > 0, f"--gradient-accumulation must be at least 1 (got {self.gradient_accumulation})")
        need(self.learning_rate > 0, f"--learning-rate must be positive (got {self.learning_rate})")
        need(self.repeats > 0, f"--repeats must be at least 1 (got {self.repeats})")
        need(0.0 <= self.caption_dropout < 1.0, f"--caption-dropout must be in [0, 1) (got {self.caption_dropout})")
        need(0.0 <= self.lora_dropout < 1.0, f"--lora-dropout must be in [0, 1) (got {self.lora_dropout})")
        need(self.resolution >= 64 and self.resolution % 16 == 0,
             f"--resolution must be a multiple of 16, at least 64 (got {self.resolution}); try {max(64, self.resolution // 16 * 16)}")
        need(self.max_aspect_ratio >= 1.0, f"--max-aspect-ratio must be at least 1 (got {self.max_aspect_ratio})")
        need(self.max_upscale >= 1.0, f"--max-upscale must be at least 1 (got {self.max_upscale})")
        need(self.save_every >= 0, f"--save-every must be 0 or more (got {self.save_every})")
        need(self.keep_checkpoints >= 1, f"--keep-checkpoints must be at least 1 (got {self.keep_checkpoints})")
        need(self.max_sequence_length > 0, f"--max-sequence-length must be positive (got {self.max_sequence_length})")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be 0 or more (got {self.max_grad_norm})")
        need(0.0 <= self.ema_decay < 1.0, f"--ema-decay must be in [0, 1) (got {self.ema_decay}); 0 turns it off")
        need(self.weight_decay >= 0, f"--weight-decay must be 0 or more (got {self.weight_decay})")
        need(0.0 <= self.adam_beta1 < 1.0, f"--adam-beta1 must be in [0, 1) (got {self.adam_beta1})")
        need(0.0 <= self.adam_beta2 < 1.0, f"--adam-beta2 must be in [0, 1) (got {self.adam_beta2})")
        need(self.adam_epsilon > 0, f"--adam-epsilon must be positive (got {self.adam_epsilon})")
        need(self.lr_warmup_steps >= 0, f"--lr-warmup-steps must be 0 or more (got {self.lr_warmup_steps})")
        need(self.lr_num_cycles >= 1, f"--lr-num-cycles must be at least 1 (got {self.lr_num_cycles})")
        need(self.logit_std > 0, f"--logit-std must be positive (got {self.logit_std})")
        need(self.guidance_scale >= 0, f"--guidance-scale must be 0 or more (got {self.guidance_scale})")
        need(all(layer >= 0 for layer in self.text_encoder_layers),
             f"--text-encoder-layers are hidden-layer numbers, 0 or more (got {self.text_encoder_layers})")
        need(0.0 <= self.smoothing < 1.0, f"--smoothing must be in [0, 1) (got {self.smoothing})")
        need(self.validate_every >= 0, f"--validate-every must be 0 or more (got {self.validate_every})")
        need(0.0 <= self.validation_split < 0.5, f"--validation-split must be in [0, 0.5) (got {self.validation_split})")
        need(self.validation_samples > 0, f"--validation-samples must be at least 1 (got {self.validation_samples})")
        need(self.preview_every >= 0, f"--preview-every must be 0 or more (got {self.preview_every})")
        need(self.preview_resolution >= 64 and self.preview_resolution % 16 == 0,
             f"--preview-resolution must be a multiple of 16, at least 64 (got {self.preview_resolution})")
        need(self.preview_steps >= 0, f"--preview-steps must be 0 (automatic) or more (got {self.preview_steps})")
        need(self.checkpoint_blocks >= 0, f"--checkpoint-blocks must be 0 (all) or more (got {self.checkpoint_blocks})")
        need(self.offload_blocks >= 0, f"--offload-blocks must be 0 (none) or more (got {self.offload_blocks})")
        need(self.offload_activations >= 0,
             f"--offload-activations must be 0 (none) or more (got {self.offload_activations})")
        need(self.quantize_base != "fp8" or self.dtype == "bfloat16",
             f"--quantize-base fp8 computes in bfloat16; set --dtype bfloat16 (got {self.dtype})")
        for fmt in self.extra_formats:
            need(fmt in LORA_FORMATS, f"--extra-formats has {fmt!r}; choose from {', '.join(LORA_FORMATS)}")
        if self.timestep_shift not in ("auto", "none"):
            try:
                shift = float(self.timestep_shift)
                need(math.isfinite(shift) and shift > 0, f"--timestep-shift must be a positive number (got {self.timestep_shift})")
            except ValueError:
                problems.append(f"--timestep-shift is {self.timestep_shift!r}; use 'auto', 'none' or a number such as 3.0")
        if self.optimizer == "prodigy" and self.learning_rate < 0.1:
            problems.append(f"Prodigy sets its own step size and expects --learning-rate 1.0 (got {self.learning_rate})")
        if problems:
            raise ConfigError("Invalid training options:\n  - " + "\n  - ".join(problems))
        return self


def _flag(name: str) -> str:
    return name.replace("_", "-")


def field_help() -> dict[str, str]:
    return {f.name: f.metadata["help"] for f in fields(TrainConfig)}


# Presets set defaults only; explicit options win. The subject presets keep
# batch 1 with gradient accumulation: on 10-50 images that generalises better
# than a large batch and fits every card.
SUBJECT_PRESET_VALUES: dict[str, dict[str, Any]] = {
    "character": dict(targets="attention_mlp", learning_rate=1e-4, caption_dropout=0.05, flip=False,
                      batch_size=1, gradient_accumulation=2, timestep_sampling="logit_normal"),
    "style": dict(targets="attention_mlp", learning_rate=1e-4, caption_dropout=0.1, flip=True,
                  batch_size=1, gradient_accumulation=4, timestep_sampling="logit_normal", logit_mean=0.3),
    "concept": dict(targets="attention_mlp", learning_rate=1e-4, caption_dropout=0.05, flip=True,
                    batch_size=1, gradient_accumulation=2, timestep_sampling="logit_normal"),
}
QUICK_PRESET_VALUES: dict[str, dict[str, Any]] = {
    "fast": dict(steps=800, rank=16, alpha=16.0, learning_rate=1e-4, save_every=200),
    "quality": dict(steps=2000, rank=32, alpha=32.0, learning_rate=5e-5, lr_scheduler="cosine",
                    lr_warmup_steps=100, save_every=250, preview_every=250),
    "low_vram": dict(gradient_checkpointing=True, batch_size=1, rank=16, alpha=16.0, optimizer="adamw8bit"),
    # `auto`: rank 16; steps, learning rate and repeats from the dataset (`suggest_schedule`),
    # and memory settings from the GPU when the run starts (`memory.plan_auto`).
    "auto": dict(rank=16, alpha=16.0, save_every=200),
}

# Times the run shows each image, by subject: a character needs the most exposures to be
# recognisable, a style the fewest per image (style sets are larger and varied).
EXPOSURES_PER_IMAGE = {"character": 100, "concept": 80, "style": 50, "": 80}
SAMPLES_PER_EPOCH = 100  # repeats make an epoch about this long: shuffles and epoch counts stay meaningful


def suggest_schedule(image_count: int, subject_preset: str = "", effective_batch: int | None = None,
                     rank: int = 16) -> dict[str, Any]:
    """Steps, learning rate and repeats for `image_count` images; `reason` says how they were found.

    Steps give each image the subject's exposures (clamped to 400-4000); the learning rate
    is 1e-4 at effective batch 2 (the character and concept presets' batch), scaled by the
    square root of the effective batch, and lowered for ranks above 16.
    """
    if image_count < 1:
        raise ConfigError("no images to plan a schedule for")
    preset = SUBJECT_PRESET_VALUES.get(subject_preset, {})
    batch = effective_batch or preset.get("batch_size", 1) * preset.get("gradient_accumulation", 1)
    exposures = EXPOSURES_PER_IMAGE.get(subject_preset, EXPOSURES_PER_IMAGE[""])
    steps = int(min(4000, max(400, round(image_count * exposures / batch / 50) * 50)))
    lr = 1e-4 * (batch / 2) ** 0.5 * (16 / max(rank, 16)) ** 0.5
    repeats = max(1, min(20, -(-SAMPLES_PER_EPOCH // image_count)))
    reason = (f"{image_count} images x {exposures} exposures ({subject_preset or 'no subject preset'}) / effective batch "
              f"{batch} = {steps} steps; learning rate {lr:.2g} (1e-4 at batch 2, x sqrt(batch / 2)"
              + (f", x sqrt(16 / rank {rank})" if rank > 16 else "") + f"); repeats {repeats}: epochs of "
              f"about {image_count * repeats} images")
    return {"steps": steps, "learning_rate": float(f"{lr:.2g}"), "repeats": repeats, "reason": reason}


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder; give the path of a YAML file written by 'flux2_train train --save-config'")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; give the path of a YAML file written by 'flux2_train train --save-config'")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {p} is not UTF-8 text; save it as UTF-8") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option: value, not {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"config file {p}: {key!r} is not an option name (YAML reads unquoted on, off, yes "
                              "and no as true and false, and numbers as numbers); write option names as text")
    return {k.replace("-", "_"): v for k, v in data.items()}


def _check_known(values: dict[str, Any], source: str) -> None:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        import difflib

        hints = []
        for u in unknown:
            close = difflib.get_close_matches(u, known, n=1)
            hints.append(f"{u}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise ConfigError(f"unknown option(s) in {source}: {', '.join(hints)}")


def resolve_config(
    subject_preset: str | None = None,
    quick_preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    image_count: int | None = None,
) -> TrainConfig:
    """Merge defaults, presets, a YAML file and explicit options, then validate.

    The `auto` quick preset takes steps, learning rate and repeats from `suggest_schedule`
    when `image_count` is known; explicit options and the file still win.
    """
    values: dict[str, Any] = {}
    if config_file:
        file_values = load_yaml(config_file)
        _check_known(file_values, str(config_file))
        subject_preset = subject_preset or file_values.get("subject_preset") or None
        quick_preset = quick_preset or file_values.get("quick_preset") or None
    else:
        file_values = {}
    if subject_preset:
        if subject_preset not in SUBJECT_PRESETS:
            raise ConfigError(f"unknown subject preset {subject_preset!r}; choose one of {', '.join(SUBJECT_PRESETS)}")
        values.update(SUBJECT_PRESET_VALUES[subject_preset], subject_preset=subject_preset)
    if quick_preset:
        if quick_preset not in QUICK_PRESETS:
            raise ConfigError(f"unknown quick preset {quick_preset!r}; choose one of {', '.join(QUICK_PRESETS)}")
        values.update(QUICK_PRESET_VALUES[quick_preset], quick_preset=quick_preset)
        if quick_preset == "auto" and image_count:
            merged = {**values, **file_values, **{k: v for k, v in (overrides or {}).items() if v is not None}}
            batch = int(merged.get("batch_size", 1)) * int(merged.get("gradient_accumulation", 1))
            plan = suggest_schedule(image_count, subject_preset or "", batch, int(merged.get("rank", 16)))
            values.update({k: plan[k] for k in ("steps", "learning_rate", "repeats")})
    values.update(file_values)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    _check_known(overrides, "the options")
    values.update(overrides)
    cfg = TrainConfig(**values)
    _coerce_types(cfg)
    for name in _PATH_OPTIONS:  # `~/...` from a YAML file or a quoted option is the home folder, as in a shell
        if getattr(cfg, name).startswith("~"):
            setattr(cfg, name, os.path.expanduser(getattr(cfg, name)))
    return cfg.validate()


def _coerce_types(cfg: TrainConfig) -> None:
    """YAML and JSON give ints for floats and strings for lists; normalise them."""
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        try:
            if isinstance(default, bool):
                if isinstance(v, str):
                    words = {"1": True, "true": True, "yes": True, "on": True,
                             "0": False, "false": False, "no": False, "off": False}
                    v = words[v.strip().lower()]  # KeyError: neither, said below
                elif not isinstance(v, (bool, int)) or v not in (0, 1):
                    raise ValueError
                setattr(cfg, f.name, bool(v))
            elif isinstance(v, bool) and isinstance(default, (int, float)):
                raise ValueError  # `steps: true` is not 1 step
            elif isinstance(default, float):
                setattr(cfg, f.name, float(v))
            elif isinstance(default, int):
                if isinstance(v, float) and not v.is_integer():
                    raise ValueError
                setattr(cfg, f.name, int(v))
            elif isinstance(default, list):
                if isinstance(v, str):
                    v = [s.strip() for s in v.split(f.metadata["separator"]) if s.strip()]
                if f.metadata["item"] is int:
                    v = [_whole_number(x, f.name) for x in v]
                setattr(cfg, f.name, list(v))
            elif isinstance(default, str):
                setattr(cfg, f.name, "" if v is None else str(v))
        except (TypeError, ValueError, KeyError):
            raise ConfigError(f"--{_flag(f.name)} must be a {type(default).__name__}, got {v!r}") from None


_PATH_OPTIONS = ("dataset", "cache_dir", "model", "encoders", "output_dir", "clip_model")


def check_run_name(name: str) -> None:
    # Letters of any script: `\w` matches them in a str pattern.
    if not re.fullmatch(r"[^\W_][\w. -]{0,120}", name) or ".." in name:
        raise ConfigError(f"run name {name!r} must be a plain name (letters, digits, . _ - and spaces, starting "
                          "with a letter or digit), no folders")


def check_output_folders(cfg: TrainConfig) -> None:
    """The folders a run writes, before any model loads: a file in the way, or a folder this user
    cannot write (read-only, another owner's), is named now, not after minutes of loading."""
    for option, folder in (("--output-dir", cfg.output_dir), ("--cache-dir", cfg.cache_dir)):
        if not folder:
            continue
        path = Path(folder).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir():
            raise ConfigError(f"{option} {folder}: {existing} is a file, not a folder; give another folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {folder}: this user cannot write in {existing} (read-only, or another "
                              "user's); give a folder you can write to")


def _whole_number(x: Any, name: str) -> int:
    try:
        if isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()):
            raise ValueError
        return int(x)
    except (TypeError, ValueError):
        raise ConfigError(f"--{_flag(name)} takes whole numbers, such as 9,18,27 (got {x!r})") from None


def save_yaml(cfg: TrainConfig, path: str | Path) -> None:
    import yaml

    from .fsutil import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
