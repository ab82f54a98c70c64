"""Our trainer against its peers, one FLUX.2 family per call, all runs on the same GPU.

Each run is its own subprocess (an out-of-memory run loses nothing else):

* peers (`bench/peers.py`): the diffusers + PEFT recipe of diffusers' FLUX.2 DreamBooth
  LoRA example (its default targets with `torch.compile`, and LoRA on every block
  Linear), and ComfyUI's built-in `TrainLoraNode` step on ComfyUI's own FLUX.2 model;
* the engine (`bench/train_speed.py`): the CLI's loop on diffusers' model, in the modes
  given by `--engine` (default: the fastest that fits the card);
* the training node's path (`bench/comfy_train_speed.py`): the same loop on ComfyUI's
  model as the stock loader gives it (DynamicVRAM on NVIDIA, eager) and held on the GPU by a
  regular ModelPatcher with its blocks compiled.

Random weights at the family's real size, 1024², batch 1, LoRA rank 16 on every block
Linear (the peers' default-target row excepted), median s/step after the warm-up, peak
memory allocated (and reserved) by PyTorch. MFU = (2 x the Linear FLOPs of one forward
pass of the frozen model + 3 x its attention FLOPs) / 989 TFLOP/s (H100 dense bf16),
the same FLOP count for every row of a family (the engine's run counts it); LoRA
FLOPs (under 1% at rank 16) and recomputation are not counted.

    python3 bench/compare.py --family klein-4b --comfyui /path/to/ComfyUI

Prints the table (with each row's speed-up over each peer), then each of the family's targets
(`TARGETS`): met, or missed and by how much; with OUT set, writes $OUT/compare-<family>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

BENCH = Path(__file__).resolve().parent
PEAK = 989.4e12

# The engine's modes per family: the fastest the card holds (bench/README.md says how they were chosen).
ENGINE_MODES = {
    "tiny": ["--compile --quantize-base fp8"],
    "klein-4b": ["--compile --quantize-base fp8 --attention cudnn",
                 "--compile --quantize-base nf4 --gradient-checkpointing --memory-cap-gib 7.5 --attention cudnn"],
    "klein-9b": ["--compile --quantize-base fp8 --attention cudnn"],
    "dev": ["--compile --quantize-base fp8 --gradient-checkpointing --checkpoint-blocks 10 --offload-activations 16 "
            "--attention cudnn"],
}
# The node's path: ComfyUI's model as the stock loader gives it (DynamicVRAM on NVIDIA), and held
# on the GPU by a regular ModelPatcher (ComfyUI's --disable-dynamic-vram), where its blocks compile.
COMPILED_NODE = "--attention cudnn --no-dynamic-vram --compile"
COMFY_MODES = {
    "tiny": [""],
    "klein-4b": ["--attention cudnn", COMPILED_NODE],
    "klein-9b": ["--gradient-checkpointing", COMPILED_NODE],
    "dev": ["--gradient-checkpointing", "--weight-dtype fp8_mixed --gradient-checkpointing --checkpoint-blocks 10 "
            "--offload-activations 16 " + COMPILED_NODE],
}
PEER_MODES = {  # (label, options); [dev] needs checkpointing in every peer
    "diffusers default targets + compile": "--peer diffusers --targets default --compile",
    "diffusers all block linears": "--peer diffusers --targets all_linear",
    "ComfyUI TrainLoraNode": "--peer comfyui",
}


def run_job(script: str, argv: list[str], result_name: str, timeout: float) -> dict:
    """Run one benchmark script in its own process; its record (the last it wrote) or an error record."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, str(BENCH / script), *argv]
        env, prefix = dict(os.environ, OUT=out), ""
        if script == "train_speed.py" and "--offload-activations" in argv:
            # As the engine's offloaded-activation runs were measured (the CLI sets it for every run):
            # activations that come back in odd sizes fragment the default allocator.
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
            prefix = f"PYTORCH_CUDA_ALLOC_CONF={env['PYTORCH_CUDA_ALLOC_CONF']} "
        print(f"== {prefix}{' '.join(shlex.quote(c) for c in cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        path = Path(out) / result_name
        try:
            data = json.loads(path.read_text())
            rec = (data["runs"] if isinstance(data, dict) else data)[-1]
        except (OSError, json.JSONDecodeError, KeyError, IndexError):
            rec = dict(status="error", error=f"exited with {code} and wrote no result")
        rec["wall_seconds_total"] = time.perf_counter() - t0
        rec["command"] = f"{prefix}python3 bench/{script} " + " ".join(shlex.quote(a) for a in argv)
        return rec


def table(rows: list[dict], flops: float | None) -> str:
    peers = [r for r in rows if r["tool"].startswith("peer") and r.get("median_s_per_step")]
    head = ["tool, setup", "s/step", "peak GiB alloc (reserved)", "MFU"] + [f"× vs {p['label']}" for p in peers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.get("median_s_per_step")
        cells = [f"{r['tool']}: {r['label']}"]
        if not s:
            cells += [r.get("status", "error") + (f": {r.get('error', '')[:120]}" if r.get("error") else ""), "–", "–"]
            cells += ["–"] * len(peers)
        else:
            alloc, reserved = r.get("peak_allocated_gib"), r.get("peak_reserved_gib")
            cells += [f"{s:.3f}", f"{alloc:.1f} ({reserved:.1f})" if alloc and reserved else
                      (f"{alloc:.1f}" if alloc else "–"), f"{100 * flops / s / PEAK:.0f}%" if flops else "–"]
            cells += [f"{p['median_s_per_step'] / s:.2f}" for p in peers]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def checkpointing_label(rec: dict) -> str:
    """A node run's checkpointing and offloaded activations, from its record."""
    if not rec.get("gradient_checkpointing"):
        return ""
    blocks, offloaded = rec.get("checkpoint_blocks") or 0, rec.get("offload_activations") or 0
    return (f", ckpt {blocks}" if blocks else ", ckpt all") + (
        f" + {offloaded} blocks' activations offloaded" if offloaded else "")


class Target(NamedTuple):
    """A target on one H100 (1024², rank 16 on every block Linear, batch 1), met by the fastest run of
    `path` without a memory cap: at most `goal` s/step, or, where `peer` is set, `goal` times as fast
    as the fastest peer whose label holds `peer` ("": any peer), at no more peak memory if `same_memory`."""
    path: str  # "engine" or "ComfyUI node"
    goal: float
    peer: str | None = None
    same_memory: bool = False


TARGETS = {
    "klein-4b": [Target("engine", 0.15), Target("engine", 3.5, peer="ComfyUI TrainLoraNode"),
                 Target("engine", 1.5, peer="diffusers")],
    "klein-9b": [Target("engine", 0.30)],
    "dev": [Target("engine", 1.0), Target("ComfyUI node", 1.0), Target("engine", 1.5, peer="", same_memory=True)],
}


def verdicts(family: str, rows: list[dict]) -> list[str]:
    """Each target of `family` against this run's rows: met, or missed and by how much."""
    def fastest(candidates):
        timed = [r for r in candidates if r.get("median_s_per_step") and not r.get("memory_cap_gib")]
        return min(timed, key=lambda r: r["median_s_per_step"]) if timed else None

    lines = []
    for target in TARGETS.get(family, []):
        ours = fastest([r for r in rows if target.path in r["tool"]])
        if target.peer is None:
            text = f"≤ {target.goal} s/step"
            value = ours["median_s_per_step"] if ours else None
            shown = f"{value:.3f} s" if value else ""
            met, short = value is not None and value <= target.goal, value and (value - target.goal) / target.goal
        else:
            name = target.peer or "the fastest peer"
            text = f"≥ {target.goal}× {name}" + (" at no more memory" if target.same_memory else "")
            peer = fastest([r for r in rows if r["tool"] == "peer" and target.peer in r["label"]])
            value = peer["median_s_per_step"] / ours["median_s_per_step"] if ours and peer else None
            more_memory = bool(value and target.same_memory
                               and ours.get("peak_allocated_gib", 0) > peer.get("peak_allocated_gib", 0))
            shown = f"{value:.2f}× ({peer['label']}{', at more memory' if more_memory else ''})" if value else ""
            met = value is not None and value >= target.goal and not more_memory
            short = value and (target.goal - value) / target.goal
        if not value:
            verdict = "not measured"
        elif met:
            verdict = f"{shown}: met"
        else:
            verdict = f"{shown}: missed" + (f" by {100 * short:.1f}%" if short > 0 else "")
        lines.append(f"target, {target.path}: {text}: {verdict}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", required=True, choices=("tiny", "klein-4b", "klein-9b", "dev"))
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI tree (folder with main.py)")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--engine", action="append", help="options of an engine run (repeat); default per family")
    ap.add_argument("--comfy", action="append", help="options of a training-node run (repeat); default per family")
    ap.add_argument("--skip", action="append", default=[], help="leave out: peers, engine, comfy")
    ap.add_argument("--timeout", type=float, default=400, help="seconds per run")
    args = ap.parse_args(argv)
    fam = args.family
    common = ["--family", fam, "--resolution", str(args.resolution), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--rank", "16"]
    checkpointing = ["--gradient-checkpointing"] if fam == "dev" else []
    device = ["--device", args.device]
    rows = []
    if "peers" not in args.skip:
        for label, options in PEER_MODES.items():
            extra = shlex.split(options)
            if "comfyui" in options:
                if not args.comfyui:
                    continue
                extra += ["--comfyui", args.comfyui]
            rec = run_job("peers.py", common + device + checkpointing + extra, "peers.json", args.timeout)
            rows.append(dict(rec, tool="peer", label=label + (", checkpointing" if checkpointing else "")))
    if "engine" not in args.skip:
        for options in args.engine or ENGINE_MODES.get(fam, [""]):
            rec = run_job("train_speed.py", common + device + ["--targets", "attention_mlp"] + shlex.split(options),
                          "bench.json", args.timeout)
            rows.append(dict(rec, tool="ours, engine (CLI)", label=rec.get("mode") or options))
    if "comfy" not in args.skip and args.comfyui:
        for options in args.comfy or COMFY_MODES.get(fam, [""]):
            argv_ = common + ["--comfyui", args.comfyui] + shlex.split(options)
            if args.device == "cpu":
                argv_.append("--cpu")
            rec = run_job("comfy_train_speed.py", argv_, "comfy_bench.json", args.timeout)
            label = ("fp8 e4m3 MODEL" if "fp8" in options else "bf16 MODEL") + (
                ", regular ModelPatcher" if "--no-dynamic-vram" in options else "") + (
                checkpointing_label(rec)) + (
                ", compiled" if rec.get("compiled") else "")
            rows.append(dict(rec, tool="ours, ComfyUI node", label=label))
    # The engine's count: a peer counts after adding PEFT's adapter Linears, which the MFU leaves out.
    engine_first = sorted(rows, key=lambda r: not r.get("tool", "").startswith("ours, engine"))
    flops = next((r["model_tflop_per_step"] * 1e12 for r in engine_first
                  if r.get("model_tflop_per_step") and r.get("forward_linear_tflop")), None)
    env = next((r for r in rows if r.get("gpu")), {})
    print(f"\n{fam}, {args.resolution}², rank 16, batch 1; {env.get('gpu', args.device)}; "
          f"model TFLOP per step {flops / 1e12:.2f}" if flops else f"\n{fam}")
    print(table(rows, flops))
    targets = verdicts(fam, rows)
    if targets and "H100" not in env.get("gpu", ""):
        # The targets are set for one H100: on another card the verdicts only say how far this one is.
        targets.insert(0, f"the targets are for one H100; this run's GPU: {env.get('gpu', args.device)}")
    for line in targets:
        print(line)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / f"compare-{fam}.json"
        path.write_text(json.dumps(dict(family=fam, resolution=args.resolution, model_flops_per_step=flops,
                                        rows=rows, targets=targets), indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
