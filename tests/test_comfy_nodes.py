"""The node pack in a running ComfyUI: register, train, save where the loaders look, cancel and resume, refuse bad input.

The server runs on the CPU with tiny FLUX.2 models: the DiT through the stock
Load Diffusion Model, the text encoder and VAE through test-only loaders.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from comfyui_harness import ExecutionFailed, TINY_MODEL_FILES, output_images

pytestmark = pytest.mark.comfyui
NODE_IDS = ["Flux2LoraDataset", "Flux2LoraConfig", "Flux2VramEstimate", "Flux2TrainLora", "Flux2SaveLora"]


@pytest.fixture
def dataset_name(comfy_dataset) -> str:
    return comfy_dataset


def training_prompt(dataset: str, steps: int = 4, file_name: str = "robot_lora", resume: str = "",
                    folder: str | None = None, kind: str = "klein", seed: int = 1, save_every: int = 2,
                    advanced: str = "") -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_FILES[kind], "weight_dtype": "default"}},
        "2": {"class_type": "Flux2TestTinyCLIP", "inputs": {"type": kind}},
        "3": {"class_type": "Flux2TestTinyVAE", "inputs": {}},
        "4": {"class_type": "Flux2LoraDataset", "inputs": {
            "folder": folder or dataset, "caption_extension": ".txt", "trigger_word": "r0b0t", "default_caption": "",
            "repeats": 1, "resolution": 128, "buckets": True, "flip": False}},
        "5": {"class_type": "Flux2LoraConfig", "inputs": {
            "subject": "character", "quick_preset": "fast", "rank": 4, "alpha": 4.0, "steps": steps,
            "learning_rate": 3e-3, "optimizer": "adamw", "batch_size": 1, "gradient_accumulation": 1,
            "dtype": "auto", "gradient_checkpointing": "preset", "save_every": save_every, "seed": seed,
            "advanced": "caption_dropout: 0.0\nlr_warmup_steps: 1\n" + advanced}},
        "6": {"class_type": "Flux2TrainLora", "inputs": {
            "model": ["1", 0], "clip": ["2", 0], "vae": ["3", 0], "dataset": ["4", 0], "config": ["5", 0],
            "resume": resume}},
        "7": {"class_type": "Flux2SaveLora", "inputs": {"lora": ["6", 1], "file_name": file_name, "overwrite": False,
                                                      "format": "diffusers"}},
    }


def sampling_prompt(lora_name: str | None = None, seed: int = 3) -> dict:
    model = ["1", 0]
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": TINY_MODEL_FILES["klein"], "weight_dtype": "default"}},
        "2": {"class_type": "Flux2TestTinyCLIP", "inputs": {"type": "klein"}},
        "3": {"class_type": "Flux2TestTinyVAE", "inputs": {}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "r0b0t standing", "clip": ["2", 0]}},
        "5": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["3", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sample"}},
    }
    if lora_name:
        prompt["10"] = {"class_type": "LoraLoaderModelOnly",
                        "inputs": {"model": ["1", 0], "lora_name": lora_name, "strength_model": 1.0}}
        model = ["10", 0]
    prompt["6"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0], "denoise": 1.0}}
    return prompt


def estimate_prompt(dataset: str, **dataset_inputs) -> dict:
    """The dataset and config nodes wired to the estimate node: a dataset checked without training."""
    prompt = {k: v for k, v in training_prompt(dataset).items() if k in ("1", "4", "5")}
    prompt["4"]["inputs"].update(dataset_inputs)
    prompt["8"] = {"class_type": "Flux2VramEstimate",
                   "inputs": {"model": ["1", 0], "config": ["5", 0], "dataset": ["4", 0]}}
    return prompt


def newest_run(server) -> Path:
    return max((server.output_dir / "flux2_lora").glob("flux2-*"), key=lambda p: p.stat().st_mtime)


def image_bytes(server, entry) -> bytes:
    (path,) = output_images(server, entry)
    return path.read_bytes()


def node_error(server, prompt) -> str:
    with pytest.raises(ExecutionFailed) as e:
        server.run(prompt, timeout=120)
    return str(e.value)


def exception_message(events) -> str:
    """The message of the node error a run ended with, as the node shows it."""
    (message,) = [d["exception_message"] for kind, d in events if kind == "execution_error"]
    return message.strip()


def test_the_five_nodes_register_with_a_tooltip_on_every_input(comfy_server):
    info = comfy_server.object_info()
    for node_id in NODE_IDS:
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["category"] == "FLUX.2 LoRA training"
        for section in ("required", "optional"):
            for name, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"


def test_train_save_and_load_with_the_stock_lora_loader(comfy_server, dataset_name):
    server = comfy_server
    before, _ = server.run(sampling_prompt(), timeout=120)
    entry, events = server.run(training_prompt(dataset_name, file_name="robot_lora"), timeout=300)

    saved = entry["outputs"]["7"]["text"][0]
    assert saved.startswith("saved ") and "robot_lora" in saved
    lora_file = server.models_dir / "loras" / "robot_lora.safetensors"
    assert lora_file.is_file()
    listed = server.object_info(refresh=True)["LoraLoaderModelOnly"]["input"]["required"]["lora_name"][0]
    assert "robot_lora.safetensors" in listed

    progress = [d for kind, d in events if kind == "flux2_lora.progress" and d.get("kind") == "step"]
    assert [d["step"] for d in progress] == [1, 2, 3, 4]
    assert all(d["node"] == "6" and d["total"] == 4 and d["loss"] > 0 for d in progress)
    assert {"smoothed_loss", "lr", "seconds_per_step", "eta_seconds", "peak_memory_bytes"} <= set(progress[-1])
    assert any(kind == "progress" and d.get("node") == "6" for kind, d in events)  # ComfyUI's progress bar

    # Every option of the config node, the advanced YAML included, reached the engine.
    import yaml

    run_dir = max((server.output_dir / "flux2_lora").glob("flux2-*"), key=lambda p: p.stat().st_mtime)
    used = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert {k: used[k] for k in ("rank", "alpha", "steps", "learning_rate", "optimizer", "seed", "save_every",
                                 "lr_warmup_steps", "caption_dropout", "trigger_word", "resolution")} == dict(
        rank=4, alpha=4.0, steps=4, learning_rate=3e-3, optimizer="adamw", seed=1, save_every=2,
        lr_warmup_steps=1, caption_dropout=0.0, trigger_word="r0b0t", resolution=128)
    assert used["max_sequence_length"] == 512  # what ComfyUI's FLUX.2 model pads text to
    assert used["dtype"] == "float32"  # dtype auto: the precision the MODEL computes in (float32 on the CPU)

    # The MODEL held by the loader is unchanged: same image as before training.
    after, _ = server.run(sampling_prompt(), timeout=120)
    assert image_bytes(server, after) == image_bytes(server, before)

    log_start = len(server.log_text())
    with_lora, _ = server.run(sampling_prompt("robot_lora.safetensors"), timeout=120)
    assert "lora key not loaded" not in server.log_text()[log_start:]
    assert image_bytes(server, with_lora) != image_bytes(server, before)


def test_compile_from_the_advanced_field_compiles_comfyuis_blocks(comfy_server, dataset_name):
    """The loader's MODEL held as it is (no per-op casts): the node trains it with compiled blocks."""
    prompt = training_prompt(dataset_name, steps=2, file_name="compiled_lora", advanced="compile: true")
    prompt["4"]["inputs"]["buckets"] = False  # one image size: one graph per block kind to compile
    entry, events = comfy_server.run(prompt, timeout=300)
    status = [d["message"] for kind, d in events if kind == "flux2_lora.progress" and d.get("kind") == "training"]
    assert status and "compile is off" not in status[0]
    steps = [d for kind, d in events if kind == "flux2_lora.progress" and d.get("kind") == "step"]
    assert [d["step"] for d in steps] == [1, 2] and all(math.isfinite(d["loss"]) for d in steps)
    assert "compile is off" not in comfy_server.log_text()
    import yaml

    run_dir = max((comfy_server.output_dir / "flux2_lora").glob("flux2-*"), key=lambda p: p.stat().st_mtime)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["compile"] is True


def test_previews_and_the_validation_loss_reach_the_page_and_the_previews_output(comfy_server, dataset_name):
    import urllib.request

    prompt = training_prompt(dataset_name, steps=4, file_name="with_previews", seed=31)
    prompt["5"]["inputs"]["advanced"] += "\npreview_resolution: 64\npreview_steps: 2\nvalidate_every: 2"
    prompt["5"]["inputs"].update(preview_every=2, preview_prompts="r0b0t on a table\nr0b0t in the snow")
    prompt["9"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 3], "filename_prefix": "lora_previews"}}
    entry, events = comfy_server.run(prompt, timeout=300)

    progress = [d for kind, d in events if kind == "flux2_lora.progress"]
    previews = [d for d in progress if d["kind"] == "preview"]
    assert [d["step"] for d in previews] == [0, 2, 4]
    assert [img["prompt"] for img in previews[-1]["data"]["images"]] == ["r0b0t on a table", "r0b0t in the snow"]
    view = previews[-1]["data"]["images"][0]["view"]
    assert view["type"] == "output" and view["subfolder"].startswith("flux2_lora/")
    with urllib.request.urlopen(f"{comfy_server.url}/view?filename={view['filename']}&subfolder={view['subfolder']}"
                                f"&type=output") as r:
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"  # the browser fetches it from here
    validation = [d for d in progress if d["kind"] == "validation"]
    assert [d["step"] for d in validation] == [0, 2, 4] and validation[-1]["data"]["best_step"] in (0, 2, 4)
    assert len(output_images(comfy_server, entry)) == 2  # the previews output: the last round


@pytest.mark.failure_case("LoRA file of the same name exists")
def test_saving_twice_adds_a_counter_instead_of_overwriting(comfy_server, dataset_name):
    # A changed seed: ComfyUI re-runs nothing for an unchanged graph.
    comfy_server.run(training_prompt(dataset_name, steps=1, file_name="twice", seed=5), timeout=300)
    comfy_server.run(training_prompt(dataset_name, steps=1, file_name="twice", seed=6), timeout=300)
    folder = comfy_server.models_dir / "loras"
    assert (folder / "twice.safetensors").is_file()
    assert (folder / "twice_001.safetensors").is_file()


def test_the_files_a_run_writes_get_the_permissions_open_gives_new_files(comfy_server, dataset_name):
    import os
    import stat

    umask = os.umask(0o022)
    os.umask(umask)  # the server's too: it inherits this process's
    comfy_server.run(training_prompt(dataset_name, steps=1, file_name="shared_lora", seed=81), timeout=300)
    run_dir = newest_run(comfy_server)
    written = [comfy_server.models_dir / "loras" / "shared_lora.safetensors",
               *(run_dir / name for name in ("config.yaml", "loss.png", "summary.txt"))]
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in written} == {
        f.name: oct(0o666 & ~umask) for f in written}
    (checkpoint,) = (run_dir / "checkpoints").iterdir()
    assert oct(stat.S_IMODE(checkpoint.stat().st_mode)) == oct(0o777 & ~umask)
    assert oct(stat.S_IMODE((checkpoint / "lora.safetensors").stat().st_mode)) == oct(0o666 & ~umask)


@pytest.mark.failure_case("Cancel during a step")
def test_cancel_writes_a_checkpoint_and_resume_continues_from_it(comfy_server, dataset_name):
    server = comfy_server

    def cancel_after_two_steps(kind, data):
        if kind == "flux2_lora.progress" and data.get("kind") == "step" and data["step"] == 2:
            server.interrupt()

    entry, events = server.run(training_prompt(dataset_name, steps=50, file_name="cancelled", save_every=100),
                               timeout=300, check=False, on_event=cancel_after_two_steps)
    assert any(kind == "execution_interrupted" for kind, _ in events)
    cancelled = [d for kind, d in events if kind == "flux2_lora.progress" and d.get("kind") == "cancelled"]
    assert cancelled, f"no cancelled status was sent: {[(k, d.get('kind'), d.get('step')) for k, d in events][-12:]}"
    stopped_at = cancelled[0]["step"]
    runs = sorted((server.output_dir / "flux2_lora").glob("flux2-*"), key=lambda p: p.stat().st_mtime)
    run_dir = runs[-1]
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [f"step-{stopped_at:06d}"]

    entry, events = server.run(training_prompt(dataset_name, steps=stopped_at + 2, file_name="resumed",
                                               resume=run_dir.name), timeout=300)
    steps = [d["step"] for kind, d in events if kind == "flux2_lora.progress" and d.get("kind") == "step"]
    assert steps == [stopped_at + 1, stopped_at + 2]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m.get("kind") == "step"][-2:] == steps


def test_resuming_from_a_checkpoint_folder_keeps_the_runs_own_name(comfy_server, dataset_name):
    from flux2_train.lora_files import read_metadata

    comfy_server.run(training_prompt(dataset_name, steps=2, save_every=2, file_name="named", seed=91), timeout=300)
    run_dir = newest_run(comfy_server)
    checkpoint = run_dir / "checkpoints" / "step-000002"  # the path the Cancel message names
    entry, events = comfy_server.run(training_prompt(dataset_name, steps=3, save_every=2, file_name="named_more",
                                                     seed=91, resume=str(checkpoint)), timeout=300)
    assert [d["step"] for kind, d in events if kind == "flux2_lora.progress" and d.get("kind") == "step"] == [3]
    # The run's own name, and its 2-step LoRA kept beside the new one.
    assert sorted(p.name for p in run_dir.glob("*.safetensors")) == [f"{run_dir.name}.safetensors",
                                                                      f"{run_dir.name}.step-000002.safetensors"]
    saved = read_metadata(comfy_server.models_dir / "loras" / "named_more.safetensors")
    assert saved["modelspec.title"] == run_dir.name


@pytest.fixture(scope="module")
def bad_datasets(comfy_server, tmp_path_factory) -> None:
    """Folders in the server's input folder that a user could point the dataset node at."""
    from PIL import Image

    inputs = comfy_server.input_dir
    (inputs / "empty_set").mkdir(exist_ok=True)
    corrupt = inputs / "corrupt_set"
    corrupt.mkdir(exist_ok=True)
    Image.new("RGB", (128, 128), (200, 30, 30)).save(corrupt / "good.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    outside = tmp_path_factory.mktemp("outside")
    Image.new("RGB", (128, 128)).save(outside / "a.png")
    if not (inputs / "linked_set").is_symlink():
        (inputs / "linked_set").symlink_to(outside, target_is_directory=True)


OUTSIDE = "is outside the folders this trainer may use"


@pytest.mark.parametrize("folder, message", [
    pytest.param("/etc", OUTSIDE,
                 marks=pytest.mark.failure_case("absolute dataset path outside the allowed folders")),
    pytest.param("../models", OUTSIDE, marks=pytest.mark.failure_case("dataset path with ../")),
    pytest.param("linked_set", OUTSIDE, marks=pytest.mark.failure_case("symlink pointing outside the allowed folders")),
    pytest.param("no_such_folder", "the dataset folder", marks=pytest.mark.failure_case("missing dataset folder")),
    pytest.param("empty_set", "has 0 images; supported: .png .jpg .jpeg .webp",
                 marks=pytest.mark.failure_case("empty dataset folder")),
    pytest.param("corrupt_set", "broken.png is not a readable image", marks=pytest.mark.failure_case("corrupt image")),
])
def test_a_bad_dataset_folder_is_refused_with_its_reason_in_the_ui(comfy_server, dataset_name, bad_datasets, folder,
                                                                   message):
    error = node_error(comfy_server, training_prompt(dataset_name, folder=folder))
    assert message in error
    assert '"exception_type": "flux2_train.errors.' in error  # the trainer's message, not a crash


def test_a_caption_extension_without_its_dot_reads_the_captions(comfy_server, dataset_name):
    entry, _ = comfy_server.run(estimate_prompt(dataset_name, caption_extension="txt"), timeout=120)
    assert "captions: 5 from caption files, 1 trigger word only" in entry["outputs"]["4"]["text"][0]


@pytest.mark.failure_case("symlink pointing outside the allowed folders")
def test_a_caption_linked_from_outside_is_refused_in_any_letter_case(comfy_server, tmp_path):
    from PIL import Image

    folder = comfy_server.input_dir / "upper_case_link_set"
    folder.mkdir()
    Image.new("RGB", (128, 128), (20, 120, 200)).save(folder / "a.png")
    outside = tmp_path / "private.txt"
    outside.write_text("text from outside the allowed folders")
    (folder / "a.TXT").symlink_to(outside)  # the scan reads a.TXT as a.png's caption
    entry, events = comfy_server.run(estimate_prompt("upper_case_link_set"), timeout=120, check=False)
    message = exception_message(events)
    assert OUTSIDE in message and "a.TXT" in message


@pytest.mark.failure_case("caption longer than the text encoder's limit")
def test_a_caption_over_the_token_limit_trains_truncated_with_a_warning_naming_its_image(comfy_server, dataset_name):
    import shutil

    folder = comfy_server.input_dir / "long_caption_set"
    shutil.copytree(comfy_server.input_dir / dataset_name, folder)
    (folder / "robot_02.txt").write_text("r0b0t, " + "a small robot standing in a sunny field, " * 120)
    log_start = len(comfy_server.log_text())
    entry, events = comfy_server.run(training_prompt(dataset_name, steps=1, file_name="long_caption", seed=121,
                                                     folder=folder.name), timeout=300)
    assert [d["step"] for kind, d in events if kind == "flux2_lora.progress" and d.get("kind") == "step"] == [1]
    assert "1 caption(s) are longer than 512 tokens and were truncated: robot_02.png" in (
        comfy_server.log_text()[log_start:])


@pytest.mark.parametrize("file_name, message", [
    pytest.param(name, "must be a plain name", marks=pytest.mark.failure_case("LoRA name with path separators"))
    for name in ("../escape", "/tmp/escape", "a/../../b")
] + [
    pytest.param(name, message, marks=pytest.mark.failure_case("LoRA name with reserved characters"))
    for name, message in (("a:b", "contains ':'"), ("what?", "contains '?'"), ("bad\x01name", "contains \\x01"),
                          ("nul", "which Windows reserves"), ("trailing.", "which Windows reserves"))
])
def test_a_lora_file_name_that_cannot_be_a_file_in_the_loras_folder_is_refused(comfy_server, dataset_name, file_name,
                                                                               message):
    error = node_error(comfy_server, training_prompt(dataset_name, steps=1, file_name=file_name))
    assert message in error
    assert not list((comfy_server.models_dir / "loras").glob("*escape*"))


@pytest.mark.failure_case("LoRA name with path separators")
def test_a_lora_name_inside_an_existing_file_is_refused_naming_that_file(comfy_server, dataset_name):
    loras = comfy_server.models_dir / "loras"
    loras.mkdir(exist_ok=True)
    (loras / "first.safetensors").write_bytes(b"an earlier LoRA")
    entry, events = comfy_server.run(training_prompt(dataset_name, steps=1, file_name="first.safetensors/v2",
                                                     seed=71), timeout=300, check=False)
    message = exception_message(events)
    assert f"{loras / 'first.safetensors'} is a file, not a folder" in message and "choose a name" in message
    assert (loras / "first.safetensors").read_bytes() == b"an earlier LoRA"


@pytest.mark.failure_case("run to resume outside the runs folder")
@pytest.mark.parametrize("resume, message", [
    ("../../etc", OUTSIDE),
    ("/tmp", OUTSIDE),
    ("no_such_run", "no such run folder"),
])
def test_a_run_to_resume_outside_the_runs_folder_is_refused(comfy_server, dataset_name, resume, message):
    assert message in node_error(comfy_server, training_prompt(dataset_name, steps=1, resume=resume))


def bfloat16_on_a_float32_model(dataset: str, seed: int) -> dict:
    prompt = training_prompt(dataset, steps=1, seed=seed)
    prompt["5"]["inputs"]["dtype"] = "bfloat16"  # the tiny MODEL computes in float32 on the CPU
    return prompt


def test_a_dtype_the_model_does_not_compute_in_is_refused_with_advice_a_widget_can_follow(comfy_server,
                                                                                         dataset_name):
    entry, events = comfy_server.run(bfloat16_on_a_float32_model(dataset_name, seed=131), timeout=120, check=False)
    message = exception_message(events)
    assert "this MODEL computes in float32" in message and "set dtype to auto (or float32)" in message
    assert "weight_dtype" not in message  # Load Diffusion Model offers fp8 only


def test_an_error_before_training_starts_shows_on_the_chart_as_a_failed_run(comfy_server, dataset_name):
    entry, events = comfy_server.run(bfloat16_on_a_float32_model(dataset_name, seed=141), timeout=120, check=False)
    sent = [d for kind, d in events if kind == "flux2_lora.progress"]
    assert [d["kind"] for d in sent] == ["failed"] and sent[0]["message"] == exception_message(events)
    assert _http_json(comfy_server, "/flux2_lora/history/6")["events"] == sent  # not an earlier run's


@pytest.mark.failure_case("two training prompts queued at once")
def test_two_training_prompts_queued_at_once_run_one_after_the_other(comfy_server, dataset_name):
    server = comfy_server
    before = set((server.output_dir / "flux2_lora").glob("flux2-*"))
    ids = [server.queue(training_prompt(dataset_name, steps=3, file_name=f"queued_{seed}", seed=seed))
           for seed in (21, 22)]  # queued back to back, before the first one starts
    entries = [server.wait(prompt_id, timeout=300) for prompt_id in ids]
    assert [e["status"]["status_str"] for e in entries] == ["success", "success"]
    runs = sorted(set((server.output_dir / "flux2_lora").glob("flux2-*")) - before, key=lambda p: p.stat().st_mtime)
    assert len(runs) == 2, "each prompt trains in its own run folder"
    import yaml

    assert [yaml.safe_load((r / "config.yaml").read_text())["seed"] for r in runs] == [21, 22]
    for run in runs:  # one whole run each: steps 1..3 in order, written by one run alone
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["kind"] == "step"]
        assert steps == [1, 2, 3]
    # The second waited for the first: it started after the first one's last write.
    assert (runs[1] / "config.yaml").stat().st_mtime >= (runs[0] / "metrics.jsonl").stat().st_mtime
    for seed in (21, 22):
        assert (server.models_dir / "loras" / f"queued_{seed}.safetensors").is_file()


EXAMPLES = Path(__file__).resolve().parents[1] / "example_workflows"


def as_tiny_run(prompt: dict, dataset: str) -> dict:
    """The example's prompt as a user would queue it, with tiny models and a few small steps.

    The diffusion model files exist under the template names; the stock text-encoder and
    VAE loaders cannot load tiny files, so the test loaders stand in for them.
    """
    kind = "dev" if any(n["class_type"] == "UNETLoader" and "dev" in n["inputs"]["unet_name"]
                        for n in prompt.values()) else "klein"
    for node in prompt.values():
        cls, inputs = node["class_type"], node["inputs"]
        if cls == "CLIPLoader":
            node.update(class_type="Flux2TestTinyCLIP", inputs={"type": kind})
        elif cls == "VAELoader":
            node.update(class_type="Flux2TestTinyVAE", inputs={})
        elif cls == "Flux2LoraDataset":
            inputs.update(folder=dataset, resolution=128, trigger_word="r0b0t")
        elif cls == "Flux2LoraConfig":
            inputs.update(steps=2, rank=4, advanced="preview_resolution: 64\npreview_steps: 2")
        elif cls in ("EmptyFlux2LatentImage", "Flux2Scheduler"):
            inputs.update(width=64, height=64, **({"steps": 2} if cls == "Flux2Scheduler" else {}))
    return prompt


@pytest.mark.parametrize("name", ["train_flux2_klein_lora", "train_flux2_dev_lora", "train_and_preview"])
def test_each_example_workflow_runs_as_loaded(comfy_server, dataset_name, name):
    from comfyui_harness import ui_to_api

    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    prompt = as_tiny_run(ui_to_api(workflow, comfy_server.object_info()), dataset_name)
    entry, events = comfy_server.run(prompt, timeout=300)
    saved = [o["text"][0] for o in entry["outputs"].values() if "text" in o and o["text"][0].startswith("saved ")]
    assert len(saved) == 1 and saved[0].endswith(".safetensors")
    estimate = [o["text"][0] for o in entry["outputs"].values() if "text" in o and "estimated peak" in o["text"][0]]
    if name != "train_and_preview":
        assert estimate and "frozen weights" in estimate[0]
        # The node shows the figure the training run's own preflight computed.
        preflight = [d["message"] for kind, d in events if kind == "flux2_lora.progress" and d["kind"] == "info"
                     and d["message"].startswith("estimated peak")]
        assert preflight and preflight[0].splitlines()[0] == estimate[0].splitlines()[0]
    else:
        assert output_images(comfy_server, entry), "the preview image was not written"


def test_the_example_workflows_are_listed_as_templates_of_the_pack(comfy_server):
    import urllib.request

    with urllib.request.urlopen(f"{comfy_server.url}/workflow_templates") as r:
        templates = json.load(r)
    assert sorted(templates["comfyui-flux2-lora-trainer"]) == sorted(p.stem for p in EXAMPLES.glob("*.json"))
    for name in templates["comfyui-flux2-lora-trainer"]:  # the template browser's picture of each
        with urllib.request.urlopen(f"{comfy_server.url}/api/workflow_templates/comfyui-flux2-lora-trainer/{name}.jpg") as r:
            assert r.headers["Content-Type"] == "image/jpeg" and r.read(3) == b"\xff\xd8\xff"


def test_requirements_txt_installs_the_runtime_dependencies_but_not_torch():
    """ComfyUI-Manager and the Comfy Registry install from requirements.txt alone; a torch line there
    could replace ComfyUI's own torch build."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    runtime = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    lines = [line.strip() for line in (root / "requirements.txt").read_text().splitlines()]
    assert sorted(line for line in lines if line and not line.startswith("#")) == sorted(
        d for d in runtime if not d.startswith("torch"))
    install = (root / "README.md").read_text().split("## Install into ComfyUI", 1)[1].split("\n## ", 1)[0]
    assert "requirements.txt" in install


def _http_json(server, path: str, body: dict | None = None) -> dict:
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"{server.url}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


@pytest.mark.failure_case("zero steps and other invalid values")
def test_errors_name_the_widgets_and_advanced_options_a_user_sets_not_cli_flags(comfy_server, dataset_name):
    bad = "adam_beta1: 1.5\nlr_warmup_steps: -2\n"
    # The node's own message: the server's log, which the failure carries too, has ComfyUI's flags in it.
    _, events = comfy_server.run(training_prompt(dataset_name, steps=1, seed=151, advanced=bad), timeout=120,
                                 check=False)
    message = exception_message(events)
    assert "adam_beta1" in message and "lr_warmup_steps" in message and "--" not in message, message
    assert "(adam_beta1, lr_warmup_steps: set in the advanced box of FLUX.2 LoRA Config)" in message, message
    config = dict(training_prompt(dataset_name)["5"]["inputs"], advanced=bad)
    body = {"unet_name": TINY_MODEL_FILES["klein"], "weight_dtype": "default", "config": config}
    error = _http_json(comfy_server, "/flux2_lora/estimate", body)["error"]  # the vRAM bar says the same
    assert "adam_beta1" in error and "--" not in error, error


def test_the_history_route_gives_a_reloaded_page_the_whole_run(comfy_server, dataset_name):
    prompt = training_prompt(dataset_name, steps=3, file_name="history", seed=11)
    entry, events = comfy_server.run(prompt, timeout=300)
    sent = [d for kind, d in events if kind == "flux2_lora.progress"]
    history = _http_json(comfy_server, "/flux2_lora/history/6")
    assert history["events"] == sent and len({e["run"] for e in sent}) == 1
    assert [e["seq"] for e in sent] == list(range(len(sent)))
    assert [e["step"] for e in sent if e["kind"] == "step"] == [1, 2, 3] and sent[-1]["kind"] == "finished"
    assert _http_json(comfy_server, "/flux2_lora/history/999") == {"node": "999", "events": []}


def test_the_estimate_route_answers_from_widget_values_before_the_graph_runs(comfy_server):
    config = training_prompt("robots")["5"]["inputs"]
    dataset = training_prompt("robots")["4"]["inputs"]
    body = {"unet_name": TINY_MODEL_FILES["dev"], "weight_dtype": "default", "config": config, "dataset": dataset}
    answer = _http_json(comfy_server, "/flux2_lora/estimate", body)
    assert answer["total"] == sum(answer["parts"].values()) and answer["verdict"] == "unknown"  # CPU: no card
    assert "[dev]-like" in answer["model"] and "estimated peak" in answer["text"]
    fp8 = _http_json(comfy_server, "/flux2_lora/estimate", dict(body, weight_dtype="fp8_e4m3fn"))
    # The tiny file is fp32; ComfyUI loads it in bf16 on a GPU, or casts it to fp8 when asked.
    assert fp8["parts"]["frozen weights"] * 2 == answer["parts"]["frozen weights"]
    bigger = _http_json(comfy_server, "/flux2_lora/estimate", dict(body, dataset=dict(dataset, resolution=1024)))
    assert bigger["parts"]["activations + grads"] > answer["parts"]["activations + grads"]
    assert "Load Diffusion Model" in _http_json(comfy_server, "/flux2_lora/estimate", dict(body, unet_name=None))["error"]


# --------------------------------------------------------------------------- the nodes' functions, no server
@pytest.fixture(scope="module")
def nodes(comfy):
    """The pack's `nodes` package, imported the way ComfyUI imports a custom-node folder."""
    import importlib
    import importlib.util
    import sys

    name = "flux2_lora_pack_under_test"  # the name test_comfy_backbone imports it under: one copy per process
    if name not in sys.modules:
        repo = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(name, repo / "__init__.py", submodule_search_locations=[str(repo)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    for sub in ("config_node", "dataset_node", "paths"):
        importlib.import_module(f"{name}.nodes.{sub}")
    return sys.modules[f"{name}.nodes"]


@pytest.mark.parametrize("line", ["on: 1", "yes: true", "1: 3"])
def test_an_advanced_option_name_yaml_reads_as_a_boolean_or_number_is_refused_saying_to_write_it_as_text(nodes, line):
    from flux2_train.errors import ConfigError

    with pytest.raises(ConfigError, match="write option names as text") as caught:
        nodes.config_node.parse_advanced(f"lora_dropout: 0.1\n{line}")
    assert "YAML reads unquoted on, off, yes and no as true and false" in str(caught.value)


@pytest.mark.parametrize("line, where", [
    ("seed: 1234", "seed is set by the seed widget of FLUX.2 LoRA Config"),
    ("dtype: float16", "dtype is set by the dtype widget of FLUX.2 LoRA Config"),
    ("rank: 32", "rank is set by the rank widget of FLUX.2 LoRA Config"),
    ("prepend_trigger: false", "prepend_trigger is set by the prepend_trigger widget of FLUX.2 LoRA Dataset"),
    ("max_upscale: 4", "max_upscale is set by the max_upscale widget of FLUX.2 LoRA Dataset"),
    ("dataset: /data", "dataset is set by the folder widget of FLUX.2 LoRA Dataset"),
    ("device: cpu", "device is set by ComfyUI"),
])
def test_an_option_a_widget_sets_is_refused_in_the_advanced_box_naming_that_widget(nodes, line, where):
    from flux2_train.errors import ConfigError

    handle = nodes.config_node.config_handle
    with pytest.raises(ConfigError, match="remove from advanced the options set elsewhere") as caught:
        handle("character", "fast", 16, 0.0, 0, 0.0, "preset", 0, 0, "auto", "preset", 0, 7,
               advanced=f"lora_dropout: 0.1\n{line}")
    assert where in str(caught.value)
    # A widget at 0 (or preset) leaves its option to the advanced box, as it always did.
    config = handle("character", "fast", 0, 0.0, 0, 0.0, "preset", 0, 0, "auto", "preset", 0, 7,
                    advanced="rank: 32\nlearning_rate: 5.0e-5\noptimizer: prodigy")
    assert config.overrides | dict(rank=32, learning_rate=5e-5, optimizer="prodigy") == config.overrides


def test_every_widget_of_the_config_and_dataset_nodes_is_refused_in_the_advanced_box(nodes):
    where = set(nodes.config_node.SET_ELSEWHERE.values())
    for node in (nodes.config_node.Flux2LoraConfig, nodes.dataset_node.Flux2LoraDataset):
        schema = node.define_schema()
        widgets = {i.id for i in schema.inputs} - {"advanced"}
        missing = sorted(w for w in widgets if f"the {w} widget of {schema.display_name}" not in where)
        assert not missing, f"{schema.display_name}: {missing} can be typed in advanced and then overwritten"


def test_the_dataset_node_scans_with_its_prepend_trigger_and_max_upscale(nodes, tmp_path, monkeypatch):
    from PIL import Image

    from flux2_train.errors import DatasetError

    monkeypatch.setenv(nodes.paths.ENV_ALLOWED, str(tmp_path))
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "small.png")  # a 4x upscale to its 128 bucket
    (tmp_path / "small.txt").write_text("a red square")
    widgets = dict(folder=str(tmp_path), caption_extension=".txt", trigger_word="zq", default_caption="", repeats=1,
                   resolution=128, buckets=True, flip=False)
    with pytest.raises(DatasetError, match=r"small.png is 32x32.*max 2\u00d7"):
        nodes.dataset_node.Flux2LoraDataset.execute(**widgets)  # the defaults of the new widgets
    out = nodes.dataset_node.Flux2LoraDataset.execute(**widgets, prepend_trigger=False, max_upscale=4.0)
    handle = out.result[0]
    assert [item.caption for item in handle.report.items] == ["a red square"]
    # The run's options (its config.yaml) say what the scan used.
    assert handle.options["prepend_trigger"] is False and handle.options["max_upscale"] == 4.0


def test_a_clip_model_folder_outside_the_allowed_folders_is_refused_like_a_dataset_folder(nodes, tmp_path,
                                                                                           monkeypatch):
    from flux2_train.errors import PathRefused

    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    (allowed / "clip").mkdir(parents=True)
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    (allowed / "linked").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv(nodes.paths.ENV_ALLOWED, str(allowed))
    parse = nodes.config_node.parse_advanced
    for path in (outside, allowed / "linked", allowed / ".." / "outside"):
        with pytest.raises(PathRefused, match=f"the CLIP model folder \\(clip_model\\) .* {OUTSIDE}"):
            parse(f"clip_model: {path}")
    assert parse(f"clip_model: {allowed / 'clip'}") == {"clip_model": str((allowed / "clip").resolve())}
    in_models = Path(nodes.paths.folder_paths.models_dir) / "clip" / "clip-vit-large-patch14"  # where models go
    assert parse(f"clip_model: {in_models}") == {"clip_model": str(in_models.resolve())}
