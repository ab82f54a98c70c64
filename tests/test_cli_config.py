"""The CLI, the demo, presets and config files, and the pack's import behaviour."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import yaml

from flux2_train.config import TrainConfig, resolve_config
from flux2_train.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "flux2_train", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_every_option_has_help_and_the_config_has_forty_plus():
    options = fields(TrainConfig)
    assert len(options) >= 40
    assert all(len(f.metadata["help"]) > 10 for f in options)


def test_presets_set_defaults_and_explicit_options_win(tmp_path):
    cfg = resolve_config("style", "quality")
    assert (cfg.rank, cfg.steps, cfg.learning_rate, cfg.flip, cfg.batch_size) == (32, 2000, 5e-5, True, 1)
    assert cfg.gradient_accumulation == 4 and cfg.subject_preset == "style" and cfg.quick_preset == "quality"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"rank": 8, "learning-rate": 2e-4, "steps": 300}))
    cfg = resolve_config("character", "fast", cfg_file, {"steps": 50})
    assert (cfg.rank, cfg.learning_rate, cfg.steps) == (8, 2e-4, 50)  # file beats presets, options beat the file


@pytest.mark.failure_case("zero steps and other invalid values")
def test_invalid_options_are_all_named_with_what_to_do():
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides={"rank": 0, "steps": 0, "resolution": 1000, "optimizer": "sgd"})
    msg = str(err.value)
    assert "--rank must be at least 1" in msg and "--steps must be at least 1" in msg
    assert "try 992" in msg and "choose one of adamw" in msg
    with pytest.raises(ConfigError, match="did you mean learning_rate"):
        resolve_config(overrides={"learning_rat": 1e-4})


def test_train_help_lists_every_option():
    out = run_cli("train", "--help").stdout
    for f in fields(TrainConfig):
        if f.name not in ("subject_preset", "quick_preset"):
            assert "--" + f.name.replace("_", "-") in out
    assert "default: None" not in out  # an option that is off unless given says no default


def test_save_config_then_train_from_it(tmp_path):
    path = tmp_path / "cfg.yaml"
    res = run_cli("train", "--preset", "character", "--quick", "fast", "--rank", "24", "--save-config", str(path))
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load(path.read_text())
    assert saved["rank"] == 24 and saved["steps"] == 800 and saved["subject_preset"] == "character"
    assert resolve_config(config_file=path).rank == 24


@pytest.mark.failure_case("bad input on the command line")
def test_bad_input_exits_with_a_message_and_no_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_cli("train", "--dataset", str(tmp_path / "empty"), "--model", str(tmp_path / "missing"))
    assert res.returncode == 2
    assert "error:" in res.stderr and "does not exist" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.failure_case("bad input on the command line")
def test_what_train_would_load_is_named_before_anything_loads(tiny_pipeline_dir, tmp_path):
    from flux2_train.demo import DEMO_DATA

    data = ["--dataset", str(DEMO_DATA), "--trigger-word", "r0b0t", "--device", "cpu"]
    size_name = run_cli("train", "--model", "klein-4b", *data)
    assert size_name.returncode == 2 and "names a FLUX.2 size, which estimate takes" in size_name.stderr
    # A transformer folder has no text encoder or VAE: --encoders must name a pipeline folder.
    transformer_only = run_cli("train", "--model", str(tiny_pipeline_dir / "transformer"), *data)
    assert transformer_only.returncode == 2
    assert "no model_index.json" in transformer_only.stderr and "--encoders" in transformer_only.stderr
    no_count = run_cli("estimate", "--model", "klein-4b", "--num-gpus", "0")
    assert no_count.returncode == 2 and "--num-gpus 0: give 1 or more" in no_count.stderr
    assert not any("Traceback" in r.stderr for r in (size_name, transformer_only, no_count))


def test_demo_trains_and_its_lora_loads_in_diffusers_with_the_same_output(tmp_path):
    from diffusers import Flux2KleinPipeline
    from safetensors.torch import load_file

    from flux2_train.lora import add_lora, load_lora_state_dict
    from flux2_train.model import load_transformer

    res = run_cli("demo", "--output-dir", str(tmp_path), timeout=300)  # about 10 s alone; generous for a busy machine
    assert res.returncode == 0, res.stderr[-3000:]
    assert "LoRA" in res.stdout and "loss curve" in res.stdout
    run = next(p for p in tmp_path.iterdir() if p.name.startswith("demo-"))
    lora = run / f"{run.name}.safetensors"
    assert lora.is_file() and (run / "loss.png").is_file() and (run / "summary.txt").is_file()
    ckpt = sorted((run / "checkpoints").iterdir())[-1]
    info = json.loads((ckpt / "checkpoint.json").read_text())

    model_dir = tmp_path / "tiny-flux2-klein"
    trained = load_transformer(model_dir, dtype=torch.float32)
    add_lora(trained.module, info["targets"], info["config"]["rank"], info["config"]["alpha"])
    load_lora_state_dict(trained.module, load_file(str(ckpt / "adapter.safetensors")))
    trained.module.eval()

    pipe = Flux2KleinPipeline.from_pretrained(model_dir, dtype=torch.float32)
    pipe.load_lora_weights(str(lora))
    from flux2_train.model import DiffusersFlux2Backbone

    loaded = DiffusersFlux2Backbone(pipe.transformer)
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(1, 128, 8, 8, generator=g), torch.randn(1, 16, 96, generator=g)
    with torch.no_grad():
        want = trained.predict(x, torch.tensor([0.6]), text)
        got = loaded.predict(x, torch.tensor([0.6]), text)
        base = load_transformer(model_dir, dtype=torch.float32).predict(x, torch.tensor([0.6]), text)
    assert (want - base).abs().max() > 1e-3, "the LoRA changed nothing"
    # The default file is stored in bfloat16, so compare at that precision.
    assert ((got - want).norm() / want.norm()) < 1e-2


def test_importing_the_pack_does_not_load_torch():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('flux2_pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['flux2_pack'] = mod; spec.loader.exec_module(mod)\n"
        "assert callable(mod.comfy_entrypoint) and mod.WEB_DIRECTORY == './web'\n"
        "import flux2_train\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


def test_numbers_out_of_range_and_text_encoder_layers_are_checked_with_the_options():
    with pytest.raises(ConfigError) as err:
        resolve_config(overrides={"adam_beta1": 1.5, "learning_rate": float("inf"), "weight_decay": float("nan"),
                                  "lr_num_cycles": 0, "timestep_shift": "inf", "ema_decay": 1.0})
    msg = str(err.value)
    assert "--ema-decay must be in [0, 1)" in msg
    assert "--adam-beta1 must be in [0, 1)" in msg and "--learning-rate must be a finite number" in msg
    assert "--weight-decay must be a finite number" in msg and "--lr-num-cycles must be at least 1" in msg
    assert "--timestep-shift must be a positive number" in msg
    # From the command line the layers come as text: numbers, or an error naming the option.
    assert resolve_config(overrides={"text_encoder_layers": ["9", "18", "27"]}).text_encoder_layers == [9, 18, 27]
    with pytest.raises(ConfigError, match="--text-encoder-layers takes whole numbers"):
        resolve_config(overrides={"text_encoder_layers": ["nine"]})


def test_text_encoder_layers_must_be_as_many_as_the_model_takes_and_exist(tiny_pipeline_dir):
    from flux2_train.encoders import load_pipeline_encoders

    with pytest.raises(ConfigError, match=r"give 3 hidden-layer numbers from 0 to \d+"):
        load_pipeline_encoders(tiny_pipeline_dir, text_layers=(1, 2, 100))
    with pytest.raises(ConfigError, match="give 3 hidden-layer numbers"):
        load_pipeline_encoders(tiny_pipeline_dir, text_layers=(1, 2))


def test_config_files_with_odd_keys_values_or_encodings_are_named(tmp_path):
    def refused(text, match, encoding="utf-8"):
        path = tmp_path / "cfg.yaml"
        path.write_bytes(text.encode(encoding))
        with pytest.raises(ConfigError, match=match):
            resolve_config(config_file=path)

    refused("on: 1\n", "True is not an option name")
    refused("steps: true\n", "--steps must be a int")
    refused("flip: maybe\n", "--flip must be a bool")
    refused("trigger_word: caf\u00e9\n", "not UTF-8 text", encoding="latin-1")
    with pytest.raises(ConfigError, match="is a folder"):
        resolve_config(config_file=tmp_path)
    path = tmp_path / "home.yaml"
    path.write_text("output_dir: ~/flux2-runs\nflip: off\n")
    cfg = resolve_config(config_file=path)
    assert cfg.output_dir == str(Path.home() / "flux2-runs") and cfg.flip is False


@pytest.mark.failure_case("bad input on the command line")
def test_where_a_run_would_go_is_checked_before_anything_loads(tiny_pipeline_dir, tmp_path, capsys):
    from flux2_train.cli import main
    from flux2_train.demo import DEMO_DATA

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    base = ["train", "--model", str(tiny_pipeline_dir), "--dataset", str(DEMO_DATA), "--trigger-word", "r0b0t"]
    cases = [(["--device", "gpu"], "--device gpu: this trainer runs on cpu, cuda or cuda:N"),
             (["--device", "cpu", "--name", "a/b"], "must be a plain name"),
             (["--device", "cpu", "--output-dir", str(a_file)], "is a file, not a folder"),
             (["--device", "cpu", "--cache-dir", str(a_file / "cache")], "is a file, not a folder"),
             (["--device", "cpu", "--preview-every", "5", "--clip-model", str(tmp_path)], "no CLIP model there")]
    for extra, message in cases:
        assert main([*base, *extra]) == 2
        out, err = capsys.readouterr()
        assert message in err and out == "", out  # nothing scanned or loaded first
    assert not (tmp_path / "runs").exists()
    assert main(["demo", "--device", "gpu", "--output-dir", str(tmp_path / "demo")]) == 2
    assert "--device gpu" in capsys.readouterr().err and not (tmp_path / "demo").exists()
    from flux2_train.config import check_run_name

    check_run_name("моя лора")  # letters of any script


def test_save_config_writes_what_auto_picks_for_the_dataset(tmp_path):
    from flux2_train.cli import main
    from flux2_train.config import suggest_schedule
    from flux2_train.demo import DEMO_DATA

    path = tmp_path / "auto.yaml"
    assert main(["train", "--quick", "auto", "--preset", "character", "--dataset", str(DEMO_DATA), "--resolution", "256",
                 "--trigger-word", "r0b0t", "--save-config", str(path)]) == 0
    saved, images = yaml.safe_load(path.read_text()), len(list(Path(DEMO_DATA).glob("*.png")))
    plan = suggest_schedule(images, "character", 2)
    assert (saved["steps"], saved["repeats"], saved["learning_rate"]) == (plan["steps"], plan["repeats"],
                                                                         plan["learning_rate"])
    assert main(["train", "--save-config", str(tmp_path)]) == 2


def test_train_prints_the_datasets_scan_with_its_warnings(tiny_pipeline_dir, demo_dataset, tmp_path, capsys):
    from flux2_train.cli import main

    (demo_dataset / "phone.heic").write_bytes(b"not read")
    (demo_dataset / "stray.txt").write_text("a caption without an image")
    assert main(["train", "--model", str(tiny_pipeline_dir), "--dataset", str(demo_dataset), "--trigger-word",
                 "r0b0t", "--device", "cpu", "--dtype", "float32", "--resolution", "64", "--steps", "1",
                 "--max-sequence-length", "32", "--validate-every", "0", "--no-tensorboard",
                 "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]) == 0
    out = capsys.readouterr().out
    assert "stray.txt" in out
    assert out.index("warnings (") < out.index("unsupported formats: .heic") < out.index("LoRA ")
