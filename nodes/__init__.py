"""ComfyUI nodes of the pack: thin glue over `flux2_train`."""

from comfy_api.latest import ComfyExtension, io


class Flux2LoraExtension(ComfyExtension):
    async def on_load(self) -> None:
        from server import PromptServer

        from .routes import register

        register(PromptServer.instance.routes)

    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .config_node import Flux2LoraConfig
        from .dataset_node import Flux2LoraDataset
        from .estimate_node import Flux2VramEstimate
        from .save_node import Flux2SaveLora
        from .train_node import Flux2TrainLora

        return [Flux2LoraDataset, Flux2LoraConfig, Flux2VramEstimate, Flux2TrainLora, Flux2SaveLora]
