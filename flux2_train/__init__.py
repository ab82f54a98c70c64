"""FLUX.2 [dev] / [klein] LoRA training engine.

Runs headless (`python -m flux2_train`) and under the ComfyUI nodes of this
pack; it never imports ComfyUI. Importing the package is cheap: submodules
load torch and diffusers only when used.
"""

__version__ = "0.1.0"

import logging as _logging

# PEFT imports bitsandbytes when it is installed; on a CPU with AVX-512 bf16 its CPU backend then
# warns, at import, that an optional kernel package is missing. Nothing here needs that kernel.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
