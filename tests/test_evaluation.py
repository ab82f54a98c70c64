"""Watching a run on the tiny FLUX.2 model: previews, the validation loss, CLIP score, tensorboard, the run history."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
import torch
from PIL import Image
from safetensors.torch import load_file

from flux2_train.cli import main
from flux2_train.config import resolve_config
from flux2_train.demo import DEMO_DATA
from flux2_train.events import EventBus, StatusEvent
from flux2_train.tiny import build_tiny_clip_folder
from tiny_run import tiny_config, tiny_trainer


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("watch") / "dataset"
    shutil.copytree(DEMO_DATA, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst


def make_cfg(dataset: Path, model: Path, out: Path, **kw):
    options = dict(save_every=0, validate_every=0, subject_preset="character") | kw
    return tiny_config(dataset, model, out, out.parent / "cache", **options)


def run(cfg, model: Path, seen=None):
    trainer = tiny_trainer(cfg, model, events=EventBus([seen.append] if seen is not None else []))
    return trainer, trainer.run()


def test_previews_come_at_their_steps_change_as_the_lora_trains_and_are_scored_and_logged(
        dataset, tiny_pipeline_dir, tmp_path):
    clip = build_tiny_clip_folder(tmp_path / "clip")
    seen = []
    cfg = make_cfg(dataset, tiny_pipeline_dir, tmp_path / "out", preview_every=3, preview_resolution=64,
                   preview_steps=4, learning_rate=2e-2, lora_dropout=0.0, clip_model=str(clip), tensorboard=True,
                   validate_every=3)
    _, result = run(cfg, tiny_pipeline_dir, seen)

    previews = [e for e in seen if isinstance(e, StatusEvent) and e.kind == "preview"]
    assert [e.step for e in previews] == [0, 3, 6]  # before training, every 3 steps, and the end
    folder = result.run_dir / "previews"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{s:06d}-{k}.png" for s in (0, 3, 6) for k in (0, 1)]
    prompts = [entry["prompt"] for entry in previews[0].data["images"]]
    assert prompts == ["a photo of r0b0t, portrait, soft window light", "r0b0t walking down a city street"]
    assert all(isinstance(entry["clip_score"], float) for e in previews for entry in e.data["images"])
    assert "CLIP score" in previews[-1].message and previews[-1].data["seconds"] > 0

    before = torch.tensor(list(Image.open(folder / "step-000000-0.png").getdata()), dtype=torch.float32)
    after = torch.tensor(list(Image.open(folder / "step-000006-0.png").getdata()), dtype=torch.float32)
    assert Image.open(folder / "step-000006-0.png").size == (64, 64)
    assert (before - after).abs().mean() > 1.0, "the preview did not change as the LoRA trained"
    assert len(result.preview_images) == 2 and result.previews[0].name == "step-000006-0.png"
    assert "previews" in result.summary

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = EventAccumulator(str(result.run_dir / "tensorboard")).Reload().Tags()
    assert {"preview/0", "preview/1"} <= set(logged["images"])
    assert {"loss/train", "loss/validation", "clip_score/0", "lr"} <= set(logged["scalars"])


def test_the_same_seeds_give_the_same_previews(dataset, tiny_pipeline_dir, tmp_path):
    options = dict(preview_every=6, preview_resolution=64, preview_steps=2, steps=2)
    _, a = run(make_cfg(dataset, tiny_pipeline_dir, tmp_path / "a", **options), tiny_pipeline_dir)
    _, b = run(make_cfg(dataset, tiny_pipeline_dir, tmp_path / "b", **options), tiny_pipeline_dir)
    assert all(torch.equal(x, y) for x, y in zip(a.preview_images, b.preview_images))


def test_the_validation_loss_leaves_training_as_it_was_and_is_reproducible(dataset, tiny_pipeline_dir, tmp_path):
    seen = []
    _, watched = run(make_cfg(dataset, tiny_pipeline_dir, tmp_path / "a", validate_every=2), tiny_pipeline_dir, seen)
    _, plain = run(make_cfg(dataset, tiny_pipeline_dir, tmp_path / "b", validate_every=0), tiny_pipeline_dir)
    _, again = run(make_cfg(dataset, tiny_pipeline_dir, tmp_path / "c", validate_every=2), tiny_pipeline_dir)

    # The optimizer, the data order and the noise never saw it: the same losses and LoRA.
    assert watched.losses == plain.losses
    a, b = load_file(str(watched.lora_path)), load_file(str(plain.lora_path))
    assert all(torch.equal(a[k], b[k]) for k in a)

    assert [s for s, _ in watched.validation] == [0, 2, 4, 6]
    assert watched.validation == again.validation  # fixed noise and noise levels
    assert len({v for _, v in watched.validation}) == 4
    best_step, best = watched.best_validation
    events = [e for e in seen if isinstance(e, StatusEvent) and e.kind == "validation"]
    assert events[-1].data["best_step"] == best_step and events[-1].data["best_loss"] == best
    assert f"best {best:.4f} at step {best_step}" in watched.summary
    assert plain.validation == [] and "\nvalidation " not in plain.summary


def test_a_held_out_split_is_left_out_of_training_and_scored(dataset, tiny_pipeline_dir, tmp_path):
    seen = []
    trainer, result = run(make_cfg(dataset, tiny_pipeline_dir, tmp_path / "out", validate_every=3,
                                   validation_split=0.34), tiny_pipeline_dir, seen)
    held = {p.sample for p in trainer.watcher.pairs}
    assert len(held) == 2
    training = [e.message for e in seen if isinstance(e, StatusEvent) and e.kind == "training"]
    assert "4 images" in training[0]
    assert [s for s, _ in result.validation] == [0, 3, 6]


def test_runs_lists_compares_and_saves_a_preset(dataset, tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "runs"
    run(make_cfg(dataset, tiny_pipeline_dir, out, name="first", validate_every=3), tiny_pipeline_dir)
    run(make_cfg(dataset, tiny_pipeline_dir, out, name="second", validate_every=3, learning_rate=3e-3, rank=8),
        tiny_pipeline_dir)
    capsys.readouterr()

    assert main(["runs", "--output-dir", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["run", "model", "preset"]
    assert [line.split()[0] for line in table[1:]] == ["first", "second"]
    assert all("finished" in line and "6/6" in line and "@" in line and "custom" in line for line in table[1:])

    assert main(["runs", "--output-dir", str(out), "compare", "first", "second"]) == 0
    text = capsys.readouterr().out
    assert "learning_rate" in text and "0.003" in text and "rank" in text and "dataset" not in text
    png = out / "compare-first-second.png"
    assert Image.open(png).size == (800, 450)

    assert main(["runs", "--output-dir", str(out), "save-preset", "second", str(tmp_path / "mine.yaml")]) == 0
    again = resolve_config(config_file=tmp_path / "mine.yaml", overrides={"dataset": str(dataset)})
    assert again.rank == 8 and again.learning_rate == 3e-3 and again.dataset == str(dataset)
    assert "dataset" not in yaml.safe_load((tmp_path / "mine.yaml").read_text())

    lines = [json.loads(x) for x in (out / "first" / "metrics.jsonl").read_text().splitlines()]
    assert all("time" in x for x in lines)


@pytest.mark.parametrize("size, steps", [(512, 20), (1024, 28), (1536, 4)])
def test_the_preview_schedule_is_the_flux2_pipelines_schedule(size, steps):
    import numpy as np
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    from flux2_train.evaluation import flux2_sigmas

    tokens = (size // 16) ** 2
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="exponential")
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(tokens, steps))
    assert torch.allclose(flux2_sigmas(steps, tokens).float(), scheduler.sigmas.float(), atol=1e-6)


def test_previews_guide_as_each_flux2_model_samples():
    from types import SimpleNamespace

    from flux2_train.evaluation import preview_plan

    cfg = resolve_config(overrides={"preview_every": 100})
    dev = SimpleNamespace(guidance_embeds=True, distilled=None)
    base = SimpleNamespace(guidance_embeds=False, distilled=False)
    distilled = SimpleNamespace(guidance_embeds=False, distilled=True)
    assert preview_plan(cfg, dev) == (20, 4.0, False)  # its guidance input, one pass a step
    assert preview_plan(cfg, base) == (20, 4.0, True)  # classifier-free guidance
    assert preview_plan(cfg, distilled)[0::2] == (4, False)  # few steps, no guidance
    assert preview_plan(resolve_config(overrides={"preview_steps": 8}), distilled)[0] == 8
