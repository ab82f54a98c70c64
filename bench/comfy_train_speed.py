"""Speed and memory of training on ComfyUI's own FLUX.2 model, as the training node does it.

The model is ComfyUI's FLUX.2 class at a released family's size with random
weights, loaded the way Load Diffusion Model loads a file (`comfy.sd.
load_diffusion_model_state_dict` under inference mode, weights on the CPU until
ComfyUI's model management moves them). The run is the node's path: the pack's
`ComfyFlux2Backbone` on a ModelPatcher, the engine's Trainer, features from
`train_speed.SyntheticEncoder` (the text encoder and VAE only fill the cache).

    python bench/comfy_train_speed.py --comfyui /path/to/ComfyUI --family klein-4b --resolution 1024 --steps 25
    python bench/comfy_train_speed.py ... --weight-dtype fp8_e4m3fn --gradient-checkpointing
    python bench/comfy_train_speed.py ... --no-dynamic-vram --compile --attention cudnn
    python bench/comfy_train_speed.py ... --weight-dtype fp8_mixed --no-dynamic-vram --compile

`--from-file` writes the weights to a safetensors file and loads that as Load Diffusion Model does
(`comfy.sd.load_diffusion_model`), so ComfyUI can load it again: under DynamicVRAM (the default
here, as in ComfyUI on NVIDIA) the node trains on such a MODEL's resident copy. `--check-shared`
runs the loaded MODEL twice before the training and once after it, as sampling does (inference
mode), and records how far its output moved from the second run to the one after the training
(0: the MODEL every other node holds is as it was), how far the second moved from the first, and
its largest value.

`--weight-dtype fp8_e4m3fn` is the loader's fp8 weight dtype; `fp8_mixed` stores the block
Linears as ComfyUI's fp8 "mixed" files do (e4m3 with a per-tensor scale; it needs the
`comfy-kitchen` package, which ComfyUI's requirements install).

With OUT set, the result is appended to $OUT/comfy_bench.json. Compare with
`bench/train_speed.py` (the diffusers path) on the same card.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from flux2_train.config import ATTENTION_BACKENDS  # noqa: E402
from train_speed import TEXT_TOKENS, SyntheticEncoder, env_info, family_config, write_dataset  # noqa: E402

WEIGHT_DTYPES = {"default": None, "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_mixed": None}


def import_comfy(comfy_dir: Path, cpu: bool = False, dynamic_vram: bool = True, reserve_vram: float | None = None):
    """Import ComfyUI's `comfy` as `main.py` sets it up: device, reserved VRAM, DynamicVRAM (comfy-aimdo)."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.options  # noqa: F401
    from comfy.cli_args import args, enables_dynamic_vram

    args.cpu = cpu
    args.disable_dynamic_vram = not dynamic_vram  # ComfyUI's --disable-dynamic-vram
    args.reserve_vram = reserve_vram  # ComfyUI's --reserve-vram (GiB kept free: a smaller GPU)
    aimdo = dynamic_vram and not cpu and enables_dynamic_vram()
    if aimdo:
        import comfy_aimdo.control

        headroom = None if reserve_vram is None else int(reserve_vram * 1024**3)
        comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=True)
    import comfy.memory_management
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd

    if aimdo and comfy_aimdo.control.init_devices(
            (d.index, int(args.vram_headroom * 1024**3)) for d in comfy.model_management.get_all_torch_devices()):
        comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
        comfy.memory_management.aimdo_enabled = True
    return comfy


def import_pack():
    """The node pack, imported as ComfyUI imports a custom-node folder."""
    spec = importlib.util.spec_from_file_location("flux2_lora_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["flux2_lora_pack"] = module
    spec.loader.exec_module(module)
    from flux2_lora_pack.nodes import comfy_model

    return comfy_model


def random_bfl_state_dict(config: dict, seed: int) -> dict:
    """Random bf16 weights on the CPU under ComfyUI's (BFL) key names, shapes from diffusers' class."""
    from diffusers import Flux2Transformer2DModel

    from flux2_train.keys import diffusers_to_bfl_state_dict

    with torch.device("meta"):
        shapes = diffusers_to_bfl_state_dict(Flux2Transformer2DModel(**config).state_dict())
    device = "cuda" if torch.cuda.is_available() else "cpu"  # drawn on the GPU for speed, kept on the CPU like a file
    g = torch.Generator(device).manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
            for k, v in shapes.items()}


def fp8_mixed(sd: dict, fmt: str = "float8_e4m3fn") -> dict:
    """`sd` as ComfyUI's fp8 "mixed" files store a model: block Linears in `fmt` (e4m3) with a
    per-tensor scale. Takes the tensors out of `sd` one at a time ([dev] is 64 GB in bf16)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, fmt)
    marker = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    out = {}
    for key in list(sd):
        value = sd.pop(key)
        if key.endswith(".weight") and value.ndim == 2 and "blocks." in key:
            layer, w = key[: -len(".weight")], value.to(device).float()
            scale = w.abs().amax().clamp(min=1e-12) / torch.finfo(dtype).max
            out[key] = (w / scale).to(dtype).cpu()
            out[f"{layer}.weight_scale"], out[f"{layer}.comfy_quant"] = scale.reshape(()).cpu(), marker.clone()
        else:
            out[key] = value
    return out


def model_output(comfy, patcher, config: dict) -> torch.Tensor:
    """The MODEL's prediction for a fixed small input, run as sampling runs it (inference mode,
    ComfyUI's model management)."""
    comfy.model_management.load_models_gpu([patcher])
    device, dtype = patcher.load_device, patcher.model.get_dtype_inference()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, config["in_channels"], 8, 8, generator=g).to(device, dtype)
    context = torch.randn(1, 16, config["joint_attention_dim"], generator=g).to(device, dtype)
    extra = {"guidance": torch.ones(1, device=device)} if config.get("guidance_embeds") else {}
    with torch.inference_mode():
        out = patcher.model.diffusion_model(x, torch.full((1,), 0.5, device=device), context=context, **extra)
    return out.float().cpu()


def run(args) -> dict:
    comfy = import_comfy(Path(args.comfyui), cpu=args.cpu, dynamic_vram=not args.no_dynamic_vram,
                         reserve_vram=args.reserve_vram)
    comfy_model = import_pack()
    from flux2_train.config import resolve_config
    from flux2_train.events import EventBus, StepEvent
    from flux2_train.train import Trainer

    device = comfy.model_management.get_torch_device()
    config = family_config(args.family)
    rec = dict(path="comfyui", dynamic_vram=not args.no_dynamic_vram, reserve_vram=args.reserve_vram,
               family=args.family, resolution=args.resolution, steps=args.steps, rank=args.rank,
               targets=args.targets, gradient_checkpointing=args.gradient_checkpointing,
               checkpoint_blocks=args.checkpoint_blocks, attention=args.attention, compile=args.compile,
               offload_activations=args.offload_activations, weight_dtype=args.weight_dtype, status="ok", error="")
    rec.update(env_info(device))
    work = Path(tempfile.mkdtemp(prefix="comfy_speed_"))
    try:
        write_dataset(work / "data", args.resolution, args.images)
        t0 = time.perf_counter()
        sd = random_bfl_state_dict(config, args.seed)
        if args.weight_dtype == "fp8_mixed":
            sd = fp8_mixed(sd)
        options = {"dtype": WEIGHT_DTYPES[args.weight_dtype]} if WEIGHT_DTYPES[args.weight_dtype] else {}
        if args.from_file:
            from safetensors.torch import save_file

            save_file(sd, str(work / "model.safetensors"))
            del sd
            with torch.inference_mode():  # as ComfyUI's executor runs the loader node
                patcher = comfy.sd.load_diffusion_model(str(work / "model.safetensors"), model_options=options)
        else:
            with torch.inference_mode():
                patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options=options)
            del sd
        rec["load_seconds"] = time.perf_counter() - t0
        rec["patcher"] = type(patcher).__name__
        rec["model_bytes"] = patcher.model_size()
        rec["compute_dtype"] = str(patcher.model.get_dtype_inference())
        before = None
        if args.check_shared:  # twice: the first run's casts may differ from later ones'
            first = model_output(comfy, patcher, config)
            before = model_output(comfy, patcher, config)
            rec["shared_output_repeat"] = (before - first).abs().max().item()
            rec["shared_output_scale"] = before.abs().max().item()
        backbone = comfy_model.ComfyFlux2Backbone(patcher)
        rec["trains_resident_copy"] = comfy_model.trains_resident_copy(patcher)
        names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
        dtype = names.get(patcher.model.get_dtype_inference(), "bfloat16")
        cfg = resolve_config(overrides=dict(
            dataset=str(work / "data"), output_dir=str(work / "runs"), cache_dir=str(work / "cache"),
            name="bench", resolution=args.resolution, steps=args.steps, rank=args.rank, alpha=float(args.rank),
            targets=args.targets, gradient_checkpointing=args.gradient_checkpointing, dtype=dtype,
            device=str(device), batch_size=1, gradient_accumulation=1, caption_dropout=0.0, save_every=0,
            keep_checkpoints=1, tensorboard=False, seed=args.seed, max_sequence_length=TEXT_TOKENS,
            checkpoint_blocks=args.checkpoint_blocks, attention=args.attention, compile=args.compile,
            offload_activations=args.offload_activations, validate_every=0))
        steps = []
        device_used = [0]
        # Weak references to the weight tensors of the model that trains (a resident copy's, where one is
        # taken): the model's own, which the backbone lists, and the views of them that the run trains.
        trained_weights = []

        def on_event(ev):
            if isinstance(ev, StepEvent):
                if not trained_weights:
                    trained_weights.extend(weakref.ref(t) for *_, t in backbone._converted)
                    trained_weights.extend(weakref.ref(t) for t in backbone.diffusion_model.parameters())
                steps.append((ev.seconds_per_step, ev.loss))
                if device.type == "cuda":  # all of the card in use, DynamicVRAM's weight buffers included
                    free, total = torch.cuda.mem_get_info(device)
                    device_used[0] = max(device_used[0], total - free)
                if ev.step <= 3 or ev.step % 5 == 0:
                    print(f"  step {ev.step}/{ev.total} loss {ev.loss:.4f} {ev.seconds_per_step:.3f} s "
                          f"peak {ev.peak_memory_bytes / 2**30:.2f} GiB", flush=True)

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode(False):
            try:
                result = Trainer(cfg, backbone, encoder=SyntheticEncoder(config["joint_attention_dim"], args.seed),
                                 events=EventBus([on_event])).run()
            finally:
                t0 = time.perf_counter()
                backbone.release()
                rec["release_seconds"] = time.perf_counter() - t0
        gc.collect()
        rec["trained_weights"] = len(trained_weights)
        rec["trained_weights_alive"] = sum(ref() is not None for ref in trained_weights)
        if device.type == "cuda":
            rec["allocated_after_release_gib"] = torch.cuda.memory_allocated(device) / 2**30
        if before is not None:
            rec["shared_output_change"] = (model_output(comfy, patcher, config) - before).abs().max().item()
        rec["lora_layers"] = len(result.targets)
        secs = [s for s, _ in steps][args.warmup:]
        rec["median_s_per_step"] = statistics.median(secs)
        rec["losses"] = [loss for _, loss in steps]
        if device.type == "cuda":
            rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
            rec["device_used_at_step_end_gib"] = device_used[0] / 2**30
        rec["streams_weights"] = backbone.streams_weights
        rec["fp8_layers"] = backbone.fp8_layers
        rec["compiled"] = backbone.compiled
    except Exception as e:
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI tree (folder with main.py)")
    p.add_argument("--family", default="klein-4b")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="attention_mlp")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--checkpoint-blocks", type=int, default=0, help="with checkpointing: the first N blocks only")
    p.add_argument("--offload-activations", type=int, default=0, metavar="N",
                   help="keep the activations of N blocks that are not checkpointed in pinned CPU memory")
    p.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    p.add_argument("--compile", action="store_true",
                   help="compile the blocks (where ComfyUI holds the weights on the GPU as they are)")
    p.add_argument("--weight-dtype", choices=list(WEIGHT_DTYPES), default="default")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dynamic-vram", action="store_true", help="as ComfyUI's --disable-dynamic-vram")
    p.add_argument("--from-file", action="store_true",
                   help="load the weights from a safetensors file, as Load Diffusion Model does")
    p.add_argument("--check-shared", action="store_true",
                   help="record how far the loaded MODEL's output moved over the training (0: not at all)")
    p.add_argument("--reserve-vram", type=float, default=None,
                   help="as ComfyUI's --reserve-vram: GiB to leave free (makes the GPU look smaller)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke test with --family tiny)")
    args = p.parse_args(argv)
    if not args.comfyui:
        raise SystemExit("--comfyui (or COMFYUI_DIR) must name a ComfyUI tree")
    rec = run(args)
    print(json.dumps({k: v for k, v in rec.items() if k != "losses"}, indent=1))
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "comfy_bench.json"
        runs = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(runs + [rec], indent=1))
    return 0 if rec["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
