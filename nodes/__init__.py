"""ComfyUI nodes of the pack: thin glue over `flux2_train`.

Each node module registers itself here; this file imports no torch-heavy code.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
