"""GPU check: LoRA gradients on ComfyUI's model are the same however ComfyUI holds the weights.

Trains nothing; one forward and backward pass of the tiny FLUX.2 (bf16) through the
pack's ComfyUI backbone, with ComfyUI's weights fully loaded, partly offloaded
(`partially_unload` after loading) or streamed by DynamicVRAM, with and without
block checkpointing. Each mode runs in its own process (ComfyUI's memory mode is
fixed at import); the LoRA gradients are compared with the fully loaded run's.

    python bench/comfy_grad_check.py --comfyui /path/to/ComfyUI
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = [  # (name, DynamicVRAM, fraction of the weights offloaded after loading, ComfyUI's cuda_malloc)
    ("regular, loaded", False, 0.0, True),
    ("regular, 70% offloaded", False, 0.7, True),
    ("regular, 70% offloaded, no cuda_malloc", False, 0.7, False),
    ("DynamicVRAM", True, 0.0, True),
    ("DynamicVRAM, 70% unloaded", True, 0.7, True),
]


def one_mode(comfy_dir: str, dynamic: bool, offload: float, cuda_malloc: bool, checkpointing: bool, out: str):
    import torch

    sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]
    from comfy_train_speed import import_comfy, import_pack

    comfy = import_comfy(Path(comfy_dir), dynamic_vram=dynamic)
    from comfy.cli_args import args

    args.cuda_malloc = cuda_malloc
    import comfy.model_management as mm

    from flux2_train.keys import diffusers_to_bfl_state_dict
    from flux2_train.tiny import tiny_transformer

    comfy_model = import_pack()
    sd = {k: v.to(torch.bfloat16) for k, v in diffusers_to_bfl_state_dict(tiny_transformer(seed=0).state_dict()).items()}
    with torch.inference_mode():
        patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={})
    if offload:
        load = mm.load_models_gpu

        def load_then_offload(models, **kw):
            load(models, **kw)
            models[0].partially_unload(models[0].offload_device, int(models[0].model_size() * offload))

        mm.load_models_gpu = load_then_offload
    backbone = comfy_model.ComfyFlux2Backbone(patcher)
    with torch.inference_mode(False):
        if checkpointing:
            backbone.enable_gradient_checkpointing()
        backbone.prepare(mm.get_torch_device(), torch.bfloat16)
        params = backbone.add_lora(sorted(backbone.lora_layers()), 4, 4.0, 0.0, 0)
        torch.manual_seed(0)
        with torch.no_grad():
            for p in params:
                p.copy_(torch.randn(p.shape) / 9)
        torch.manual_seed(1)
        x, ctx = torch.randn(1, 128, 8, 8), torch.randn(1, 8, 96)
        x, ctx, sigma = x.cuda().bfloat16(), ctx.cuda().bfloat16(), torch.tensor([0.4]).cuda()
        try:
            with torch.autocast("cuda", torch.bfloat16):
                pred = backbone.predict(x, sigma, ctx)
            pred.float().pow(2).mean().backward()
            torch.save({"streams": backbone.streams_weights, "patcher": type(patcher).__name__,
                        "grads": [p.grad.float().cpu() for p in params]}, out)
        finally:
            backbone.release()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comfyui", required=True)
    p.add_argument("--one", nargs=5, help=argparse.SUPPRESS)  # dynamic offload cuda_malloc checkpointing out
    a = p.parse_args(argv)
    if a.one:
        d, o, c, k, out = a.one
        one_mode(a.comfyui, d == "1", float(o), c == "1", k == "1", out)
        return 0
    import torch

    work = Path(tempfile.mkdtemp())
    results, reference = [], None
    for checkpointing in (False, True):
        for name, dynamic, offload, cuda_malloc in MODES:
            out = work / f"{len(results)}.pt"
            r = subprocess.run([sys.executable, __file__, "--comfyui", a.comfyui, "--one", str(int(dynamic)),
                                str(offload), str(int(cuda_malloc)), str(int(checkpointing)), str(out)],
                               capture_output=True, text=True)
            rec = dict(mode=name, checkpointing=checkpointing)
            if r.returncode or not out.exists():
                rec["error"] = (r.stderr or r.stdout).strip().splitlines()[-1][:300]
            else:
                got = torch.load(out)
                reference = reference or got["grads"]
                rec.update(patcher=got["patcher"], streams_weights=got["streams"], max_rel_grad_error=max(
                    ((g - ref).norm() / ref.norm()).item() for g, ref in zip(got["grads"], reference)))
            results.append(rec)
            print(json.dumps(rec), flush=True)
    bad = [r for r in results if "error" in r or r["max_rel_grad_error"] > 0.05]
    print(f"{len(results) - len(bad)} of {len(results)} modes give the loaded model's gradients (bf16, 5%)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
