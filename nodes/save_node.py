"""Flux2SaveLora: write the trained LoRA where ComfyUI's LoRA loaders list it."""

from __future__ import annotations

from comfy_api.latest import io, ui
from flux2_train.config import LORA_FORMATS
from flux2_train.errors import PathRefused
from flux2_train.lora_files import save_lora

from . import paths
from .training import CATEGORY, LoraType

_SAVE_ATTEMPTS = 100  # free names tried while other saves keep taking them


class Flux2SaveLora(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2SaveLora",
            display_name="FLUX.2 Save LoRA",
            category=CATEGORY,
            description="Saves the LoRA to models/loras/ (the folder Load LoRA lists) with its training metadata.",
            inputs=[
                LoraType.Input("lora", tooltip="The LoRA from FLUX.2 Train LoRA."),
                io.String.Input("file_name", default="flux2_lora",
                                tooltip="Name of the file in the loras folder ('.safetensors' is added; "
                                        "sub-folders like 'chars/anna' are fine, '..' and absolute paths are not)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace a file of the same name; off adds a counter (_001, _002, ...)."),
                io.Combo.Input("format", options=list(LORA_FORMATS), default="diffusers", advanced=True,
                               tooltip="Key names in the file. All load in ComfyUI; diffusers loads in both "
                                       "ComfyUI and diffusers' load_lora_weights."),
            ],
            outputs=[io.String.Output(display_name="file_name", tooltip="The name Load LoRA lists it under.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lora, file_name, overwrite, format="diffusers") -> io.NodeOutput:
        for _ in range(_SAVE_ATTEMPTS):
            path = paths.lora_file(file_name, overwrite)
            try:
                save_lora(path, lora.adapter, rank=lora.cfg.rank, alpha=lora.cfg.alpha, fmt=format,
                          metadata=lora.metadata(format), overwrite=overwrite)
                break
            except FileExistsError:  # another save took the free name between the check and the write
                continue
        else:
            raise PathRefused(f"the LoRA was not saved: each of {_SAVE_ATTEMPTS} free names found for {file_name!r} "
                              f"in {paths.loras_folder()} was taken before it could be written; save again, "
                              "or choose another file name")
        name = path.relative_to(paths.loras_folder()).as_posix()
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved {path}"))
