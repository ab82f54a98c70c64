"""ComfyUI nodes of the pack: thin glue over `flux2_train`."""

from comfy_api.latest import ComfyExtension, io


class Flux2LoraExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
