"""Run folders and checkpoints: written atomically, pruned to the last K, validated on resume.

    <output_dir>/<run name>/
        config.yaml                  the resolved training config
        metrics.jsonl                one line per event
        checkpoints/step-000250/     adapter.safetensors (PEFT weights), lora.safetensors
                                     (the LoRA file, ready to load), state.pt (optimizer,
                                     scheduler, step, loss history), checkpoint.json
        <run name>.safetensors       the final LoRA, plus loss.png and summary.txt
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .errors import ResumeError
from .fsutil import atomic_write, atomic_write_text, publish_dir, save_safetensors_atomic

CHECKPOINTS = "checkpoints"
# Options that change the shape or meaning of the adapter: a checkpoint cannot continue under others.
_FIXED_FOR_RESUME = ("rank", "alpha", "targets", "target_modules", "lora_dropout")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:06d}"


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    adapter: dict[str, torch.Tensor],
    write_lora,
    state: dict[str, Any],
    info: dict[str, Any],
    keep: int,
) -> Path:
    """Write a checkpoint folder under a temporary name, then rename it into place."""
    final = checkpoint_dir(run_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        save_safetensors_atomic(adapter, tmp / "adapter.safetensors")
        write_lora(tmp / "lora.safetensors")
        atomic_write(tmp / "state.pt", lambda p: torch.save(state, p))
        atomic_write_text(tmp / "checkpoint.json", json.dumps(info, indent=2, default=str))
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(run_dir, keep)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "checkpoint.json").is_file()]
    return sorted(done, key=lambda p: int(p.name.split("-")[1]))


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    root = run_dir / CHECKPOINTS
    for leftover in root.glob(".step-*"):  # folders of a write that was killed midway
        shutil.rmtree(leftover, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """The newest complete checkpoint of a run folder, or the checkpoint folder itself."""
    p = Path(path).expanduser()
    if (p / "checkpoint.json").is_file():
        return p
    if not p.is_dir():
        raise ResumeError(f"--resume {p}: no such run folder; give a run folder (e.g. runs/my-lora) or one of its checkpoints")
    found = list_checkpoints(p)
    if not found:
        raise ResumeError(f"--resume {p}: this run has no complete checkpoint yet, so there is nothing to continue; "
                          "start a new run (and lower --save-every to checkpoint sooner)")
    return found[-1]


def checkpoint_info(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's step, config and model, without its tensors."""
    return json.loads((ckpt / "checkpoint.json").read_text(encoding="utf-8"))


def load_checkpoint(ckpt: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(info, adapter weights, training state); refuses damaged files with a clear message."""
    try:
        info = checkpoint_info(ckpt)
        adapter = load_file(str(ckpt / "adapter.safetensors"))
        # weights_only: tensors, numbers and containers only, never arbitrary objects.
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {e}); "
                          "resume from an earlier one in the same checkpoints folder") from None
    return info, adapter, state


def check_resumable(info: dict[str, Any], cfg, spec) -> list[str]:
    """Raise ResumeError if the checkpoint cannot continue this config; return the options that changed."""
    saved_model = info.get("model", {})
    mismatched = [k for k in ("family", "hidden_size", "num_double", "num_single", "context_dim", "guidance_embeds")
                  if saved_model.get(k) != getattr(spec, k)]
    if mismatched:
        raise ResumeError(
            f"the checkpoint was trained on {saved_model.get('family', '?')} "
            f"({', '.join(f'{k}={saved_model.get(k)}' for k in mismatched)}), but this model is {spec.title}; "
            "resume with the model the run started with, or start a new run"
        )
    saved_cfg = info.get("config", {})
    fixed = [k for k in _FIXED_FOR_RESUME if k in saved_cfg and saved_cfg[k] != getattr(cfg, k)]
    if fixed:
        raise ResumeError(
            "the checkpoint's adapter does not fit the new options: "
            + ", ".join(f"{k} was {saved_cfg[k]!r}, now {getattr(cfg, k)!r}" for k in fixed)
            + "; keep those options to resume, or start a new run"
        )
    step = int(info.get("step", 0))
    if step >= cfg.steps:
        raise ResumeError(f"the checkpoint is at step {step} and --steps is {cfg.steps}: nothing is left to train; "
                          f"raise --steps above {step} to continue")
    ignore = {"steps", "name", "output_dir", "model", "encoders", "device", "dataset", "cache_dir"}
    return [k for k, v in saved_cfg.items() if k not in ignore and getattr(cfg, k, v) != v]
