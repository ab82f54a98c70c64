"""Run folders and checkpoints: written atomically, pruned to the last K, validated on resume.

    <output_dir>/<run name>/
        config.yaml                  the resolved training config
        metrics.jsonl                one line per event
        checkpoints/step-000250/     adapter.safetensors (PEFT weights), lora.safetensors
                                     (the LoRA file, ready to load), state.safetensors
                                     (optimizer, scheduler, step, loss history), checkpoint.json

No pickle anywhere: a checkpoint passed around between machines and people is
data only (tensors and JSON), so loading one can never run code.
        <run name>.safetensors       the final LoRA, plus loss.png and summary.txt
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .errors import DiskFull, ResumeError
from .fsutil import atomic_write_text, disk_full, out_of_space, publish_dir, restore_set_aside, save_safetensors_atomic

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.safetensors"
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
    best_step: int | None = None,
) -> Path:
    """Write a checkpoint folder under a temporary name, then rename it into place; prune the
    older ones (`prune_checkpoints`)."""
    final = checkpoint_dir(run_dir, step)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        # mkdtemp's 0700 would follow the folder through the rename: take the mode of the folder
        # it sits in, which mkdir gave as an ordinary new folder (0777 less the umask).
        os.chmod(tmp, stat.S_IMODE(os.stat(final.parent).st_mode))
    except OSError as e:  # a new folder needs a free block on most filesystems
        if out_of_space(e):
            raise disk_full(final) from None
        raise
    try:
        save_safetensors_atomic(adapter, tmp / "adapter.safetensors")
        write_lora(tmp / "lora.safetensors")
        save_state(state, tmp / STATE_FILE)
        atomic_write_text(tmp / "checkpoint.json", json.dumps(info, indent=2, default=str))
        publish_dir(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, DiskFull):
            raise disk_full(final) from None  # named by the checkpoint, not its temporary folder
        raise
    prune_checkpoints(run_dir, keep, best_step)
    return final


def checkpoint_step(path: Path) -> int:
    """The step of a checkpoint folder (`step-000250`)."""
    return int(path.name.split("-")[1])


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / "checkpoint.json").is_file()]
    return sorted(done, key=checkpoint_step)


def nearest_checkpoint(checkpoints: list[Path], step: int) -> Path | None:
    """The checkpoint nearest `step` (the later one of two as near)."""
    return min(reversed(checkpoints), key=lambda c: abs(checkpoint_step(c) - step), default=None)


def prune_checkpoints(run_dir: Path, keep: int, best_step: int | None = None) -> None:
    """All but the newest `keep` checkpoints go, except the one nearest `best_step` (the best
    validation loss so far): the run's summary names that one as the one to keep."""
    checkpoints = list_checkpoints(run_dir)
    best = nearest_checkpoint(checkpoints, best_step) if best_step is not None else None
    for old in checkpoints[:-keep]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)


def remove_leftovers(run_dir: Path) -> None:
    """Temporary files and checkpoint folders of writes that never finished (a kill, a power cut)
    anywhere in the run folder; a checkpoint moved aside by an unfinished rewrite is put back."""
    if (run_dir / CHECKPOINTS).is_dir():
        restore_set_aside(run_dir / CHECKPOINTS)
    for leftover in [*run_dir.rglob(".*.tmp"), *(run_dir / CHECKPOINTS).glob(".step-*")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def set_aside_from(run_dir: Path, first_step: int, label: str) -> list[Path]:
    """Rename the checkpoints of `first_step` and later to `LABEL-step-NNNNNN`, which resume and pruning
    pass over: kept for the user to look at, never picked as the run's newest."""
    moved = []
    for c in list_checkpoints(run_dir):
        if checkpoint_step(c) >= first_step:
            target, n = c.with_name(f"{label}-{c.name}"), 1
            while target.exists():
                n += 1
                target = c.with_name(f"{label}{n}-{c.name}")
            os.replace(c, target)
            moved.append(target)
    return moved


def find_checkpoint(path: str | Path) -> Path:
    """The newest complete checkpoint of a run folder, or the checkpoint folder itself."""
    p = Path(path).expanduser()
    if (p / "checkpoint.json").is_file():
        return p
    if p.is_file():
        raise ResumeError(f"--resume {p}: this is a file; resume takes a run folder (e.g. runs/my-lora) or one of "
                          "its checkpoint folders, which this trainer wrote (a LoRA or pickle file cannot be resumed)")
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
    if not (ckpt / STATE_FILE).is_file() and any((ckpt / n).exists() for n in ("state.pt", "state.bin")):
        raise ResumeError(f"checkpoint {ckpt} keeps its training state as a pickle file (as this trainer's versions "
                          "before safetensors checkpoints did, or another tool); it is never loaded, since "
                          "unpickling can run code. Its LoRA, lora.safetensors, loads as it is; to train on, "
                          "start a new run")
    try:
        info = checkpoint_info(ckpt)
        adapter = load_file(str(ckpt / "adapter.safetensors"))
        state = load_state(ckpt / STATE_FILE)
    except Exception as e:
        raise ResumeError(f"checkpoint {ckpt} is damaged ({type(e).__name__}: {e}); "
                          "resume from an earlier one in the same checkpoints folder") from None
    return info, adapter, state


def check_adapter(ckpt: Path, adapter: dict[str, torch.Tensor], expected: dict[str, torch.Size]) -> None:
    """Refuse adapter weights whose names or shapes are not the ones this run trains."""
    unexpected = sorted(set(adapter) - set(expected))
    missing = sorted(set(expected) - set(adapter))
    wrong = sorted(k for k in set(adapter) & set(expected) if adapter[k].shape != expected[k])
    if not (unexpected or missing or wrong):
        return
    parts = []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(adapter[k].shape)}, "
                     f"this run has {tuple(expected[k])})")
    raise ResumeError(f"checkpoint {ckpt} holds adapter weights that do not fit this run: {'; '.join(parts)}; "
                      "resume with the model and LoRA options the run started with, or start a new run")


# The training state (optimizer and scheduler state dicts, counters, losses) as safetensors:
# tensors stored as tensors, the structure around them as JSON in the header.
def save_state(state: dict[str, Any], path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _pack(state, tensors)
    save_safetensors_atomic(tensors, path, metadata={"state": json.dumps(skeleton)})


def load_state(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        skeleton = json.loads((f.metadata() or {})["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _unpack(skeleton, tensors)


def _pack(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().clone()  # its own storage: safetensors refuses tensors that share one
        return {"tensor": key}
    if isinstance(obj, dict):  # keys may be ints (optimizer state by parameter index)
        return {"dict": [[k, _pack(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list": [_pack(v, tensors) for v in obj]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _unpack(obj, tensors: dict[str, torch.Tensor]):
    if not isinstance(obj, dict):
        return obj
    (kind, value), = obj.items()
    if kind == "tensor":
        return tensors[value]
    if kind == "dict":
        return {k: _unpack(v, tensors) for k, v in value}
    items = [_unpack(v, tensors) for v in value]
    return tuple(items) if kind == "tuple" else items


def check_not_finished(run_dir: Path, step: int, cfg) -> None:
    """A checkpoint at the last step resumes only to write final files that a crash cut short."""
    done = (run_dir / "summary.txt").is_file() and (run_dir / f"{cfg.name or run_dir.name}.safetensors").is_file()
    if step >= cfg.steps and done:
        raise ResumeError(f"the run {run_dir} already finished at step {step} and its LoRA is written; "
                          f"raise --steps above {step} to train on from its last checkpoint")


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
    if step > cfg.steps:  # at cfg.steps exactly the resume writes the final files (a save that was cut short)
        raise ResumeError(f"the checkpoint is at step {step} and --steps is {cfg.steps}: nothing is left to train; "
                          f"raise --steps above {step} to continue")
    ignore = {"steps", "name", "output_dir", "model", "encoders", "device", "dataset", "cache_dir"}
    return [k for k, v in saved_cfg.items() if k not in ignore and getattr(cfg, k, v) != v]
