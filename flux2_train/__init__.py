"""FLUX.2 [dev] / [klein] LoRA training engine.

Runs headless (`python -m flux2_train`) and under the ComfyUI nodes of this
pack; it never imports ComfyUI. Importing the package is cheap: submodules
load torch and diffusers only when used.
"""

__version__ = "0.1.0"
