"""ComfyUI entry point of the FLUX.2 LoRA trainer node pack.

ComfyUI imports this file from `custom_nodes/` as a package; importing it must
work with and without ComfyUI present and stays cheap: the nodes import
torch-heavy modules only when they run.
"""

if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # executed as a plain file, outside any package
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
