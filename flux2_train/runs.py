"""The run history: the runs of an output folder as a table, two runs compared, a run's options as a preset.

Everything is read from what each run folder already holds: config.yaml and
metrics.jsonl (one line per event), so runs of earlier versions, cancelled runs
and runs still going are listed too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import load_yaml
from .errors import ConfigError
from .evaluation import best_step
from .fsutil import atomic_write_text

# Options that say where a run was, not how it trained: left out of comparisons and presets.
MACHINE_OPTIONS = ("dataset", "model", "encoders", "output_dir", "cache_dir", "name", "device", "clip_model")


@dataclass
class RunRecord:
    path: Path
    config: dict
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)
    status: str = "running or killed"
    model: str = ""
    lora_path: str = ""
    seconds: float | None = None

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def best_validation(self) -> tuple[int, float] | None:
        return best_step(self.validation)


def read_run(path: str | Path) -> RunRecord:
    path = Path(path)
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a run folder (no config.yaml); `python -m flux2_train runs` lists the runs")
    record = RunRecord(path, load_yaml(path / "config.yaml"))
    metrics = path / "metrics.jsonl"
    lines = metrics.read_text(encoding="utf-8").splitlines() if metrics.is_file() else []
    by_step: dict[int, tuple[float, float]] = {}
    validation: dict[int, float] = {}
    seconds, start, last = 0.0, None, None  # summed per session: a resume starts a new one
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a line a killed run left half-written
        kind, data, now = event.get("kind"), event.get("data") or {}, event.get("time")
        if kind == "info" and data.get("model"):  # each session (the first, or a resume) opens with it
            record.model, record.status = data["model"], "running or killed"
            if start is not None and last is not None:
                seconds += last - start
            start = now
        last = now if now is not None else last
        if kind == "step" and event.get("loss") is not None:
            # A resume repeats the steps after its checkpoint: the last record of a step wins.
            by_step[event["step"]] = (event["loss"], event.get("smoothed_loss") or event["loss"])
        elif kind == "validation":
            validation[event["step"]] = data["validation_loss"]
        elif kind == "finished":
            record.status, record.lora_path = "finished", data.get("lora_path", "")
        elif kind in ("cancelled", "failed"):
            record.status = f"{kind} at step {event.get('step', 0)}"
    record.steps = sorted(by_step)
    record.losses = [by_step[s][0] for s in record.steps]
    record.smoothed = [by_step[s][1] for s in record.steps]
    record.validation = sorted(validation.items())
    if start is not None and last is not None:
        record.seconds = seconds + last - start
    return record


def find_runs(output_dir: str | Path) -> list[RunRecord]:
    root = Path(output_dir)
    if not root.is_dir():
        raise ConfigError(f"{root} does not exist; give the --output-dir the runs were written to")
    runs = [read_run(p) for p in sorted(root.iterdir()) if (p / "config.yaml").is_file()]
    return sorted(runs, key=lambda r: (r.path / "config.yaml").stat().st_mtime)


def runs_table(runs: list[RunRecord]) -> str:
    header = ["run", "model", "preset", "steps", "final loss", "best validation", "time", "status", "LoRA"]
    rows = []
    for r in runs:
        cfg = r.config
        preset = "/".join(p for p in (cfg.get("subject_preset"), cfg.get("quick_preset")) if p) or "-"
        best = r.best_validation
        rows.append([
            r.name, r.model or "-", preset, f"{r.steps[-1] if r.steps else 0}/{cfg.get('steps', '?')}",
            f"{r.smoothed[-1]:.4f}" if r.smoothed else "-",
            f"{best[1]:.4f} @ {best[0]}" if best else "-",
            _duration(r.seconds), r.status, r.lora_path or "-",
        ])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines) + "\n"


def config_differences(a: RunRecord, b: RunRecord) -> list[tuple[str, object, object]]:
    keys = sorted((set(a.config) | set(b.config)) - set(MACHINE_OPTIONS))
    return [(k, a.config.get(k), b.config.get(k)) for k in keys if a.config.get(k) != b.config.get(k)]


def compare_runs(a: RunRecord, b: RunRecord, png: Path) -> str:
    """The two configs' differences as text, and both curves in one PNG."""
    from .plot import save_runs_plot

    save_runs_plot(png, [(r.name, r.steps, r.smoothed, [s for s, _ in r.validation], [v for _, v in r.validation])
                         for r in (a, b)], title=f"{a.name} vs {b.name}")
    diffs = config_differences(a, b)
    lines = [f"{'option':<24}{a.name:<32}{b.name}"]
    lines += [f"{k:<24}{_show(va):<32}{_show(vb)}" for k, va, vb in diffs] or ["(the same options)"]
    for r in (a, b):
        best = r.best_validation
        lines.append(f"{r.name}: {len(r.steps)} steps, final smoothed loss "
                     + (f"{r.smoothed[-1]:.4f}" if r.smoothed else "-")
                     + (f", best validation {best[1]:.4f} at step {best[0]}" if best else ""))
    lines.append(f"curves: {png}")
    return "\n".join(lines) + "\n"


def save_preset(run: RunRecord, path: str | Path) -> Path:
    """The run's training options as a YAML file for `train --config` (its data and model paths left out)."""
    import yaml

    options = {k: v for k, v in run.config.items() if k not in MACHINE_OPTIONS}
    text = f"# training options of run {run.name}; use with: python -m flux2_train train --config {Path(path).name} " \
           "--dataset DIR --model PATH\n" + yaml.safe_dump(options, sort_keys=True)
    return atomic_write_text(path, text)


def resolve_run(name: str, output_dir: str | Path) -> RunRecord:
    p = Path(name).expanduser()
    return read_run(p if p.is_dir() else Path(output_dir) / name)


def _show(value) -> str:
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{s:02d}s"
