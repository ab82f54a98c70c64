"""The ComfyUI test harness: the UI-to-API converter, the tiny FLUX.2 models, a real server."""

from __future__ import annotations

import io
import tarfile

import pytest
from comfyui_harness import (
    TINY_MODEL_FILES,
    ComfyUISetupError,
    PromptRejected,
    locate_comfyui,
    missing_requirements,
    output_images,
    ui_to_api,
)

# --------------------------------------------------------------------------- locating ComfyUI


@pytest.fixture
def comfy_env(monkeypatch, tmp_path):
    for name in ("COMFYUI_DIR", "COMFYUI_ARCHIVE", "COMFYUI_SHIMS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return monkeypatch


def test_unconfigured_means_none_and_broken_means_an_error(comfy_env, tmp_path):
    assert locate_comfyui() is None
    comfy_env.setenv("COMFYUI_DIR", str(tmp_path))
    with pytest.raises(ComfyUISetupError, match="no main.py"):
        locate_comfyui()
    comfy_env.delenv("COMFYUI_DIR")
    comfy_env.setenv("COMFYUI_ARCHIVE", str(tmp_path / "missing.tar.gz"))
    with pytest.raises(ComfyUISetupError, match="does not exist"):
        locate_comfyui()


def test_archive_is_extracted_once_into_the_cache(comfy_env, tmp_path):
    archive = tmp_path / "ComfyUI.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"print('hi')\n"
        info = tarfile.TarInfo("ComfyUI/main.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    comfy_env.setenv("COMFYUI_ARCHIVE", str(archive))
    tree = locate_comfyui()
    assert tree.parent.parent == tmp_path / "cache" / "flux2-lora-trainer"
    assert (tree / "main.py").read_bytes() == data
    (tree / "marker").touch()
    assert locate_comfyui() == tree and (tree / "marker").exists()  # reused, not re-extracted


def test_missing_requirements_ignores_the_torch_family(tmp_path):
    (tmp_path / "requirements.txt").write_text("torch\ntorchvision\npytest\nno-such-package-xyz>=1\n# note\npytest>=999\n")
    assert missing_requirements(tmp_path) == ["no-such-package-xyz>=1", f"pytest>=999 (found {pytest.__version__})"]


# --------------------------------------------------------------------------- ui_to_api (no ComfyUI needed)

SAMPLER = {
    "input": {
        "required": {
            "model": ["MODEL", {}],
            "seed": ["INT", {"default": 0, "control_after_generate": True}],
            "steps": ["INT", {"default": 20}],
            "sampler_name": [["euler", "heun"], {}],
            "positive": ["CONDITIONING", {}],
            "latent_image": ["LATENT", {}],
        },
        "optional": {"denoise": ["FLOAT", {"default": 1.0}]},
    },
    "input_order": {"required": ["model", "seed", "steps", "sampler_name", "positive", "latent_image"], "optional": ["denoise"]},
    "output": ["LATENT"],
}
OBJECT_INFO = {
    "Sampler": SAMPLER,
    "Loader": {"input": {"required": {"name": [["a.safetensors", "b.safetensors"]]}}, "input_order": {"required": ["name"]}, "output": ["MODEL"]},
    "Encode": {"input": {"required": {"text": ["STRING", {"multiline": True}]}}, "input_order": {"required": ["text"]}, "output": ["CONDITIONING"]},
    "Empty": {"input": {"required": {"width": ["INT", {"default": 1024}]}}, "input_order": {"required": ["width"]}, "output": ["LATENT"]},
    "Lora": {
        "input": {"required": {"model": ["MODEL", {}], "strength": ["FLOAT", {"default": 1.0}]}},
        "input_order": {"required": ["model", "strength"]},
        "output": ["MODEL"],
    },
    "Noise": {  # an explicit flag wins over the name; V3 gives the default mode as a string
        "input": {"required": {
            "noise_seed": ["INT", {"control_after_generate": False}],
            "value": ["INT", {"control_after_generate": "fixed"}],
            "seed": ["INT", {}],  # no flag: the page adds the control for "seed" and "noise_seed"
        }},
        "input_order": {"required": ["noise_seed", "value", "seed"]},
        "output": ["NOISE"],
    },
    "Pick": {
        "input": {"required": {"choice": ["COMBO", {"options": ["x", "y"], "control_after_generate": True}], "n": ["INT", {}]}},
        "input_order": {"required": ["choice", "n"]},
        "output": ["STRING"],
    },
    "LoadImage": {"input": {"required": {"image": [["cat.png"], {"image_upload": True}]}}, "input_order": {"required": ["image"]}, "output": ["IMAGE", "MASK"]},
    "Show": {
        "input": {"required": {"text": ["STRING", {"forceInput": True}], "values": ["STRING", {}]}},
        "input_order": {"required": ["text", "values"]},
        "output": [],
    },
}


class UI:
    """A UI-format workflow built by hand: nodes with sockets, widgets_values and links."""

    def __init__(self):
        self.nodes: dict[int, dict] = {}
        self.links: list[list] = []

    def node(self, id, type, widgets=None, inputs=(), outputs=(), mode=0):
        self.nodes[id] = {
            "id": id, "type": type, "mode": mode, "widgets_values": widgets if widgets is not None else [],
            "inputs": [self._socket(*spec) for spec in inputs],
            "outputs": [{"name": t, "type": t, "links": []} for t in outputs],
        }
        return self

    @staticmethod
    def _socket(name, type, widget=False):
        return {"name": name, "type": type, "link": None, **({"widget": {"name": name}} if widget else {})}

    def link(self, src, src_slot, dst, input_name):
        slot = next(i for i, s in enumerate(self.nodes[dst]["inputs"]) if s["name"] == input_name)
        link_id = len(self.links) + 1
        self.links.append([link_id, src, src_slot, dst, slot, self.nodes[src]["outputs"][src_slot]["type"]])
        self.nodes[dst]["inputs"][slot]["link"] = link_id
        self.nodes[src]["outputs"][src_slot]["links"].append(link_id)
        return self

    def workflow(self):
        return {"nodes": list(self.nodes.values()), "links": self.links, "version": 0.4}


def sampler_graph(loader_mode=0, lora_mode=0):
    ui = UI()
    ui.node(1, "Loader", ["b.safetensors"], outputs=["MODEL"], mode=loader_mode)
    ui.node(2, "Lora", [0.5], inputs=[("model", "MODEL")], outputs=["MODEL"], mode=lora_mode)
    ui.node(3, "Encode", ["a cat"], outputs=["CONDITIONING"])
    ui.node(4, "Empty", [64], outputs=["LATENT"])
    ui.node(5, "Sampler", [7, "randomize", 2, "heun", 0.8],
            inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("latent_image", "LATENT"), ("steps", "INT", True)],
            outputs=["LATENT"])
    ui.link(1, 0, 2, "model").link(2, 0, 5, "model").link(3, 0, 5, "positive").link(4, 0, 5, "latent_image")
    return ui


def test_widgets_follow_the_definition_order_and_skip_the_seed_control():
    prompt = ui_to_api(sampler_graph().workflow(), OBJECT_INFO)
    assert prompt["5"]["class_type"] == "Sampler"
    assert prompt["5"]["inputs"] == {
        "seed": 7, "steps": 2, "sampler_name": "heun", "denoise": 0.8,
        "model": ["2", 0], "positive": ["3", 0], "latent_image": ["4", 0],
    }
    assert prompt["1"]["inputs"] == {"name": "b.safetensors"}


def test_bypassed_node_passes_its_matching_input_through():
    prompt = ui_to_api(sampler_graph(lora_mode=4).workflow(), OBJECT_INFO)
    assert "2" not in prompt
    assert prompt["5"]["inputs"]["model"] == ["1", 0]


def test_muted_node_and_links_from_it_are_dropped():
    prompt = ui_to_api(sampler_graph(loader_mode=2).workflow(), OBJECT_INFO)
    assert "1" not in prompt
    assert "model" not in prompt["2"]["inputs"]


def test_reroute_primitive_and_note():
    ui = UI()
    ui.node(4, "Empty", [64], outputs=["LATENT"])
    ui.node(5, "Sampler", [7, "randomize", 2, "heun", 0.8],
            inputs=[("latent_image", "LATENT"), ("steps", "INT", True)], outputs=["LATENT"])
    ui.node(6, "Reroute", inputs=[("", "*")], outputs=["*"])
    ui.node(7, "PrimitiveNode", [5, "fixed"], outputs=["INT"])
    ui.node(8, "MarkdownNote", ["# notes"])
    ui.link(4, 0, 6, "").link(6, 0, 5, "latent_image").link(7, 0, 5, "steps")
    prompt = ui_to_api(ui.workflow(), OBJECT_INFO)
    assert set(prompt) == {"4", "5"}
    assert prompt["5"]["inputs"]["latent_image"] == ["4", 0]
    assert prompt["5"]["inputs"]["steps"] == 5


def test_v3_control_flags_combo_controls_and_upload_button():
    ui = UI()
    ui.node(1, "Noise", [3, 4, "fixed", 11, "randomize"], outputs=["NOISE"])
    ui.node(2, "Pick", ["y", "increment", "", 9], outputs=["STRING"])
    ui.node(3, "LoadImage", ["cat.png", "image"], outputs=["IMAGE", "MASK"])
    prompt = ui_to_api(ui.workflow(), OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"noise_seed": 3, "value": 4, "seed": 11}
    assert prompt["2"]["inputs"] == {"choice": "y", "n": 9}
    assert prompt["3"]["inputs"] == {"image": "cat.png"}


def test_dict_widget_values_list_values_and_force_input():
    ui = UI()
    ui.node(1, "Sampler", {"seed": 1, "steps": 3, "sampler_name": "euler", "denoise": 1.0}, outputs=["LATENT"])
    ui.node(2, "Encode", ["x"], outputs=["CONDITIONING"])
    ui.node(3, "Show", [["a", "b"]], inputs=[("text", "STRING")])
    ui.node(4, "Pick", ["x", "fixed", "", 1], outputs=["STRING"])
    ui.link(4, 0, 3, "text")
    prompt = ui_to_api(ui.workflow(), OBJECT_INFO)
    assert prompt["1"]["inputs"] == {"seed": 1, "steps": 3, "sampler_name": "euler", "denoise": 1.0}
    assert prompt["3"]["inputs"] == {"values": {"__value__": ["a", "b"]}, "text": ["4", 0]}


def test_missing_widget_values_fall_back_to_defaults():
    ui = UI().node(1, "Sampler", [5], outputs=["LATENT"])
    assert ui_to_api(ui.workflow(), OBJECT_INFO)["1"]["inputs"] == {"seed": 5, "steps": 20, "sampler_name": "euler", "denoise": 1.0}


def test_unknown_nodes_and_subgraphs_are_refused():
    with pytest.raises(ValueError, match="does not know"):
        ui_to_api(UI().node(1, "Nope").workflow(), OBJECT_INFO)
    workflow = UI().node(1, "0b1e-subgraph").workflow()
    workflow["definitions"] = {"subgraphs": [{"id": "0b1e-subgraph"}]}
    with pytest.raises(ValueError, match="subgraph"):
        ui_to_api(workflow, OBJECT_INFO)


# --------------------------------------------------------------------------- tiny models in-process


@pytest.mark.comfyui
def test_tiny_models_are_real_comfyui_flux2_models(comfy):
    import torch
    from comfyui_harness import tiny_dit_state_dict

    def encode(clip):
        return clip.encode_from_tokens_scheduled(clip.tokenize("a red fox"))[0][0]

    assert encode(comfy.tiny_clip("klein")).shape == (1, 512, 96)  # padded to 512; layers 9, 18, 27 x 32
    dev = encode(comfy.tiny_clip("dev"))
    assert dev.shape[-1] == 96 and torch.equal(dev, encode(comfy.tiny_clip("dev")))  # fixed seed

    vae = comfy.tiny_vae()
    latent = vae.encode(torch.rand(1, 64, 64, 3))
    assert latent.shape == (1, 128, 4, 4)
    assert vae.decode(latent).shape == (1, 64, 64, 3)

    for kind in ("klein", "dev"):
        model = comfy.sd.load_diffusion_model_state_dict(tiny_dit_state_dict(kind), model_options={"dtype": torch.float32})
        assert type(model.model.latent_format) is comfy.latent_formats.Flux2
        assert model.model.diffusion_model.params.context_in_dim == 96
        assert model.model.diffusion_model.params.guidance_embed == (kind == "dev")


# --------------------------------------------------------------------------- a real server


def klein_text_to_image_ui(prompt_text: str) -> dict:
    """ComfyUI's FLUX.2 [klein] base template chain, flattened, with the tiny loaders at 64x64."""
    ui = UI()
    ui.node(1, "UNETLoader", [TINY_MODEL_FILES["klein"], "default"], outputs=["MODEL"])
    ui.node(2, "Flux2TestTinyCLIP", ["klein"], outputs=["CLIP"])
    ui.node(3, "Flux2TestTinyVAE", [], outputs=["VAE"])
    ui.node(4, "CLIPTextEncode", [prompt_text], inputs=[("clip", "CLIP")], outputs=["CONDITIONING"])
    ui.node(5, "CLIPTextEncode", [""], inputs=[("clip", "CLIP")], outputs=["CONDITIONING"])
    ui.node(6, "PrimitiveInt", [64, "fixed"], outputs=["INT"])
    ui.node(7, "EmptyFlux2LatentImage", [1024, 1024, 1],
            inputs=[("width", "INT", True), ("height", "INT", True)], outputs=["LATENT"])
    ui.node(8, "Flux2Scheduler", [2, 1024, 1024],
            inputs=[("width", "INT", True), ("height", "INT", True)], outputs=["SIGMAS"])
    ui.node(9, "RandomNoise", [0, "randomize"], outputs=["NOISE"])
    ui.node(10, "KSamplerSelect", ["euler"], outputs=["SAMPLER"])
    ui.node(11, "CFGGuider", [2.0],
            inputs=[("model", "MODEL"), ("positive", "CONDITIONING"), ("negative", "CONDITIONING")], outputs=["GUIDER"])
    ui.node(12, "SamplerCustomAdvanced", [],
            inputs=[("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
            outputs=["LATENT", "LATENT"])
    ui.node(13, "VAEDecode", [], inputs=[("samples", "LATENT"), ("vae", "VAE")], outputs=["IMAGE"])
    ui.node(14, "SaveImage", ["harness/klein"], inputs=[("images", "IMAGE")])
    ui.node(15, "MarkdownNote", ["Tiny random models: the image is noise."])
    for a, b in [(2, 4), (2, 5)]:
        ui.link(a, 0, b, "clip")
    for target in (7, 8):
        ui.link(6, 0, target, "width").link(6, 0, target, "height")
    ui.link(1, 0, 11, "model").link(4, 0, 11, "positive").link(5, 0, 11, "negative")
    ui.link(9, 0, 12, "noise").link(11, 0, 12, "guider").link(10, 0, 12, "sampler")
    ui.link(8, 0, 12, "sigmas").link(7, 0, 12, "latent_image")
    ui.link(12, 0, 13, "samples").link(3, 0, 13, "vae").link(13, 0, 14, "images")
    return ui.workflow()


@pytest.mark.comfyui
def test_server_loads_the_pack_the_test_nodes_and_the_tiny_models(comfy_server):
    info = comfy_server.object_info()
    assert {"Flux2TestTinyCLIP", "Flux2TestTinyVAE", "EmptyFlux2LatentImage"} <= set(info)
    assert set(TINY_MODEL_FILES.values()) <= set(info["UNETLoader"]["input"]["required"]["unet_name"][0])
    failed = [line for line in comfy_server.log_text().splitlines() if "IMPORT FAILED" in line]
    assert not [line for line in failed if "comfy_test_nodes" in line or "comfyui-flux2-lora-trainer" in line], failed
    comfy_server.interrupt()  # nothing running: still answered


@pytest.mark.comfyui
def test_klein_text_to_image_from_a_ui_workflow(comfy_server):
    from PIL import Image

    prompt = ui_to_api(klein_text_to_image_ui("a tiny red fox"), comfy_server.object_info())
    assert prompt["7"]["inputs"]["width"] == ["6", 0] and prompt["12"]["inputs"]["noise"] == ["9", 0]
    entry, events = comfy_server.run(prompt, timeout=120)
    kinds = [kind for kind, _ in events]
    assert {"execution_start", "executing", "progress", "executed", "execution_success"} <= set(kinds)
    [image] = output_images(comfy_server, entry)
    assert image.is_file() and Image.open(image).size == (64, 64)


@pytest.mark.comfyui
def test_dev_text_to_image_with_guidance(comfy_server):
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_FILES["dev"], "weight_dtype": "default"}},
        "2": {"class_type": "Flux2TestTinyCLIP", "inputs": {"type": "dev"}},
        "3": {"class_type": "Flux2TestTinyVAE", "inputs": {}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a tiny red fox", "clip": ["2", 0]}},
        "5": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 4.0}},
        "6": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 1, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["5", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "harness/dev"}},
    }
    entry, _ = comfy_server.run(prompt, timeout=120)
    assert len(output_images(comfy_server, entry)) == 1


@pytest.mark.comfyui
def test_uploaded_image_round_trips_through_the_tiny_vae(comfy_server, tmp_path):
    from PIL import Image

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "red.png")
    name = comfy_server.upload_image(tmp_path / "red.png", subfolder="harness")
    assert (comfy_server.input_dir / name).is_file()
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "Flux2TestTinyVAE", "inputs": {}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["2", 0]}},
        "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "harness/roundtrip"}},
    }
    entry, _ = comfy_server.run(prompt, timeout=60)
    [image] = output_images(comfy_server, entry)
    assert Image.open(image).size == (64, 64)


@pytest.mark.comfyui
def test_invalid_prompt_is_rejected_with_the_server_errors(comfy_server):
    prompt = {
        "1": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 8, "height": 64, "batch_size": 1}},
        "2": {"class_type": "Flux2TestTinyVAE", "inputs": {}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["1", 0], "vae": ["2", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "x"}},
    }
    with pytest.raises(PromptRejected) as raised:
        comfy_server.queue(prompt)
    assert raised.value.error["error"]["type"] == "prompt_outputs_failed_validation"
    [error] = raised.value.error["node_errors"]["1"]["errors"]
    assert error["type"] == "value_smaller_than_min"


@pytest.mark.comfyui
def test_cancel_and_runtime_errors_are_reported(comfy_server):
    from comfyui_harness import ExecutionFailed

    prompt = ui_to_api(klein_text_to_image_ui("cancelled"), comfy_server.object_info())
    prompt["8"]["inputs"]["steps"] = 40

    def cancel_on_first_step(kind, data):
        if kind == "progress":
            comfy_server.interrupt()

    entry, events = comfy_server.run(prompt, timeout=120, check=False, on_event=cancel_on_first_step)
    assert entry["status"]["status_str"] == "error"
    assert "execution_interrupted" in [kind for kind, _ in events]

    broken = comfy_server.models_dir / "diffusion_models" / "harness-broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    try:
        prompt["1"]["inputs"]["unet_name"] = broken.name
        with pytest.raises(ExecutionFailed, match="execution_error"):
            comfy_server.run(prompt, timeout=60)
    finally:
        broken.unlink()
