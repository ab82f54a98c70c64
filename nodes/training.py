"""What the training node does, apart from its schema: one run of the engine on the graph's models."""

from __future__ import annotations

import logging
import math
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
from comfy_api.latest import io
from flux2_train import checkpoint as ckpt
from flux2_train.config import QUICK_PRESETS, TrainConfig, resolve_config
from flux2_train.data import DatasetReport
from flux2_train.errors import ConfigError, TrainingCancelled
from flux2_train.events import EventBus, StatusEvent, StepEvent
from flux2_train.lora_files import lora_metadata, to_format
from flux2_train.memory import AutoPlan, preview_plan
from flux2_train.model import ModelSpec
from flux2_train.train import Trainer, TrainResult

from . import paths
from .comfy_encoders import COMFY_TEXT_TOKENS, ComfyEncoders
from .comfy_model import ComfyFlux2Backbone, check_flux2, comfy_spec
from .messages import in_widget_words

log = logging.getLogger(__name__)

CATEGORY = "FLUX.2 LoRA training"
PROGRESS_EVENT = "flux2_lora.progress"
DatasetType = io.Custom("FLUX2_LORA_DATASET")
ConfigType = io.Custom("FLUX2_LORA_CONFIG")
LoraType = io.Custom("FLUX2_LORA")
LossMapType = io.Custom("LOSS_MAP")  # the type of ComfyUI's own loss-graph node

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


class RunLogs:
    """The events of each training node's latest run, which the chart asks for after a page reload.

    Kept by workflow and node: a node of another workflow with the same id does not show the run.
    The node is its execution id (`12:6` inside a subgraph); a prompt queued without a workflow
    (ComfyUI's API) is kept under none, and every workflow's node of that id sees it.
    """

    KEEP = 64  # runs; the oldest go first

    def __init__(self):
        self._logs: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()

    def new(self, workflow: str | None, node: str | None) -> list[dict]:
        key = (workflow or "", str(node))
        self._logs.pop(key, None)
        log = self._logs[key] = []
        while len(self._logs) > self.KEEP:
            self._logs.popitem(last=False)
        return log

    def get(self, workflow: str | None, node: str) -> list[dict]:
        found = self._logs.get((workflow or "", node))
        return found if found is not None else self._logs.get(("", node), [])


RUN_LOGS = RunLogs()


def workflow_id(extra_pnginfo) -> str | None:
    """The id the front end gives a workflow (saved with it), from the prompt's extra_pnginfo."""
    workflow = extra_pnginfo.get("workflow") if isinstance(extra_pnginfo, dict) else None
    found = workflow.get("id") if isinstance(workflow, dict) else None
    return str(found) if found else None


@dataclass
class DatasetHandle:
    """A validated image folder and the options that shaped it."""

    report: DatasetReport
    options: dict  # TrainConfig fields: dataset, caption_ext, trigger_word, ...


@dataclass
class ConfigHandle:
    """The config node's choices; resolved against the model when training starts."""

    subject_preset: str | None
    quick_preset: str | None  # "auto": schedule from the dataset, memory settings from the GPU
    overrides: dict = field(default_factory=dict)


    def preview(self, image_count: int | None = None, **extra) -> TrainConfig:
        """The config as it will train, before a MODEL settles the dtype (and `auto` its memory settings)."""
        overrides = {k: v for k, v in self.overrides.items() if k != "dtype"} | extra
        return resolve_config(self.subject_preset, self.quick_preset, overrides=overrides, image_count=image_count)


@dataclass
class LoraHandle:
    """A trained adapter: PEFT-named weights plus what a LoRA file needs beside them."""

    adapter: dict[str, torch.Tensor]
    cfg: TrainConfig
    spec: ModelSpec
    steps: int
    image_count: int
    targets: list[str]

    def metadata(self, fmt: str) -> dict[str, str]:
        return lora_metadata(cfg=self.cfg, spec=self.spec, steps=self.steps, image_count=self.image_count,
                             fmt=fmt, targets=self.targets)


def device_memory(device: torch.device) -> int | None:
    """Bytes ComfyUI lets a run use on the accelerator: the card less what ComfyUI keeps in reserve
    (its own margin and --reserve-vram); other models are unloaded first. None on the CPU."""
    if device.type == "cpu":
        return None
    return int(comfy.model_management.get_total_memory(device) - comfy.model_management.extra_reserved_memory())


def training_config(model, dataset: DatasetHandle, config: ConfigHandle, resume: Path | None = None) -> TrainConfig:
    """The engine config for this MODEL: presets, knobs, the dataset's options, ComfyUI's folders and device.
    `resume`: the checkpoint folder a resumed run continues from."""
    check_flux2(model)
    device = comfy.model_management.get_torch_device()
    compute = model.model.get_dtype_inference()
    overrides = dict(config.overrides)
    dtype = overrides.pop("dtype", "auto")
    model_dtype = _DTYPE_NAMES.get(compute, "bfloat16")
    if dtype not in ("auto", model_dtype):
        raise ConfigError(f"dtype is {dtype}, but this MODEL computes in {model_dtype} (ComfyUI chooses that from "
                          f"the model file and the device); set dtype to auto (or {model_dtype}) to train in it")
    overrides.update(dataset.options, dtype=model_dtype, device=str(device), output_dir=str(paths.runs_root()),
                     cache_dir=str(paths.runs_root() / "cache"), max_sequence_length=COMFY_TEXT_TOKENS)
    if config.quick_preset == "auto" and overrides.get("repeats") == 1:
        del overrides["repeats"]  # the dataset node's default: auto plans the repeats from the images
    cfg = resolve_config(config.subject_preset, config.quick_preset, overrides=overrides,
                         image_count=len(dataset.report.items))
    if resume:  # the run's own name (runs/<name>/checkpoints/step-N)
        cfg.name = resume.parent.parent.name
    return cfg


def memory_plan(model, cfg: TrainConfig, dataset: DatasetHandle) -> AutoPlan:
    """The training run's own preflight (the Trainer makes the same call): estimate, and `auto`'s choice."""
    placement = ComfyFlux2Backbone.placement_of(model)
    available = device_memory(comfy.model_management.get_torch_device())
    return preview_plan(comfy_spec(model), cfg, placement, available, list(dataset.report.bucket_counts))


class ComfyProgress:
    """Engine events to ComfyUI: the node's progress bar, a websocket message per step, and Cancel."""

    def __init__(self, node_id: str | None, total: int, send: Callable[[str, dict], None] | None = None,
                 workflow: str | None = None):
        if send is None:
            from server import PromptServer

            server = PromptServer.instance
            send = lambda event, data: server.send_sync(event, data, server.client_id)  # noqa: E731
        self.send = send
        self.node_id = node_id
        self.bar = comfy.utils.ProgressBar(total, node_id=node_id)
        self.memory_total = device_memory(comfy.model_management.get_torch_device()) or 0
        self.stop_requested = False
        self.run_id = uuid.uuid4().hex[:12]  # tells the chart a new run from a repeated event
        self.workflow = workflow  # the chart shows events of its own workflow's runs only
        self.log = RUN_LOGS.new(workflow, node_id)

    def should_stop(self) -> bool:
        return self.stop_requested or comfy.model_management.processing_interrupted()

    def __call__(self, event) -> None:
        if isinstance(event, StepEvent):
            try:
                self.bar.update_absolute(event.step, event.total)
            except comfy.model_management.InterruptProcessingException:
                # ComfyUI's progress hook clears the Cancel flag as it raises: keep it here, so the
                # run stops after this step with a checkpoint.
                self.stop_requested = True
            payload = event.to_dict() | {"memory_total_bytes": self.memory_total}
        elif isinstance(event, StatusEvent):
            payload = event.to_dict() | {"message": in_widget_words(event.message)}
            if event.kind == "preview":  # where the browser fetches each image: ComfyUI's /view of output/
                payload["data"] = dict(payload["data"], images=[dict(entry, view=paths.output_view(entry["path"]))
                                                                for entry in payload["data"]["images"]])
        else:
            return
        message = _json_safe({"node": self.node_id, "workflow": self.workflow, "run": self.run_id, "seq": len(self.log),
                              **payload})
        self.log.append(message)
        self.send(PROGRESS_EVENT, message)


def _json_safe(value):
    """NaN and infinities as null: the browser's JSON parser rejects a whole message with them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def train_lora(model, clip, vae, dataset: DatasetHandle, config: ConfigHandle, resume: str = "",
               node_id: str | None = None, workflow: str | None = None) -> tuple[object, LoraHandle, dict, torch.Tensor]:
    """Train on the graph's MODEL; return (MODEL with the LoRA applied, the LoRA, the loss history,
    the last previews as an IMAGE batch)."""
    progress = ComfyProgress(node_id, total=0, workflow=workflow)  # each step event gives the total
    try:
        resume_path = ckpt.find_checkpoint(paths.run_folder(resume)) if resume else None
        cfg = training_config(model, dataset, config, resume_path)
        encoder = ComfyEncoders(clip, vae, model)
        backbone = ComfyFlux2Backbone(model)
        # The Trainer's preflight estimates (and under `auto` plans) the run before any heavy work.
        trainer = Trainer(cfg, backbone, encoder=encoder, dataset=dataset.report, events=EventBus([progress]),
                          available_memory=device_memory(comfy.model_management.get_torch_device()),
                          should_stop=progress.should_stop, resume=resume_path,
                          stop_exceptions=(comfy.model_management.InterruptProcessingException,),
                          several_processes=False)  # ComfyUI trains in its own process, whatever WORLD_SIZE says
    except Exception as e:  # the Trainer reports its own failures; these came before it, so the chart says so
        progress(StatusEvent("failed", str(e)))
        raise
    with torch.inference_mode(False):
        try:
            result: TrainResult = trainer.run()
        except TrainingCancelled as e:
            log.info("%s", e)
            comfy.model_management.interrupt_current_processing(False)
            raise comfy.model_management.InterruptProcessingException() from None  # the UI shows "cancelled"
        finally:
            backbone.release()

    lora = LoraHandle(adapter=result.adapter, cfg=trainer.cfg, spec=result.spec, steps=result.steps,
                      image_count=len(result.dataset.items), targets=result.targets)
    return apply_lora(model, lora), lora, {"loss": list(result.losses)}, preview_batch(result.preview_images)


def preview_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """ComfyUI's IMAGE: (B, H, W, 3) in [0, 1]; one black 64x64 image when there are none."""
    if not images:
        return torch.zeros(1, 64, 64, 3)
    return torch.stack([img.movedim(0, -1) for img in images]).float().cpu()


def apply_lora(model, lora: LoraHandle, strength: float = 1.0):
    """A clone of MODEL with the LoRA patched in exactly as LoraLoaderModelOnly patches a file."""
    state = to_format(lora.adapter, lora.cfg.rank, lora.cfg.alpha, "comfyui", dtype=torch.float32)
    patched, _ = comfy.sd.load_lora_for_models(model, None, state, strength, 0)
    return patched


def quick_preset_options() -> list[str]:
    return ["none", *QUICK_PRESETS]
