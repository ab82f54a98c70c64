"""Flux2VramEstimate: will this run fit the GPU ComfyUI uses, and what to change if not."""

from __future__ import annotations

from comfy_api.latest import io, ui

from flux2_train.config import suggest_schedule

from .messages import in_widget_words, widget_words
from .training import CATEGORY, ConfigType, DatasetType, memory_plan, training_config


class Flux2VramEstimate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2VramEstimate",
            display_name="FLUX.2 LoRA vRAM Estimate",
            category=CATEGORY,
            description="Estimated peak GPU memory of the training run, with a breakdown and a verdict.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.2 MODEL to train (as loaded: its fp8 or bf16 size counts)."),
                ConfigType.Input("config", tooltip="Training options from FLUX.2 LoRA Config."),
                DatasetType.Input("dataset", tooltip="The dataset from FLUX.2 LoRA Dataset (its resolution counts)."),
            ],
            outputs=[io.String.Output(display_name="estimate")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, config, dataset) -> io.NodeOutput:
        with widget_words():
            cfg = training_config(model, dataset, config)
            plan = memory_plan(model, cfg, dataset)
        schedule = suggest_schedule(len(dataset.report.items), cfg.subject_preset, cfg.effective_batch, cfg.rank)
        text = in_widget_words("\n".join(filter(None, [plan.estimate.summary(), plan.reason,
                                                        f"suggested for this dataset: {schedule['reason']}"])))
        return io.NodeOutput(text, ui=ui.PreviewText(text))
