"""The pack's HTTP routes, for its front end: a training node's run history, and the vRAM estimate
of a graph that has not run yet (the bar on the estimate node follows widget edits)."""

from __future__ import annotations

import functools
import logging
import os

from aiohttp import web

import comfy.memory_management
import comfy.model_management
import folder_paths
from flux2_train.errors import Flux2TrainError
from flux2_train.memory import Placement, allocator_in_use, host_memory_free, preview_plan, stored_format
from flux2_train.model import spec_for

from .config_node import config_handle
from .dataset_node import dataset_options
from .messages import in_widget_words
from .training import RUN_LOGS, device_memory

log = logging.getLogger(__name__)
_FP8_CHOICES = {"fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"}  # UNETLoader's weight_dtype choices


def register(routes: web.RouteTableDef) -> None:
    routes.get("/flux2_lora/history/{node}")(history)
    routes.post("/flux2_lora/estimate")(estimate)


async def history(request: web.Request) -> web.Response:
    """?workflow=<the front end's workflow id>: that workflow's run of the node, else one queued without a workflow."""
    node, workflow = request.match_info["node"], request.query.get("workflow")
    return web.json_response({"node": node, "events": list(RUN_LOGS.get(workflow, node))})


async def estimate(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        return web.json_response(estimate_for_widgets(body))
    except Flux2TrainError as e:
        return web.json_response({"error": in_widget_words(str(e))})
    except (ValueError, TypeError, KeyError) as e:
        return web.json_response({"error": f"cannot estimate from these settings: {e}"}, status=400)


def estimate_for_widgets(body: dict) -> dict:
    """The estimate node's answer from the widget values of the nodes wired to it."""
    unet = body.get("unet_name")
    path = folder_paths.get_full_path("diffusion_models", unet) if unet else None
    if not path:
        return {"error": "connect a Load Diffusion Model with a FLUX.2 model to estimate"}
    if not body.get("config"):
        return {"error": "connect a FLUX.2 LoRA Config to estimate"}
    spec, stored = _file_spec(path, os.path.getmtime(path))
    # The loader casts to fp8, or the file is fp8; bf16 and fp32 files load as bf16 on a GPU.
    fp8 = body.get("weight_dtype") in _FP8_CHOICES or stored_format(stored, spec.param_count) == "fp8"
    placement = Placement("comfyui", "fp8" if fp8 else "bf16", streamed=comfy.memory_management.aimdo_enabled,
                          allocator=allocator_in_use(), host_free=host_memory_free())
    dataset = dataset_options(**body["dataset"]) if body.get("dataset") else {}
    dataset.pop("dataset", None)  # the folder itself is checked when the graph runs
    cfg = config_handle(**body["config"]).preview(**dataset)
    plan = preview_plan(spec, cfg, placement, device_memory(comfy.model_management.get_torch_device()))
    est = plan.estimate
    text = in_widget_words(est.summary() + (f"\n{plan.reason}" if plan.reason else ""))
    return {"total": est.total, "upper": est.upper, "available": est.available, "verdict": est.verdict, "parts": est.parts,
            "advice": [in_widget_words(str(a)) for a in est.advice], "text": text, "model": spec.title}


@functools.lru_cache(maxsize=16)
def _file_spec(path: str, mtime: float):
    return spec_for(path)  # the header only: fast enough to answer while widgets change
