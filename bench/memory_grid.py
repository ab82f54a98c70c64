"""Calibration grid of the vRAM estimate: measured peak memory of real training steps vs `flux2_train.memory`.

Each point trains a few steps of the engine's real loop (`Trainer`) on a real-size
FLUX.2 transformer with random weights, in its own process, and records:

* `device_peak`: the most memory in use on the card while it ran (what nvidia-smi shows),
  polled with `cudaMemGetInfo` every millisecond by a background thread;
* `reserved_peak` / `allocated_peak`: `torch.cuda.max_memory_reserved` / `_allocated`;
* `context`: the card's memory in use once CUDA is initialised, before any tensor.

"engine" points run the diffusers model as the CLI does (expandable segments).
"comfyui" points run ComfyUI's FLUX.2 model through the training node's backbone,
with ComfyUI's default allocator on CUDA 13 (cudaMallocAsync) and its regular
ModelPatcher, or DynamicVRAM where the point says so; fp8 is ComfyUI's
`weight_dtype fp8_e4m3fn`, offload is ComfyUI's partial load under `--reserve-vram`.

    python bench/memory_grid.py --comfyui /path/to/ComfyUI            # every point, one process each
    python bench/memory_grid.py --only engine                          # the diffusers points
    python bench/memory_grid.py --report bench/results-...-memory-grid.json   # the table, with today's estimate

With OUT set, the records are appended to $OUT/memory_grid.json. `--report` recomputes
the estimate of every recorded point with the current code and prints the errors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

GIB = 2**30

# name: host, family, image size (w, h), rank, batch, checkpointing, weights,
# ComfyUI's memory mode: None (regular ModelPatcher), --reserve-vram GiB, or "dynamic" (DynamicVRAM),
# and its allocator: "async" (cudaMallocAsync, its default on CUDA 13) or "native" (--disable-cuda-malloc)
GRID = [
    ("e-4b-1024", "engine", "klein-4b", (1024, 1024), 16, 1, False, "bf16", None),
    ("e-4b-1024-ckpt", "engine", "klein-4b", (1024, 1024), 16, 1, True, "bf16", None),
    ("e-4b-512", "engine", "klein-4b", (512, 512), 16, 1, False, "bf16", None),
    ("e-4b-1024-r64-b2", "engine", "klein-4b", (1024, 1024), 64, 2, False, "bf16", None),
    ("e-4b-768x1344", "engine", "klein-4b", (768, 1344), 16, 1, False, "bf16", None),
    ("e-9b-1024", "engine", "klein-9b", (1024, 1024), 16, 1, False, "bf16", None),
    ("e-9b-1024-r64-b2-ckpt", "engine", "klein-9b", (1024, 1024), 64, 2, True, "bf16", None),
    ("e-9b-512-b2", "engine", "klein-9b", (512, 512), 16, 2, False, "bf16", None),
    ("e-9b-1344x768-ckpt", "engine", "klein-9b", (1344, 768), 16, 1, True, "bf16", None),
    ("e-dev-1024-ckpt", "engine", "dev", (1024, 1024), 16, 1, True, "bf16", None),
    ("e-dev-512-r64-ckpt", "engine", "dev", (512, 512), 64, 1, True, "bf16", None),
    ("e-dev-1024-b2-ckpt", "engine", "dev", (1024, 1024), 16, 2, True, "bf16", None),
    ("e-dev-1024", "engine", "dev", (1024, 1024), 16, 1, False, "bf16", None),
    ("e-dev-512", "engine", "dev", (512, 512), 16, 1, False, "bf16", None),
    ("c-4b-1024", "comfyui", "klein-4b", (1024, 1024), 16, 1, False, "bf16", None),
    ("c-4b-1024-fp8", "comfyui", "klein-4b", (1024, 1024), 16, 1, False, "fp8", None),
    ("c-4b-1024-fp8-ckpt", "comfyui", "klein-4b", (1024, 1024), 16, 1, True, "fp8", None),
    ("c-4b-1024-ckpt-offload", "comfyui", "klein-4b", (1024, 1024), 16, 1, True, "bf16", 73.0),
    ("c-9b-1024-fp8-ckpt", "comfyui", "klein-9b", (1024, 1024), 16, 1, True, "fp8", None),
    ("c-9b-1024-ckpt", "comfyui", "klein-9b", (1024, 1024), 16, 1, True, "bf16", None),
    ("c-4b-768-fp8-b2", "comfyui", "klein-4b", (768, 768), 16, 2, False, "fp8", None),
    ("c-4b-1024-ckpt-offload-all", "comfyui", "klein-4b", (1024, 1024), 16, 1, True, "bf16", 75.0),
    # ComfyUI's default on NVIDIA when comfy-aimdo is installed: DynamicVRAM streams every weight per op.
    ("c-4b-1024-dynamic", "comfyui", "klein-4b", (1024, 1024), 16, 1, False, "bf16", "dynamic"),
    ("c-4b-1024-ckpt-dynamic", "comfyui", "klein-4b", (1024, 1024), 16, 1, True, "bf16", "dynamic"),
    # ComfyUI started with --disable-cuda-malloc: PyTorch's own caching allocator.
    ("c-4b-1024-native", "comfyui", "klein-4b", (1024, 1024), 16, 1, False, "bf16", None, "native"),
    ("c-4b-1024-fp8-native", "comfyui", "klein-4b", (1024, 1024), 16, 1, False, "fp8", None, "native"),
    ("c-9b-1024-ckpt-native", "comfyui", "klein-9b", (1024, 1024), 16, 1, True, "bf16", None, "native"),
    # Held out: measured after the engine's constants were fitted on the engine points above.
    ("h-4b-1536x640-r32", "engine", "klein-4b", (1536, 640), 32, 1, False, "bf16", None),
    ("h-9b-768-r32-ckpt", "engine", "klein-9b", (768, 768), 32, 1, True, "bf16", None),
    ("h-dev-768-b2-ckpt", "engine", "dev", (768, 768), 16, 2, True, "bf16", None),
]
FIELDS = ("name", "host", "family", "size", "rank", "batch", "checkpointing", "weights", "memory_mode", "allocator")
STEPS = 4


def point(name: str) -> dict:
    for row in GRID:
        if row[0] == name:
            return dict(zip(FIELDS, row + ("async",) * (len(FIELDS) - len(row))))
    raise SystemExit(f"unknown point {name!r}; choose from {', '.join(r[0] for r in GRID)}")


class PeakPoller:
    """The card's memory in use, polled every millisecond (allocator pools and the context included)."""

    def __init__(self, device):
        import torch

        self.torch, self.device = torch, device
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def used(self) -> int:
        free, total = self.torch.cuda.mem_get_info(self.device)
        return total - free

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.used())


def measure(p: dict, comfyui: str | None, trim_pool: str = "") -> dict:
    import torch

    device = torch.device("cuda")
    torch.cuda.init()
    torch.zeros(1, device=device)
    free, total = torch.cuda.mem_get_info(device)
    rec = dict(p, size=list(p["size"]), steps=STEPS, status="ok", error="", card_bytes=total,
               context=total - free - torch.cuda.memory_reserved(device),
               gpu=torch.cuda.get_device_name(device), torch=torch.__version__,
               alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""))
    work = Path(tempfile.mkdtemp(prefix=f"memgrid_{p['name']}_"))
    try:
        from train_speed import SyntheticEncoder, family_config, write_dataset

        from flux2_train.config import resolve_config
        from flux2_train.errors import OutOfMemory
        from flux2_train.events import EventBus, StatusEvent, StepEvent
        from flux2_train.train import Trainer

        config = family_config(p["family"])
        w, h = p["size"]
        write_dataset(work / "data", max(w, h), 2 * p["batch"], size=(w, h))
        poller = PeakPoller(device)
        if p["host"] == "engine":
            from train_speed import build_transformer

            from flux2_train.model import DiffusersFlux2Backbone

            backbone = DiffusersFlux2Backbone(build_transformer(config, device))
            dtype = "bfloat16"
        else:
            backbone, dtype = comfy_backbone(p, config, comfyui, rec)
        resolution = resolution_of(p)
        cfg = resolve_config(overrides=dict(
            dataset=str(work / "data"), output_dir=str(work / "runs"), cache_dir=str(work / "cache"), name="grid",
            resolution=resolution, steps=STEPS, rank=p["rank"], alpha=float(p["rank"]), targets="attention_mlp",
            gradient_checkpointing=p["checkpointing"], dtype=dtype, device="cuda", batch_size=p["batch"],
            gradient_accumulation=1, caption_dropout=0.0, save_every=0, keep_checkpoints=1, tensorboard=False,
            max_sequence_length=512, memory_check=False))
        rec["resolution"] = resolution
        seconds, step_reserved, step_allocated = [], [], []

        def on_event(ev):
            # The peaks of loading and caching, then of each step, each from a fresh count.
            if isinstance(ev, StatusEvent) and ev.kind == "training":
                rec["load_reserved"] = torch.cuda.max_memory_reserved(device)
                rec["load_allocated"] = torch.cuda.max_memory_allocated(device)
                if trim_pool:
                    torch.cuda.empty_cache()
            if isinstance(ev, StepEvent):
                seconds.append(ev.seconds_per_step)
                step_reserved.append(torch.cuda.max_memory_reserved(device))
                step_allocated.append(torch.cuda.max_memory_allocated(device))
                if trim_pool == "step":
                    torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)

        events = EventBus([on_event])
        torch.cuda.reset_peak_memory_stats(device)
        with poller:
            try:
                with torch.inference_mode(False):
                    result = Trainer(cfg, backbone, encoder=SyntheticEncoder(config["joint_attention_dim"]),
                                     events=events).run()
                rec["buckets"] = [list(b) for b in result.dataset.bucket_counts]
            except (OutOfMemory, torch.OutOfMemoryError) as e:
                rec.update(status="oom", error=str(e).splitlines()[0][:300])
            finally:
                if hasattr(backbone, "patcher"):
                    rec["loaded_bytes"] = backbone.patcher.loaded_size()
                    backbone.release()
        rec["device_peak"] = poller.peak
        rec["reserved_peak"] = max([torch.cuda.max_memory_reserved(device), rec.get("load_reserved", 0)]
                                   + step_reserved)
        rec["allocated_peak"] = max([torch.cuda.max_memory_allocated(device), rec.get("load_allocated", 0)]
                                    + step_allocated)
        rec["step_seconds"] = seconds
        rec["step_reserved"], rec["step_allocated"] = step_reserved, step_allocated
        rec["trim_pool"] = trim_pool
    except Exception as e:
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rec


def comfy_backbone(p: dict, config: dict, comfyui: str | None, rec: dict):
    """ComfyUI's FLUX.2 model loaded as Load Diffusion Model does, in the training node's backbone."""
    import torch
    from comfy_train_speed import import_comfy, import_pack, random_bfl_state_dict

    if not comfyui:
        raise SystemExit("comfyui points need --comfyui (a ComfyUI tree)")
    mode = p.get("memory_mode", p.get("reserve_vram"))
    comfy = import_comfy(Path(comfyui), dynamic_vram=mode == "dynamic",
                         reserve_vram=mode if isinstance(mode, (int, float)) else None)
    comfy_model = import_pack()
    sd = random_bfl_state_dict(config, 0)
    options = {"dtype": torch.float8_e4m3fn} if p["weights"] == "fp8" else {}
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
    del sd
    rec["model_bytes"] = patcher.model_size()
    # The Trainer's preflight tells ComfyUI how much training needs besides the weights, as in
    # the node; ComfyUI offloads the weights that do not fit beside it.
    return comfy_model.ComfyFlux2Backbone(patcher), "bfloat16"


def resolution_of(p: dict) -> int:
    """The resolution whose buckets hold the point's image: about sqrt(w x h), a multiple of 16."""
    w, h = p["size"]
    return int(round((w * h) ** 0.5 / 16)) * 16


def resolve_probe(p: dict):
    from flux2_train.config import resolve_config

    return resolve_config(overrides=dict(resolution=resolution_of(p), rank=p["rank"],
                                         batch_size=p["batch"], gradient_checkpointing=p["checkpointing"],
                                         targets="attention_mlp"))


# ---------------------------------------------------------------------------
# Estimates of recorded points, and the table
# ---------------------------------------------------------------------------

def estimate_for(rec: dict):
    """Today's estimate of a recorded point, with what the run itself knew (buckets, ComfyUI's load)."""
    from flux2_train.memory import Placement, estimate_memory
    from flux2_train.model import spec_from_config
    from train_speed import family_config

    spec = spec_from_config(family_config(rec["family"]))
    cfg = resolve_probe(rec)
    buckets = [tuple(b) for b in rec.get("buckets") or [rec["size"]]]
    if rec["host"] == "comfyui":
        dynamic = rec.get("memory_mode") == "dynamic"
        loaded = rec["model_bytes"] if dynamic else rec.get("loaded_bytes", rec["model_bytes"])
        placement = Placement("comfyui", rec["weights"], rec["model_bytes"], offloaded_bytes=rec["model_bytes"] - loaded,
                              streamed=dynamic, allocator=rec.get("allocator", "async"))
    else:
        placement = Placement("engine", rec["weights"])
    return estimate_memory(spec, cfg, placement, available=rec["card_bytes"], buckets=buckets, advise=False)


def table(records: list[dict]) -> tuple[str, float]:
    """The records against today's estimate, and the worst error.

    Where the estimate states a spread (cudaMallocAsync with weights cast per op, whose pool
    settles in one of two modes from run to run) the error is the one to the nearer of the
    estimate and its upper figure; both are printed.
    """
    rows = ["| point | host | model | image | rank | batch | ckpt | weights | measured GiB (card / reserved) "
            "| estimate GiB (up to) | error (to up to) | estimate says | measured |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    for r in records:
        est = estimate_for(r)
        says = "does not fit" if est.total > r["card_bytes"] else "fits"
        size = "x".join(map(str, r["size"]))
        if r.get("memory_mode") == "dynamic":
            weights = r["weights"] + ", DynamicVRAM"
        else:
            weights = r["weights"] + (f", {(r['model_bytes'] - r['loaded_bytes']) / GIB:.1f} GiB offloaded"
                                      if r.get("loaded_bytes") is not None and r["loaded_bytes"] < r["model_bytes"]
                                      else "")
        upto = f" ({est.upper / GIB:.2f})" if est.spread else ""
        if r["status"] == "ok":
            err = est.total / r["device_peak"] - 1
            err_upper = est.upper / r["device_peak"] - 1
            worst = max(worst, min(abs(err), abs(err_upper)))
            measured = f"{r['device_peak'] / GIB:.2f} / {r['reserved_peak'] / GIB:.2f}"
            errs = f"{err:+.1%}" + (f" ({err_upper:+.1%})" if est.spread else "")
            outcome = "ran"
        else:
            measured, errs, outcome = "–", "–", r["status"] if r["status"] != "oom" else "out of memory"
        rows.append(f"| {r['name']} | {r['host']} | {r['family']} | {size} | {r['rank']} | {r['batch']} "
                    f"| {'on' if r['checkpointing'] else 'off'} | {weights} | {measured} | {est.total / GIB:.2f}{upto} "
                    f"| {errs} | {says} | {outcome} |")
    return "\n".join(rows), worst


def load_records(*paths: str) -> list[dict]:
    """The points recorded in `paths`; a point measured again in a later file replaces the earlier one."""
    points: list[dict] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        later = data["points"] if isinstance(data, dict) else data
        names = {r["name"] for r in later}
        points = [r for r in points if r["name"] not in names] + later
    return points


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI tree, for comfyui points")
    ap.add_argument("--only", choices=("engine", "comfyui"), help="run only these points")
    ap.add_argument("--points", help="comma-separated point names")
    ap.add_argument("--report", action="append", help="print the table of a recorded JSON with today's estimate "
                    "(repeat it: a point measured again in a later file replaces the earlier one)")
    ap.add_argument("--repeat", type=int, default=1, help="measure each point this many times")
    ap.add_argument("--trim-pool", choices=("start", "step"), default="",
                    help="release the allocator's cached memory (torch.cuda.empty_cache) before training, or also after every step")
    ap.add_argument("--point", help=argparse.SUPPRESS)  # child process: measure one point
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.report:
        text, worst = table(load_records(*args.report))
        print(text)
        print(f"\nworst error over the points that ran: {worst:.1%}")
        return 0
    if args.point:
        rec = measure(point(args.point), args.comfyui, args.trim_pool)
        Path(args.result_file).write_text(json.dumps(rec))
        return 0

    names = args.points.split(",") if args.points else [r[0] for r in GRID if not args.only or r[1] == args.only]
    names = [n for n in names for _ in range(args.repeat)]
    records = []
    for name in names:
        p = point(name)
        env = dict(os.environ)
        # The allocator each host runs with: the CLI's expandable segments, ComfyUI's cudaMallocAsync on
        # CUDA 13, or with --disable-cuda-malloc PyTorch's default (nothing set).
        env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
        if p["host"] == "engine":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
        elif p["allocator"] == "async":
            env["PYTORCH_CUDA_ALLOC_CONF"] = "backend:cudaMallocAsync"
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            result = f.name
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--point", name, "--result-file", result,
                               "--comfyui", args.comfyui] + ["--trim-pool", args.trim_pool] * bool(args.trim_pool), env=env)
        try:
            rec = json.loads(Path(result).read_text())
        except (OSError, json.JSONDecodeError):
            rec = dict(p, size=list(p["size"]), status="error", error=f"exit {proc.returncode}, no result")
        Path(result).unlink(missing_ok=True)
        rec["wall_seconds"] = time.perf_counter() - t0
        peak = f"{rec['device_peak'] / GIB:.2f} GiB" if rec.get("device_peak") else "–"
        print(f"== {name}: {rec['status']} card peak {peak} in {rec['wall_seconds']:.0f} s {rec.get('error', '')[:200]}",
              flush=True)
        records.append(rec)
        if os.environ.get("OUT"):
            out = Path(os.environ["OUT"]) / "memory_grid.json"
            old = load_records(out) if out.exists() else []
            out.write_text(json.dumps({"points": old + [rec]}, indent=1))
    ok = [r for r in records if r["status"] in ("ok", "oom")]
    if ok:
        print(table(ok)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
