"""Speed and memory of one LoRA training step in two peer trainers, on real-size FLUX.2 models.

The same measurement as `bench/train_speed.py` (our engine's loop), taken on the
training step of two other trainers so all three can be compared in one GPU call:

* `--peer diffusers`: the recipe of diffusers' FLUX.2 DreamBooth LoRA example
  (`examples/dreambooth/train_dreambooth_lora_flux2.py`), step for step:
  `Flux2Transformer2DModel` in bf16 (the family's real config, random weights),
  PEFT `LoraConfig(r, lora_alpha=r, init_lora_weights="gaussian")` added with
  `transformer.add_adapter`, LoRA parameters cast to float32 only where the
  example does it (fp16 mixed precision; under bf16 they stay as PEFT makes
  them), optional `enable_gradient_checkpointing()`, the forward under bf16
  autocast (what accelerate's bf16 mixed precision does), timesteps drawn by
  `compute_density_for_timestep_sampling` (the example's default scheme is
  "none": uniform) from a FLUX.2 flow-matching scheduler, the packed latents
  and position ids of `Flux2Pipeline`, guidance 3.5 (the example's
  `--guidance_scale` default; the model ignores it unless it embeds guidance),
  the weighted flow-matching MSE against noise - x0, gradient clipping at 1.0
  and torch AdamW (betas 0.9/0.999, weight decay 1e-4, eps 1e-8). `--targets
  default` are the example's default modules; `all_linear` puts LoRA on every
  nn.Linear inside the transformer blocks. `--compile` (not in the example)
  compiles the repeated blocks regionally, as diffusers offers it; its Linear
  FLOPs are then counted on one eager forward before compiling.
* `--peer comfyui`: ComfyUI's built-in "Train LoRA" node (`TrainLoraNode` in
  `comfy_extras/nodes_train.py`) on ComfyUI's own FLUX.2 model, loaded as Load
  Diffusion Model loads a file (`comfy.sd.load_diffusion_model_state_dict`) from
  random weights under ComfyUI's key names. The node's `clone(force_deepcopy=True)`
  loads the model a second time through the loader's `cached_patcher_init`; that
  recipe is set to load the same random weights again (two copies in host RAM,
  as in ComfyUI; `--comfy-single-copy` reuses the first). The node's own `execute` runs with
  one random latent (1, 128, H/16, W/16) and one random conditioning (1, 512,
  context); its defaults are kept (weight-merge LoRA on every weight plus
  bias/norm offsets, bf16 training and LoRA dtype, AdamW, MSE on x0, sigma
  uniform) except the options below. Only observation is added: the node's
  `TrainSampler` is subclassed to time each step. `--gradient-checkpointing`
  turns on its checkpointing at `--checkpoint-depth` (default 2: one checkpoint
  per block; the node's default depth 1 wraps the whole model as one), `--bypass`
  its bypass mode (LoRA as forward hooks). On CUDA the whole run is held off
  cuDNN attention (the `note` field says so): with stock settings the first
  backward fails with a `CheckpointError`, the forward having run cuDNN
  attention and the recompute FlashAttention. On the CPU (a smoke test)
  layer_norm is given CUDA autocast's float32 policy, without which the blocks'
  in-place residual adds break the backward when checkpointing is off.
  ComfyUI needs its own requirements (torchsde among them) and, where they
  are missing, import-only stand-ins for `av` and `comfy_kitchen`.

Inputs are random: the text encoder and VAE are not run (they only prepare the
features). Each step is timed between `torch.cuda.synchronize` calls (the
optimizer step and the loss read-back included); the median is taken over the
steps after the warm-up. Peak memory is `torch.cuda.max_memory_allocated` /
`max_memory_reserved`, reset just before step 1 with the model on the GPU. Model
FLOPs per step are counted as in `train_speed.py`: 2 x the Linear FLOPs of the
first forward (counted by `LinearFlopCounter`; LoRA adds no base-weight
gradient) + 3 x the attention forward FLOPs; MFU is against 989.4 TFLOP/s.

Examples:

    python bench/peers.py --peer diffusers --family tiny --device cpu --resolution 128 --steps 4 --warmup 1
    python bench/peers.py --peer diffusers --family klein-4b --family klein-9b --family dev \\
        --targets all_linear --gradient-checkpointing --compile
    python bench/peers.py --peer comfyui --comfyui /path/to/ComfyUI --family klein-4b --gradient-checkpointing

Several `--family` values run one after another, each in its own subprocess, so
one that runs out of memory leaves the others' results intact. A markdown row per
run is printed; with the environment variable OUT set, the records are appended
to $OUT/peers.json (`{"runs": [...]}`, as train_speed.py writes bench.json).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from train_speed import (  # noqa: E402
    H100_BF16_PEAK,
    TEXT_TOKENS,
    LinearFlopCounter,
    attention_forward_flops,
    build_transformer,
    env_info,
    family_config,
    run_families,
)

TOOLS = {"diffusers": "diffusers+peft", "comfyui": "comfyui TrainLoraNode"}


# --------------------------------------------------------------------------- shared


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def base_record(args, family: str, config: dict, device: torch.device) -> dict:
    res = args.resolution
    rec = dict(tool=TOOLS[args.peer], peer=args.peer, family=family, mode="", status="ok", error="", note="",
               resolution=res, steps=args.steps, warmup=args.warmup, rank=args.rank, batch_size=1,
               text_tokens=TEXT_TOKENS, image_tokens=(res // 16) ** 2, device=str(device),
               gradient_checkpointing=args.gradient_checkpointing,
               config={k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()})
    rec.update(env_info(device))
    return rec


def finish_record(rec: dict, config: dict, device: torch.device, secs: list[float], losses: list[float],
                  linear_flops: int, warmup: int) -> None:
    """Step statistics, peak memory and the model-FLOP estimate, computed as train_speed.py does."""
    rec["steps_done"] = len(secs)
    rec["step_seconds"] = secs
    rec["losses"] = losses
    rec["finite_loss"] = bool(losses) and all(math.isfinite(x) for x in losses)
    timed = secs[warmup:] if len(secs) > warmup else secs[-1:]
    if timed:
        rec["median_s_per_step"] = statistics.median(timed)
        rec["mean_s_per_step"] = statistics.fmean(timed)
        rec["min_s_per_step"] = min(timed)
        rec["max_s_per_step"] = max(timed)
        rec["timed_steps"] = len(timed)
    if device.type == "cuda":
        rec["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        rec["peak_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    attn = attention_forward_flops(config, rec["image_tokens"], TEXT_TOKENS)
    rec["forward_linear_tflop"] = linear_flops / 1e12
    rec["forward_attention_tflop"] = attn / 1e12
    model_flops = 2 * linear_flops + 3 * attn
    rec["model_tflop_per_step"] = model_flops / 1e12
    if linear_flops and rec.get("median_s_per_step"):
        rec["model_tflops"] = model_flops / rec["median_s_per_step"] / 1e12
        if device.type == "cuda":
            rec["mfu_vs_989"] = model_flops / rec["median_s_per_step"] / H100_BF16_PEAK


def oom_text(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


# --------------------------------------------------------------------------- diffusers + PEFT


def default_target_modules() -> list[str]:
    """The example's default `target_modules` (its `--lora_layers` unset), verbatim."""
    # train transformer_blocks and single_transformer_blocks
    return ["to_k", "to_q", "to_v", "to_out.0"] + [
        "to_qkv_mlp_proj",
        *[f"single_transformer_blocks.{i}.attn.to_out" for i in range(48)],
    ]


def all_block_linears(transformer) -> list[str]:
    """Every nn.Linear inside `transformer_blocks` and `single_transformer_blocks`, by full name."""
    return [name for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks."))]


def flux2_scheduler():
    """FLUX.2's training scheduler (`scheduler/scheduler_config.json` of the FLUX.2 repos)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def run_diffusers(args, family: str) -> dict:
    from diffusers import Flux2Pipeline
    from diffusers.training_utils import (
        cast_training_params,
        compute_density_for_timestep_sampling,
        compute_loss_weighting_for_sd3,
    )
    from peft import LoraConfig

    device = torch.device(args.device)
    config = family_config(family)
    rec = base_record(args, family, config, device)
    mode = [f"r{args.rank}", f"targets={args.targets}", "bf16 weights + bf16 autocast",
            f"weighting={args.weighting_scheme}"]
    if args.gradient_checkpointing:
        mode.append("grad ckpt")
    if args.compile:
        mode.append("compile")
    if args.fused_adamw:
        mode.append("fused AdamW")
    rec.update(targets=args.targets, compile=args.compile, weighting_scheme=args.weighting_scheme,
               mode=", ".join(mode))
    counter = None
    secs: list[float] = []
    losses: list[float] = []
    try:
        t0 = time.perf_counter()
        try:
            transformer = build_transformer(config, device, seed=args.seed)  # requires_grad_(False), bf16
            sync(device)
        except torch.OutOfMemoryError as e:
            rec.update(status="oom", error=f"building the transformer: {oom_text(e)}")
            return rec
        rec["build_seconds"] = time.perf_counter() - t0
        rec["param_count"] = sum(p.numel() for p in transformer.parameters())

        if args.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        targets = default_target_modules() if args.targets == "default" else all_block_linears(transformer)
        transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, lora_dropout=0.0,
                                           init_lora_weights="gaussian", target_modules=targets))
        if args.mixed_precision == "fp16":  # the example upcasts the LoRA parameters only under fp16
            cast_training_params([transformer], dtype=torch.float32)
        params = [p for p in transformer.parameters() if p.requires_grad]
        rec["lora_layers"] = sum(1 for n, _ in transformer.named_modules() if n.endswith(".lora_A"))
        rec["lora_params"] = sum(p.numel() for p in params)
        rec["lora_dtype"] = str(params[0].dtype).replace("torch.", "")
        lr = args.learning_rate if args.learning_rate is not None else 1e-4
        opt_kwargs = dict(lr=lr, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
        if args.fused_adamw:
            opt_kwargs["fused"] = True
        optimizer = torch.optim.AdamW([{"params": params, "lr": lr}], **opt_kwargs)
        scheduler = flux2_scheduler()
        transformer.train()

        g = torch.Generator(device).manual_seed(args.seed)
        h = w = args.resolution // 16
        model_input = torch.randn(1, 128, h, w, generator=g, device=device, dtype=torch.bfloat16)
        prompt_embeds = torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=g, device=device,
                                    dtype=torch.bfloat16)
        text_ids = Flux2Pipeline._prepare_text_ids(prompt_embeds).to(device)
        model_input_ids = Flux2Pipeline._prepare_latent_ids(model_input).to(device=device)
        guidance = torch.full([1], args.guidance_scale, device=device).expand(model_input.shape[0])
        autocast = torch.autocast(device.type, dtype=torch.bfloat16)

        def forward(noisy_model_input, timesteps):
            packed = Flux2Pipeline._pack_latents(noisy_model_input)
            with autocast:  # accelerate's bf16 mixed precision wraps the model's forward
                model_pred = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance,
                                         encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                         img_ids=model_input_ids, return_dict=False)[0]
            return model_pred[:, : packed.size(1):]

        counter = LinearFlopCounter()
        if args.compile:
            # Dynamo would trace the counter's global hook (and guard on its running count: one
            # recompile per block), so the Linear FLOPs are counted on an eager forward first.
            counter.active = True
            with torch.no_grad():
                forward(model_input, torch.full((1,), 500.0, device=device))
            counter.active = False
            counter.remove()
            if hasattr(transformer, "compile_repeated_blocks"):
                transformer.compile_repeated_blocks(fullgraph=True)
                rec["compile_how"] = "compile_repeated_blocks(fullgraph=True)"
            else:
                for blocks in (transformer.transformer_blocks, transformer.single_transformer_blocks):
                    for block in blocks:
                        block.compile(fullgraph=True)
                rec["compile_how"] = "block.compile(fullgraph=True) per block"
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(args.steps):
            sync(device)
            t = time.perf_counter()
            counter.active = step == 0 and not args.compile
            noise = torch.randn_like(model_input)
            u = compute_density_for_timestep_sampling(weighting_scheme=args.weighting_scheme, batch_size=1,
                                                      logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
            indices = (u * scheduler.config.num_train_timesteps).long()
            timesteps = scheduler.timesteps[indices].to(device=device)
            sigmas = scheduler.sigmas.to(device=device, dtype=model_input.dtype)[
                [(scheduler.timesteps.to(device) == ts).nonzero().item() for ts in timesteps]].view(-1, 1, 1, 1)
            noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
            model_pred = forward(noisy_model_input, timesteps)
            counter.active = False
            model_pred = Flux2Pipeline._unpack_latents_with_ids(model_pred, model_input_ids)
            weighting = compute_loss_weighting_for_sd3(weighting_scheme=args.weighting_scheme, sigmas=sigmas)
            target = noise - model_input
            loss = torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2)
                              .reshape(target.shape[0], -1), 1).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)  # accelerator.clip_grad_norm_(transformer.parameters())
            optimizer.step()
            optimizer.zero_grad()
            value = loss.item()
            sync(device)
            secs.append(time.perf_counter() - t)
            losses.append(value)
            counter.remove()  # after step 1, as train_speed.py does
            if args.verbose or step < 3 or step + 1 == args.steps:
                print(f"  [{family}] step {step + 1}/{args.steps} loss {value:.4f} {secs[-1]:.3f} s", flush=True)
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=oom_text(e))
    except Exception as e:  # report, do not lose the other families' numbers
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if counter:
            counter.remove()
    finish_record(rec, config, device, secs, losses, counter.flops if counter else 0, args.warmup)
    return rec


# --------------------------------------------------------------------------- ComfyUI TrainLoraNode


def sdpa_without_cudnn(comfy_ops):
    """Hold the whole run off cuDNN attention (forward and checkpoint recompute then agree).

    ComfyUI's SDPA wrapper enables its own backend list (flash, cuDNN, efficient,
    math) around each call, which would override an outer `sdpa_kernel`; cuDNN is
    taken out of that list too while the context is open.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    @contextlib.contextmanager
    def ctx():
        prio = getattr(comfy_ops, "SDPA_BACKEND_PRIORITY", None)
        saved = list(prio) if prio is not None else None
        if prio is not None and SDPBackend.CUDNN_ATTENTION in prio:
            prio.remove(SDPBackend.CUDNN_ATTENTION)
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                yield
        finally:
            if saved is not None:
                prio[:] = saved

    return ctx()


@contextlib.contextmanager
def cpu_layer_norm_in_fp32():
    """On the CPU, give layer_norm CUDA autocast's float32 policy (CPU autocast keeps it in bf16).

    ComfyUI's FLUX.2 blocks add to their input in place after a LayerNorm has read it
    (`x += ...`). Under CUDA autocast the norm runs on a float32 copy, so this is fine;
    under CPU autocast it saves the bf16 input itself, and without checkpointing the
    backward fails with "modified by an inplace operation". Used for CPU runs only.
    """
    F = torch.nn.functional
    inner = F.layer_norm

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if torch.is_autocast_enabled("cpu") and input.dtype != torch.float32:
            with torch.autocast("cpu", enabled=False):
                return inner(input.float(), normalized_shape, None if weight is None else weight.float(),
                             None if bias is None else bias.float(), eps)
        return inner(input, normalized_shape, weight, bias, eps)

    F.layer_norm = layer_norm
    try:
        yield
    finally:
        F.layer_norm = inner


def run_comfyui(args, family: str) -> dict:
    from comfy_train_speed import import_comfy, random_bfl_state_dict

    if not args.comfyui:
        raise SystemExit("--peer comfyui needs --comfyui (or COMFYUI_DIR): a ComfyUI tree, the folder with main.py")
    cpu = args.device == "cpu"
    comfy = import_comfy(Path(args.comfyui).resolve(), cpu=cpu, dynamic_vram=not args.comfy_no_dynamic_vram)
    import comfy.ops
    import comfy_extras.nodes_train as nt

    device = comfy.model_management.get_torch_device()
    config = family_config(family)
    rec = base_record(args, family, config, device)
    lr = args.learning_rate if args.learning_rate is not None else 0.0005  # the node's default
    depth = args.checkpoint_depth if args.gradient_checkpointing else None
    mode = [f"r{args.rank}", "bypass" if args.bypass else "weight merge", "bf16 training, bf16 LoRA",
            f"grad ckpt depth {depth}" if depth else "no grad ckpt"]
    if args.comfy_single_copy:
        mode.append("single model copy")
    rec.update(targets="every weight (node)", bypass=args.bypass, checkpoint_depth=depth,
               single_copy=args.comfy_single_copy, dynamic_vram=not args.comfy_no_dynamic_vram,
               mode=", ".join(mode))
    counter = LinearFlopCounter()
    secs, losses = [], []
    try:
        def load(disable_dynamic=False):
            """What Load Diffusion Model does with a file, from the same random weights each time."""
            return comfy.sd.load_diffusion_model_state_dict(random_bfl_state_dict(config, args.seed),
                                                            model_options={}, disable_dynamic=disable_dynamic)

        t0 = time.perf_counter()
        if args.comfy_single_copy:  # the node's clone reuses this model instead of loading a second one
            patcher = load(disable_dynamic=True)
            patcher.cached_patcher_init = (lambda disable_dynamic=False: patcher, ())
        else:
            with torch.inference_mode():  # as ComfyUI's executor runs the loader node
                patcher = load()
            # The loader's reload recipe: the node's clone(force_deepcopy=True) loads the model again.
            patcher.cached_patcher_init = (load, ())
        rec["load_seconds"] = time.perf_counter() - t0
        rec["patcher"] = type(patcher).__name__
        rec["model_bytes"] = patcher.model_size()

        class TimedTrainSampler(nt.TrainSampler):
            """The node's sampler, unchanged, with each step timed and the first forward's Linears counted."""

            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                inner_loss = self.loss_fn

                def loss_fn(pred, target):  # called right after the forward, before the backward
                    counter.active = False
                    return inner_loss(pred, target)

                self.loss_fn = loss_fn
                inner_cb = self.loss_callback

                def loss_callback(value):
                    losses.append(value)
                    if inner_cb:
                        inner_cb(value)

                self.loss_callback = loss_callback
                self.optimizer.register_step_post_hook(self._step_done)
                self._t = None

            def _begin(self, dev):
                sync(dev)
                if not secs and dev.type == "cuda":  # the model is on the GPU now; step 1 starts
                    torch.cuda.reset_peak_memory_stats(dev)
                counter.active = not secs
                self._t = time.perf_counter()

            def _step_done(self, optimizer, a, kw):
                sync(device)
                secs.append(time.perf_counter() - self._t)
                counter.remove()  # after step 1, as train_speed.py does
                n = len(secs)
                if args.verbose or n <= 3 or n == args.steps:
                    print(f"  [{family}] step {n}/{args.steps} loss {losses[-1]:.4f} {secs[-1]:.3f} s", flush=True)

            def _train_step_standard_mode(self, model_wrap, cond, extra_args, noisegen, latent_image, *a, **kw):
                self._begin(latent_image.device)
                return super()._train_step_standard_mode(model_wrap, cond, extra_args, noisegen, latent_image,
                                                         *a, **kw)

        nt.TrainSampler = TimedTrainSampler

        g = torch.Generator().manual_seed(args.seed)
        h = w = args.resolution // 16
        latent = torch.randn(1, 128, h, w, generator=g)
        context = torch.randn(1, TEXT_TOKENS, config["joint_attention_dim"], generator=g).to(torch.bfloat16)
        inputs = dict(
            model=[patcher], latents=[{"samples": latent}], positive=[[[context, {}]]],
            batch_size=[1], steps=[args.steps], grad_accumulation_steps=[1], learning_rate=[lr],
            rank=[args.rank], optimizer=["AdamW"], loss_function=["MSE"], seed=[args.seed],
            training_dtype=["bf16"], lora_dtype=["bf16"], quantized_backward=[False],
            algorithm=[list(nt.adapter_maps.keys())[0]], gradient_checkpointing=[bool(depth)],
            checkpoint_depth=[depth or 1], offloading=[False], existing_lora=["[None]"],
            bucket_mode=[False], bypass_mode=[args.bypass])
        rec["algorithm"] = inputs["algorithm"][0]
        guard = contextlib.nullcontext()
        if device.type == "cpu":
            guard = cpu_layer_norm_in_fp32()
            rec["note"] = ("CPU run: layer_norm given CUDA autocast's float32 policy (CPU autocast keeps it in "
                           "bf16, and the blocks' in-place residual adds then break the backward)")
        if device.type == "cuda":
            guard = sdpa_without_cudnn(comfy.ops)
            rec["note"] = ("run under sdpa_kernel([FLASH_ATTENTION, EFFICIENT_ATTENTION, MATH]) with cuDNN "
                           "also taken out of comfy.ops.SDPA_BACKEND_PRIORITY: on stock settings the node's "
                           "checkpointed backward fails with CheckpointError (forward ran cuDNN attention, "
                           "the recompute FlashAttention)")
        with guard:
            out = nt.TrainLoraNode.execute(**inputs)
        lora_sd = out.result[0] if hasattr(out, "result") else out[0]
        rec["lora_tensors"] = len(lora_sd)
        rec["lora_params"] = sum(t.numel() for t in lora_sd.values())
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=oom_text(e))
    except Exception as e:
        rec.update(status="error", error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        counter.remove()
    finish_record(rec, config, device, secs, losses, counter.flops, args.warmup)
    return rec


# --------------------------------------------------------------------------- report


HEADER = ("| tool | family | device | res | mode | steps | median s/step | peak alloc GiB | peak reserved GiB "
          "| finite loss | loss first→last | model TFLOP/s (MFU) | status |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def row(r: dict) -> str:
    def num(key, fmt):
        return format(r[key], fmt) if r.get(key) is not None else "–"

    losses = r.get("losses") or []
    lr = f"{losses[0]:.3f}→{losses[-1]:.3f}" if losses else "–"
    tf = "–"
    if r.get("model_tflops"):
        tf = f"{r['model_tflops']:.0f}" + (f" ({100 * r['mfu_vs_989']:.0f}%)" if r.get("mfu_vs_989") else "")
    status = r["status"] + (f": {r['error'][:160]}" if r.get("error") else "")
    return (f"| {r.get('tool')} | {r['family']} | {r.get('gpu') or r.get('device')} | {r.get('resolution')} "
            f"| {r.get('mode', '')} | {r.get('steps_done', 0)}/{r.get('steps')} | {num('median_s_per_step', '.3f')} "
            f"| {num('peak_allocated_gib', '.2f')} | {num('peak_reserved_gib', '.2f')} "
            f"| {'yes' if r.get('finite_loss') else 'no'} | {lr} | {tf} | {status} |")


def run_one(args, family: str) -> dict:
    return run_diffusers(args, family) if args.peer == "diffusers" else run_comfyui(args, family)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peer", required=True, choices=("diffusers", "comfyui"))
    ap.add_argument("--family", action="append", help="klein-4b, klein-9b, dev or tiny; repeat for several")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default="default", choices=("default", "all_linear"),
                    help="diffusers: the example's default modules, or every Linear in the blocks")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="diffusers: regional torch.compile of the blocks")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--learning-rate", type=float, default=None,
                    help="default: 1e-4 (the example's), 5e-4 (the node's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verbose", action="store_true", help="print every step")
    g = ap.add_argument_group("diffusers example options")
    g.add_argument("--weighting-scheme", default="none",
                   choices=("none", "logit_normal", "mode", "sigma_sqrt", "cosmap"))
    g.add_argument("--guidance-scale", type=float, default=3.5)
    g.add_argument("--mixed-precision", default="bf16", choices=("bf16", "fp16"),
                   help="fp16 only changes what the example does with the LoRA dtype (cast to float32)")
    g.add_argument("--fused-adamw", action="store_true", help="torch AdamW with fused=True (not the example's)")
    g = ap.add_argument_group("ComfyUI options")
    g.add_argument("--comfyui", default=os.environ.get("COMFYUI_DIR", ""), help="ComfyUI tree (folder with main.py)")
    g.add_argument("--bypass", action="store_true", help="the node's bypass_mode (LoRA as forward hooks)")
    g.add_argument("--checkpoint-depth", type=int, default=2,
                   help="the node's checkpoint_depth with --gradient-checkpointing (2: each block)")
    g.add_argument("--comfy-no-dynamic-vram", action="store_true", help="as ComfyUI's --disable-dynamic-vram")
    g.add_argument("--comfy-single-copy", action="store_true",
                   help="the node's clone(force_deepcopy=True) reuses the loaded model instead of loading "
                        "it again (one copy of the weights in host RAM instead of two)")
    ap.add_argument("--result-file", help=argparse.SUPPRESS)  # used by the parent for subprocess runs
    args = ap.parse_args(argv)

    def failed(family: str, code: int) -> dict:
        return dict(tool=TOOLS[args.peer], peer=args.peer, family=family, resolution=args.resolution,
                    steps=args.steps, status="error", error=f"subprocess exited with {code} and no result")

    return run_families(Path(__file__), args, argv, lambda family: run_one(args, family), failed, HEADER, row,
                        "peers.json")


if __name__ == "__main__":
    sys.exit(main())
