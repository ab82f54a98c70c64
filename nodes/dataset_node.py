"""Flux2LoraDataset: an image folder with captions, checked and bucketed before anything trains."""

from __future__ import annotations

import hashlib
import os

from comfy_api.latest import io, ui
from flux2_train.data import scan_dataset

from . import paths
from .messages import in_widget_words, widget_words
from .training import CATEGORY, DatasetHandle, DatasetType


class Flux2LoraDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Flux2LoraDataset",
            display_name="FLUX.2 LoRA Dataset",
            category=CATEGORY,
            description="Checks an image folder and its captions and sorts the images into aspect-ratio buckets.",
            inputs=[
                io.String.Input("folder", default="lora_dataset",
                                tooltip="Folder of .png/.jpg/.jpeg/.webp images, relative to ComfyUI's input folder "
                                        "(other folders only if allow-listed, see the README)."),
                io.String.Input("caption_extension", default=".txt",
                                tooltip="Extension of the caption file beside each image (photo.png -> photo.txt)."),
                io.String.Input("trigger_word", default="",
                                tooltip="Word that names the subject; put in front of captions that lack it and "
                                        "used as the caption of images without one."),
                io.String.Input("default_caption", default="",
                                tooltip="Caption for images without a caption file (empty: the trigger word)."),
                io.Int.Input("repeats", default=1, min=1, max=1000,
                             tooltip="How many times each image appears per epoch (with quick preset auto, "
                                     "1 lets auto choose from the number of images)."),
                io.Int.Input("resolution", default=1024, min=64, max=2048, step=16,
                             tooltip="Training resolution: each bucket keeps about resolution x resolution pixels."),
                io.Boolean.Input("buckets", default=True,
                                 tooltip="Keep each image's aspect ratio with aspect buckets; off crops every image "
                                         "to a square."),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Also train on left-right mirrored images (not for subjects with text or "
                                         "asymmetric features)."),
                # Optional and last: workflows saved before them load with their values in place.
                io.Boolean.Input("prepend_trigger", default=True, optional=True,
                                 tooltip="Put the trigger word in front of every caption that does not contain it."),
                io.Float.Input("max_upscale", default=2.0, min=1.0, max=16.0, step=0.1, optional=True,
                               tooltip="Largest upscale allowed to reach a bucket; smaller images are refused "
                                       "with a resolution that fits."),
            ],
            outputs=[DatasetType.Output(display_name="dataset")],
        )

    @classmethod
    def fingerprint_inputs(cls, folder, **_) -> str:
        """Changes when files in the folder do, so ComfyUI re-checks an edited dataset instead of its cache."""
        try:
            root = paths.dataset_folder(folder)
            listing = sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(root) if e.is_file())
        except Exception:  # noqa: BLE001 - execute() reports the problem
            return folder
        return hashlib.sha256(repr(listing).encode()).hexdigest()

    @classmethod
    def execute(cls, folder, caption_extension, trigger_word, default_caption, repeats, resolution, buckets,
                flip, prepend_trigger=True, max_upscale=2.0) -> io.NodeOutput:
        with widget_words():
            root = paths.dataset_folder(folder)
            paths.check_dataset_files(root)
            options = dataset_options(str(root), caption_extension, trigger_word, default_caption, repeats,
                                      resolution, buckets, flip, prepend_trigger, max_upscale)
            report = scan_dataset(options["dataset"], caption_ext=caption_extension,
                                  trigger_word=options["trigger_word"], default_caption=default_caption,
                                  prepend_trigger=prepend_trigger, resolution=resolution,
                                  max_aspect_ratio=options["max_aspect_ratio"], max_upscale=options["max_upscale"])
        return io.NodeOutput(DatasetHandle(report, options), ui=ui.PreviewText(in_widget_words(report.summary())))


def dataset_options(folder: str, caption_extension: str, trigger_word: str, default_caption: str, repeats: int,
                    resolution: int, buckets: bool, flip: bool, prepend_trigger: bool = True, max_upscale: float = 2.0,
                    **_) -> dict:
    """The node's widget values as engine options (the training run records what the scan used)."""
    return dict(dataset=folder, caption_ext=caption_extension, trigger_word=trigger_word.strip(),
                default_caption=default_caption, repeats=repeats, resolution=resolution,
                max_aspect_ratio=3.0 if buckets else 1.0, flip=flip, prepend_trigger=prepend_trigger,
                max_upscale=float(max_upscale))
