"""ComfyUI entry point of the FLUX.2 LoRA trainer node pack.

ComfyUI imports this file from `custom_nodes/` as a package. Importing it stays
cheap and works without ComfyUI: the nodes (and torch) load when ComfyUI calls
`comfy_entrypoint`.
"""

import os
import sys

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # The engine is imported as `flux2_train`, whether or not the pack was pip-installed.
    root = os.path.dirname(os.path.abspath(__file__))
    if root not in sys.path:
        sys.path.append(root)
    from .nodes import Flux2LoraExtension

    return Flux2LoraExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
