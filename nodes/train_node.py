"""Flux2TrainLora: train a LoRA on the graph's FLUX.2 MODEL and hand back the MODEL with it applied."""

from __future__ import annotations

from comfy_api.latest import io

from .messages import widget_words
from .training import CATEGORY, ConfigType, DatasetType, LoraType, LossMapType, train_lora, workflow_id


class Flux2TrainLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2TrainLora",
            display_name="FLUX.2 Train LoRA",
            category=CATEGORY,
            description="Trains a LoRA on the loaded FLUX.2 MODEL (no second copy of its weights). The input MODEL "
                        "stays unchanged; the output MODEL has the LoRA applied. Cancel stops after a checkpoint.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.2 [dev] or [klein] from Load Diffusion Model (fp8 and "
                                                "LoRA-patched models work; an upstream LoRA is trained on top of)."),
                io.Clip.Input("clip", tooltip="The FLUX.2 text encoder; captions are encoded once and cached."),
                io.Vae.Input("vae", tooltip="The FLUX.2 VAE; images are encoded once and cached."),
                DatasetType.Input("dataset", tooltip="Images and captions from FLUX.2 LoRA Dataset."),
                ConfigType.Input("config", tooltip="Training options from FLUX.2 LoRA Config."),
                io.String.Input("resume", default="", optional=True,
                                tooltip="Name of an earlier run in output/flux2_lora/ to continue from its last "
                                        "checkpoint (e.g. after Cancel), or one of its checkpoint folders; empty "
                                        "starts a new run."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input MODEL with the trained LoRA applied."),
                LoraType.Output(display_name="lora", tooltip="The trained LoRA, for FLUX.2 Save LoRA."),
                LossMapType.Output(display_name="loss", tooltip="Loss per step (ComfyUI's Plot Loss Graph reads it)."),
                io.Image.Output(display_name="previews",
                                tooltip="The last round of preview images (the config's preview_every); one black "
                                        "image when previews are off."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.extra_pnginfo],
            not_idempotent=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, dataset, config, resume="") -> io.NodeOutput:
        with widget_words():
            model_out, lora, losses, previews = train_lora(model, clip, vae, dataset, config, resume=resume.strip(),
                                                           node_id=cls.hidden.unique_id,
                                                           workflow=workflow_id(cls.hidden.extra_pnginfo))
        return io.NodeOutput(model_out, lora, losses, previews)
