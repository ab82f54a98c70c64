"""The training loop on the tiny FLUX.2 model: learning, exact resume, faults, checkpoints, caching."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_train import checkpoint as ckpt
from flux2_train.cache import FeatureCache
from flux2_train.config import resolve_config
from flux2_train.encoders import load_pipeline_encoders
from flux2_train.errors import ConfigError, DatasetError, ResumeError, TrainingCancelled, TrainingDiverged
from flux2_train.events import EventBus, StepEvent
from flux2_train.lora_files import read_metadata
from flux2_train.model import load_transformer
from flux2_train.train import Trainer, precision_plan


def make_cfg(dataset: Path, model: Path, out: Path, **kw):
    values = dict(
        dataset=str(dataset), model=str(model), output_dir=str(out), name="run", trigger_word="r0b0t",
        resolution=64, max_upscale=4.0, max_sequence_length=32, steps=6, rank=4, alpha=4.0, learning_rate=1e-3,
        dtype="float32", device="cpu", save_every=3, tensorboard=False, caption_dropout=0.2, flip=True,
        lora_dropout=0.1, seed=7,
    )
    values.update(kw)
    return resolve_config(overrides=values)


def train(cfg, model_dir: Path, resume=None, events=None, should_stop=None, hooks=()):
    backbone = load_transformer(model_dir, dtype=torch.float32)
    encoder = load_pipeline_encoders(model_dir, device="cpu", dtype=torch.float32)
    trainer = Trainer(cfg, backbone, encoder=encoder, resume=resume, events=events, should_stop=should_stop)
    trainer.step_hooks.extend(hooks)
    return trainer.run()


def fixed_noise_loss(backbone, model_dir: Path, dataset: Path, cache_dir: Path) -> float:
    """Flow loss of the backbone on fixed (noise, sigma) pairs over the cached training latents."""
    from flux2_train.cache import prepare_cache
    from flux2_train.data import scan_dataset
    from flux2_train.flow import flow_loss, noisy_latents, velocity_target

    encoder = load_pipeline_encoders(model_dir, device="cpu", dtype=torch.float32)
    report = scan_dataset(dataset, trigger_word="r0b0t", resolution=64, max_upscale=4.0)
    data = prepare_cache(report, encoder, FeatureCache(cache_dir), max_sequence_length=32, flip=False)
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.no_grad():
        for s in data.samples:
            x0 = data.cache.load("latents", s.latent_keys[0])[None]
            text = data.cache.load("text", s.text_key)[None]
            for sigma in (0.3, 0.5, 0.7):
                noise, sig = torch.randn(x0.shape, generator=g), torch.tensor([sigma])
                pred = backbone.predict(noisy_latents(x0, noise, sig), sig, text)
                losses.append(flow_loss(pred, velocity_target(x0, noise), sig).item())
    return sum(losses) / len(losses)


def test_training_lowers_the_loss_on_fixed_noise(demo_dataset, tiny_pipeline_dir, tmp_path):
    before = fixed_noise_loss(load_transformer(tiny_pipeline_dir, dtype=torch.float32), tiny_pipeline_dir,
                              demo_dataset, tmp_path / "cache")
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=60, learning_rate=3e-3, caption_dropout=0.0,
                   flip=False, lora_dropout=0.0, save_every=0)
    backbone = load_transformer(tiny_pipeline_dir, dtype=torch.float32)
    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cpu", dtype=torch.float32)
    result = Trainer(cfg, backbone, encoder=encoder).run()
    backbone.module.eval()
    after = fixed_noise_loss(backbone, tiny_pipeline_dir, demo_dataset, tmp_path / "cache")

    assert len(result.losses) == 60 and all(math.isfinite(x) for x in result.losses)
    assert after < 0.95 * before, (before, after)
    assert result.lora_path.is_file() and (result.run_dir / "loss.png").is_file()
    assert "steps        60" in (result.run_dir / "summary.txt").read_text()


def test_resume_continues_with_the_same_loss_sequence(demo_dataset, tiny_pipeline_dir, tmp_path):
    # With --ema-decay the saved LoRA is the average: equal only if the weights, the optimizer and
    # the average all continue exactly.
    options = dict(gradient_accumulation=2, ema_decay=0.9)
    full = train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / "a", **options), tiny_pipeline_dir)

    trained = {}  # Cancel pressed once the first step is reported
    bus = EventBus([lambda e: trained.update(yes=True) if isinstance(e, StepEvent) else None])
    with pytest.raises(TrainingCancelled) as stopped:
        train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / "b", **options),
              tiny_pipeline_dir, events=bus, should_stop=lambda: trained.get("yes", False))
    assert stopped.value.step == 2  # the first step's loss is read while the second runs
    run_dir = tmp_path / "b" / "run"
    resumed = train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / "b", **options),
                    tiny_pipeline_dir, resume=run_dir)

    assert resumed.losses == full.losses  # bit-identical on the CPU
    a, b = load_file(str(full.lora_path)), load_file(str(resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_seed_as_large_as_comfyuis_seed_widget_gives_trains(demo_dataset, tiny_pipeline_dir, tmp_path):
    result = train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=1, save_every=0, seed=2**64 - 1,
                            validation_split=0.2, preview_every=1, preview_resolution=64, preview_steps=1,
                            preview_prompts=["r0b0t", "r0b0t on a table"]), tiny_pipeline_dir)
    assert len(result.losses) == 1 and math.isfinite(result.losses[0])


def test_a_resume_from_an_earlier_checkpoint_trains_with_its_options_and_sets_the_later_ones_aside(
        demo_dataset, tiny_pipeline_dir, tmp_path):
    """The checkpoint's optimizer state brings back its moments, not the learning rate and Adam settings
    the resume is given. The run's later checkpoints hold another path of it: resuming the run folder
    afterwards continues the new one."""
    common = dict(save_every=3, lr_scheduler="linear")
    result = train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, **common), tiny_pipeline_dir)  # 3 and 6
    seen = []
    changed = dict(learning_rate=1e-5, adam_beta1=0.5, weight_decay=0.0)
    with pytest.raises(TrainingCancelled, match="checkpoint .*step-000005 holds the run"):
        train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, **common, **changed), tiny_pipeline_dir,
              resume=ckpt.checkpoint_dir(result.run_dir, 3), events=EventBus([seen.append]),
              should_stop=lambda: any(isinstance(e, StepEvent) for e in seen))
    # The linear schedule over 6 steps from the new rate: after step 4 it is at 1e-5 * (6 - 4) / 6.
    first = next(e for e in seen if isinstance(e, StepEvent))
    assert first.step == 4 and first.lr == pytest.approx(1e-5 * 2 / 6, rel=1e-6)
    (group,) = ckpt.load_state(ckpt.checkpoint_dir(result.run_dir, 5) / ckpt.STATE_FILE)["optimizer"]["param_groups"]
    assert group["betas"][0] == 0.5 and group["weight_decay"] == 0.0 and group["initial_lr"] == 1e-5
    assert ckpt.find_checkpoint(result.run_dir).name == "step-000005"
    assert (result.run_dir / "checkpoints" / "superseded-step-000006" / "checkpoint.json").is_file()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_saved_lora_is_the_moving_average_of_the_weights_with_ema_decay(demo_dataset, tiny_pipeline_dir,
                                                                             tmp_path, device):
    decay, weights = 0.5, []  # each step's trained weights, as its hook sees them
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, ema_decay=decay, validate_every=3, device=device)
    result = train(cfg, tiny_pipeline_dir, hooks=[lambda step, t: weights.append(t.backbone.lora_state_dict())])

    # diffusers' EMAModel: the first step's weights, then a decay of min(decay, n / (9 + n)) at step n.
    average = dict(weights[0])
    for n, w in enumerate(weights[1:], start=2):
        d = min(decay, n / (9 + n))
        average = {k: d * average[k] + (1 - d) * w[k] for k in w}
    last = ckpt.checkpoint_dir(result.run_dir, 6)
    trained = load_file(str(last / "adapter.safetensors"))  # what a resumed run trains on
    assert all(torch.equal(trained[k], weights[-1][k]) for k in trained)
    for k in average:
        torch.testing.assert_close(result.adapter[k], average[k], rtol=1e-5, atol=1e-7)
    assert any((trained[k] - average[k]).abs().max() > 1e-4 for k in average), "the average is the last weights"
    # The run's LoRA and the checkpoint's LoRA file hold the average, scale folded in as always.
    assert [k for k in load_file(str(result.lora_path))] and load_file(str(last / "lora.safetensors")).keys() == \
        load_file(str(result.lora_path)).keys()
    final, in_checkpoint = load_file(str(result.lora_path)), load_file(str(last / "lora.safetensors"))
    assert all(torch.equal(final[k], in_checkpoint[k]) for k in final)
    b_key = next(k for k in average if "lora_B" in k)
    assert torch.allclose(final[f"transformer.{b_key}"].float(), average[b_key] * cfg.alpha / cfg.rank, rtol=1e-2, atol=1e-4)
    assert "the average of its weights, decay 0.5" in result.summary


def test_checkpoints_are_complete_and_only_the_last_k_are_kept(demo_dataset, tiny_pipeline_dir, tmp_path):
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=8, save_every=2, keep_checkpoints=2)
    result = train(cfg, tiny_pipeline_dir)
    kept = ckpt.list_checkpoints(result.run_dir)
    assert [p.name for p in kept] == ["step-000006", "step-000008"]
    for p in kept:
        assert {f.name for f in p.iterdir()} == {"adapter.safetensors", "lora.safetensors", "state.safetensors",
                                                 "checkpoint.json"}
    info = json.loads((kept[-1] / "checkpoint.json").read_text())
    assert info["step"] == 8 and info["config"]["rank"] == 4
    assert not list((result.run_dir / "checkpoints").glob(".*")), "temporary folders left behind"


def test_pruning_keeps_the_checkpoint_nearest_the_best_validation_loss(tmp_path):
    for step in (2, 4, 6, 8):
        folder = ckpt.checkpoint_dir(tmp_path, step)
        folder.mkdir(parents=True)
        (folder / "checkpoint.json").write_text("{}")
    ckpt.prune_checkpoints(tmp_path, keep=2, best_step=3)  # 2 and 4 are as near: the later one stays
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000004", "step-000006", "step-000008"]
    ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-000006", "step-000008"]


@pytest.mark.failure_case("NaN or infinite loss")
def test_a_validation_loss_that_is_not_finite_stops_before_its_checkpoint(demo_dataset, tiny_pipeline_dir, tmp_path,
                                                                          monkeypatch):
    from flux2_train import evaluation

    real, calls = evaluation.validation_loss, []

    def nan_from_step_3(*args, **kwargs):  # steps 0, 1, 2 as they are; step 3's weights give NaN
        calls.append(1)
        return real(*args, **kwargs) if len(calls) <= 3 else float("nan")

    monkeypatch.setattr(evaluation, "validation_loss", nan_from_step_3)
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=6, save_every=1, validate_every=1)
    with pytest.raises(TrainingDiverged, match="the validation loss became nan at step 3") as err:
        train(cfg, tiny_pipeline_dir)
    assert re.search(r"the last good checkpoint is \S*step-000002: resume from it", str(err.value))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000001", "step-000002"]


@pytest.mark.failure_case("NaN or infinite loss")
@pytest.mark.parametrize("factor, loss", [(float("nan"), "nan"), (1e30, "inf")])  # 1e30 overflows the squared error
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(demo_dataset, tiny_pipeline_dir, tmp_path,
                                                                         factor, loss):
    def poison(step, trainer):
        if step == 3:  # from step 4 on, the model's output blows up
            predict = trainer.backbone.predict
            trainer.backbone.predict = lambda *args, **kwargs: predict(*args, **kwargs) * factor

    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=6, save_every=1)
    with pytest.raises(TrainingDiverged) as err:
        train(cfg, tiny_pipeline_dir, hooks=[poison])
    assert err.value.step == 4
    assert f"the loss became {loss} at step 4" in str(err.value)
    assert "--learning-rate" in str(err.value) and "float16" not in str(err.value)  # it trains in float32
    # Step 3's checkpoint holds the weights that gave the NaN: set aside, so the run resumes from step 2.
    assert re.search(r"the last good checkpoint is \S*step-000002: resume from it", str(err.value))
    assert "set aside as diverged-step-000003" in str(err.value)
    good = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in good] == ["step-000001", "step-000002"]
    assert (tmp_path / "run" / "checkpoints" / "diverged-step-000003" / "checkpoint.json").is_file()
    weights = load_file(str(good[-1] / "adapter.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())

    # The run's last good checkpoint continues it as if nothing had happened.
    resumed = train(cfg, tiny_pipeline_dir, resume=tmp_path / "run")
    assert resumed.losses == train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / "full", steps=6),
                                   tiny_pipeline_dir).losses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_nan_read_a_step_late_leaves_the_weights_of_the_step_before_it(device, demo_dataset, tiny_pipeline_dir,
                                                                         tmp_path):
    """Each loss is read while the next step runs; the fused AdamW skips its update on the device
    from the first loss that is not finite, so the weights are those of the step before it."""
    def trainer(name, backbone, events=None):
        cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / name, save_every=0, device=device)
        return Trainer(cfg, backbone, events=events,
                       encoder=load_pipeline_encoders(tiny_pipeline_dir, device=device, dtype=torch.float32))

    after_3 = {}
    clean = trainer("clean", load_transformer(tiny_pipeline_dir, dtype=torch.float32))
    clean.step_hooks.append(lambda step, t: after_3.update(t.backbone.lora_state_dict()) if step == 3 else None)
    clean.run()

    backbone = load_transformer(tiny_pipeline_dir, dtype=torch.float32)
    predict = backbone.predict

    def once_nan(*args, **kwargs):
        backbone.predict = predict
        return predict(*args, **kwargs) * float("nan")

    def poison(event):  # step 2 is reported while step 3 runs: step 4's output is NaN, step 5's finite again
        if isinstance(event, StepEvent) and event.step == 2:
            backbone.predict = once_nan

    seen = []
    poisoned = trainer("poisoned", backbone, EventBus([poison, seen.append]))
    with pytest.raises(TrainingDiverged, match="the loss became nan at step 4") as err:
        poisoned.run()
    # Found while step 5 ran (its update was skipped too); the failure is told at the last good step.
    assert err.value.step == 4 and [e.step for e in seen if getattr(e, "kind", None) == "failed"] == [3]
    weights = poisoned.backbone.lora_state_dict()
    assert weights.keys() == after_3.keys() and all(torch.equal(weights[k], after_3[k]) for k in weights)


def test_losses_are_read_late_only_where_the_optimizer_skips_updates_on_the_device():
    from accelerate import Accelerator

    from flux2_train.loss_reader import skips_updates_on_device

    params = [torch.nn.Parameter(torch.zeros(2))]
    fused = torch.optim.AdamW(params, fused=True)
    assert skips_updates_on_device(fused) and skips_updates_on_device(Accelerator(cpu=True).prepare(fused))
    assert not skips_updates_on_device(torch.optim.AdamW(params, foreach=True))
    assert not skips_updates_on_device(torch.optim.SGD(params))
    resumed = torch.optim.AdamW(params, fused=True)
    resumed.load_state_dict(torch.optim.AdamW(params, foreach=True).state_dict())  # saved by an unfused run
    assert not skips_updates_on_device(resumed)
    scaled = Accelerator(cpu=True).prepare(torch.optim.AdamW(params, fused=True))
    scaled.scaler = torch.amp.GradScaler("cpu")  # as under fp16: the scaler sets found_inf itself
    assert not skips_updates_on_device(scaled)


def test_steps_emit_events_with_progress_fields(demo_dataset, tiny_pipeline_dir, tmp_path):
    seen = []
    train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=4, lr_scheduler="linear"), tiny_pipeline_dir,
          events=EventBus([seen.append]))
    steps = [e for e in seen if isinstance(e, StepEvent)]
    assert [e.step for e in steps] == [1, 2, 3, 4]
    assert [e.lr for e in steps] == pytest.approx([7.5e-4, 5e-4, 2.5e-4, 0])  # after each step, read late or not
    assert all(e.total == 4 and e.seconds_per_step > 0 and e.peak_memory_bytes > 0 for e in steps)
    assert steps[-1].eta_seconds == 0 and steps[0].eta_seconds > 0
    kinds = [getattr(e, "kind", None) for e in seen]
    assert kinds.index("caching") < kinds.index("training") < kinds.index("finished")
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert sum(json.loads(x)["kind"] == "step" for x in lines) == 4


def test_cache_is_reused_and_a_changed_image_is_reencoded(demo_dataset, tiny_pipeline_dir, tmp_path):
    from flux2_train.cache import prepare_cache
    from flux2_train.data import scan_dataset

    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cpu", dtype=torch.float32)
    calls = {"images": 0, "text": 0}
    enc_images, enc_text = encoder.encode_images, encoder.encode_text
    encoder.encode_images = lambda x: (calls.__setitem__("images", calls["images"] + 1), enc_images(x))[1]
    encoder.encode_text = lambda c, n: (calls.__setitem__("text", calls["text"] + 1), enc_text(c, n))[1]
    cache = FeatureCache(tmp_path / "cache")
    report = scan_dataset(demo_dataset, trigger_word="r0b0t", resolution=64, max_upscale=4.0)

    first = prepare_cache(report, encoder, cache, max_sequence_length=32, flip=False)
    assert calls == {"images": 6, "text": 7}  # 6 captions + the empty one
    prepare_cache(report, encoder, cache, max_sequence_length=32, flip=False)
    assert calls == {"images": 6, "text": 7}

    from PIL import Image

    img = Image.open(demo_dataset / "robot_01.png").convert("RGB")
    img.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(demo_dataset / "robot_01.png")
    again = prepare_cache(scan_dataset(demo_dataset, trigger_word="r0b0t", resolution=64, max_upscale=4.0),
                          encoder, cache, max_sequence_length=32, flip=False)
    assert calls["images"] == 7
    assert again.samples[0].latent_keys != first.samples[0].latent_keys


@pytest.mark.failure_case("cache file corrupted on disk")
def test_a_damaged_cache_file_is_rebuilt_not_trusted(demo_dataset, tiny_pipeline_dir, tmp_path):
    from flux2_train.cache import prepare_cache
    from flux2_train.data import scan_dataset

    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cpu", dtype=torch.float32)
    cache = FeatureCache(tmp_path / "cache")
    report = scan_dataset(demo_dataset, trigger_word="r0b0t", resolution=64, max_upscale=4.0)
    data = prepare_cache(report, encoder, cache, max_sequence_length=32, flip=False)
    key = data.samples[0].latent_keys[0]
    good = cache.get("latents", key)
    path = cache._path("latents", key)
    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\x00\x00\x80\x7f" * 2  # flip the last values to inf: the header still parses
    path.write_bytes(bytes(raw))
    assert cache.get("latents", key) is None and not path.exists()
    prepare_cache(report, encoder, cache, max_sequence_length=32, flip=False)
    assert torch.equal(cache.get("latents", key), good)


@pytest.mark.failure_case("image changed between caching and training")
def test_an_image_changed_after_caching_stops_training_with_its_name(demo_dataset, tiny_pipeline_dir, tmp_path):
    def change(step, trainer):
        if step == 1:
            (demo_dataset / "robot_02.png").write_bytes((demo_dataset / "robot_03.png").read_bytes())

    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=8, batch_size=1)
    with pytest.raises(DatasetError, match="robot_02.png changed"):
        train(cfg, tiny_pipeline_dir, hooks=[change])


@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_micro_batch_is_prepared_once_ahead_and_its_error_waits_for_its_step(
        demo_dataset, tiny_pipeline_dir, tmp_path, monkeypatch, accumulation):
    """The next micro-batch is read, noised and copied while the backward pass runs; preparing it
    may fail (an image changed on disk), and the error surfaces where it would without the prefetch."""
    prepared, ran, steps = [], [], []
    prepare, run = Trainer._micro_batch, Trainer._micro_step

    def micro_batch(self, micro_step, *args):
        prepared.append((micro_step, len(ran)))  # and how many micro-batches had run then
        if micro_step == 5:
            raise DatasetError("robot_02.png changed since it was cached")
        return prepare(self, micro_step, *args)

    def micro_step(self, inputs, accelerator):
        ran.append(inputs.index)
        return run(self, inputs, accelerator)

    monkeypatch.setattr(Trainer, "_micro_batch", micro_batch)
    monkeypatch.setattr(Trainer, "_micro_step", micro_step)
    bus = EventBus([lambda e: steps.append(e.step) if isinstance(e, StepEvent) else None])
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / "run", save_every=0, gradient_accumulation=accumulation)
    with pytest.raises(DatasetError, match="changed since it was cached"):
        train(cfg, tiny_pipeline_dir, events=bus)
    # Each micro-step once, in order, the next one while the one before it ran.
    assert prepared == [(m, m) for m in range(6)] and ran == list(range(5))
    # The steps before the one that needs micro-step 5 are reported (their losses read late), none after.
    assert steps == list(range(1, 5 // accumulation + 1))


@pytest.mark.failure_case("resume with another model or LoRA shape")
def test_resume_refuses_another_model_or_adapter_shape(demo_dataset, tiny_pipeline_dir, tiny_dev_pipeline_dir,
                                                       tmp_path):
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=2, save_every=1)
    train(cfg, tiny_pipeline_dir)
    run_dir = tmp_path / "run"
    with pytest.raises(ResumeError, match="nothing is left to train"):
        train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=1), tiny_pipeline_dir, resume=run_dir)
    lora = (run_dir / "run.safetensors").read_bytes()
    with pytest.raises(ResumeError, match="already finished at step 2 and its LoRA is written"):
        train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=2), tiny_pipeline_dir, resume=run_dir)
    assert (run_dir / "run.safetensors").read_bytes() == lora
    with pytest.raises(ResumeError, match="rank was 4, now 8"):
        train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=4, rank=8), tiny_pipeline_dir,
              resume=run_dir)
    with pytest.raises(ResumeError, match="resume with the model the run started with"):
        train(make_cfg(demo_dataset, tiny_dev_pipeline_dir, tmp_path, steps=4), tiny_dev_pipeline_dir,
              resume=run_dir)
    with pytest.raises(ResumeError, match="no such run folder"):
        train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=4), tiny_pipeline_dir,
              resume=tmp_path / "nope")
    # Continued to more steps, the run writes its new LoRA and keeps the earlier one, named by its steps.
    train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=3), tiny_pipeline_dir, resume=run_dir)
    assert (run_dir / "run.step-000002.safetensors").read_bytes() == lora
    assert read_metadata(run_dir / "run.safetensors")["flux2_train.steps"] == "3"


def test_dev_style_model_trains_with_its_guidance_input(demo_dataset, tiny_dev_pipeline_dir, tmp_path):
    cfg = make_cfg(demo_dataset, tiny_dev_pipeline_dir, tmp_path, steps=2, guidance_scale=3.5)
    result = train(cfg, tiny_dev_pipeline_dir)
    assert result.spec.guidance_embeds and all(math.isfinite(x) for x in result.losses)


def test_bfloat16_trains_with_float32_lora_weights(demo_dataset, tiny_pipeline_dir, tmp_path):
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=2, dtype="bfloat16")
    backbone = load_transformer(tiny_pipeline_dir, dtype=torch.bfloat16)
    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cpu", dtype=torch.float32)
    Trainer(cfg, backbone, encoder=encoder).run()
    dtypes = {n: p.dtype for n, p in backbone.module.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)


def test_dtype_sets_weights_and_autocast_together_and_says_so():
    weight, mp, text = precision_plan("bfloat16", torch.device("cpu"))
    assert (weight, mp) == (torch.bfloat16, "bf16") and "autocast bfloat16" in text
    weight, mp, text = precision_plan("float32", torch.device("cpu"))
    assert (weight, mp) == (torch.float32, "no") and "no mixed precision" in text
    with pytest.raises(ConfigError, match="float16 needs a CUDA GPU"):
        precision_plan("float16", torch.device("cpu"))
    if torch.cuda.is_available():
        weight, mp, text = precision_plan("float16", torch.device("cuda"))
        assert (weight, mp) == (torch.float16, "fp16")


@pytest.mark.failure_case("rank larger than a target")
def test_rank_larger_than_a_target_is_refused(demo_dataset, tiny_pipeline_dir, tmp_path):
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, rank=200, alpha=200.0)
    with pytest.raises(ConfigError, match=r"--rank 200 is larger than layer .*use --rank 128"):
        train(cfg, tiny_pipeline_dir)
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]  # no run folder, nothing cached


def test_optimizers_other_than_adamw_train(demo_dataset, tiny_pipeline_dir, tmp_path):
    pytest.importorskip("prodigyopt")
    for name, lr in (("adafactor", 1e-3), ("prodigy", 1.0)):
        cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / name, steps=2, optimizer=name, learning_rate=lr)
        assert all(math.isfinite(x) for x in train(cfg, tiny_pipeline_dir).losses)
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / "8bit", steps=2, optimizer="adamw8bit")
    with pytest.raises(ConfigError, match="adamw8bit runs on CUDA GPUs only"):
        train(cfg, tiny_pipeline_dir)


def test_lora_file_metadata_describes_the_run(demo_dataset, tiny_pipeline_dir, tmp_path):
    result = train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=2, extra_formats=["comfyui"]),
                   tiny_pipeline_dir)
    meta = read_metadata(result.lora_path)
    assert meta["flux2_train.trigger_word"] == "r0b0t" and meta["flux2_train.image_count"] == "6"
    assert meta["flux2_train.steps"] == "2" and json.loads(meta["flux2_train.config"])["rank"] == 4
    assert result.extra_lora_paths[0].name == "run.comfyui.safetensors"
    assert all(k.startswith("diffusion_model.") for k in load_file(str(result.extra_lora_paths[0])))


@pytest.mark.failure_case("out of memory mid-run")
def test_out_of_memory_becomes_a_clear_error_and_keeps_the_checkpoint(demo_dataset, tiny_pipeline_dir, tmp_path):
    from flux2_train.errors import OutOfMemory

    backbone = load_transformer(tiny_pipeline_dir, dtype=torch.float32)
    real_predict, calls = backbone.predict, {"n": 0}

    def predict_that_runs_out_of_memory(*args, **kwargs):  # CUDA's failure, raised where a GPU would raise it
        calls["n"] += torch.is_grad_enabled()  # training steps only, not the validation loss
        if calls["n"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_predict(*args, **kwargs)

    backbone.predict = predict_that_runs_out_of_memory
    cfg = make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path, steps=4, save_every=1)
    encoder = load_pipeline_encoders(tiny_pipeline_dir, device="cpu", dtype=torch.float32)
    with pytest.raises(OutOfMemory) as err:
        Trainer(cfg, backbone, encoder=encoder).run()
    msg = str(err.value)
    assert "out of GPU memory" in msg and "--gradient-checkpointing" in msg and "checkpoint is intact" in msg
    assert "--offload-blocks N" in msg  # one process on the engine's model: whole blocks can stay in CPU memory
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000001", "step-000002"]

    resumed = train(cfg, tiny_pipeline_dir, resume=tmp_path / "run")
    full = train(make_cfg(demo_dataset, tiny_pipeline_dir, tmp_path / "full", steps=4, save_every=1),
                 tiny_pipeline_dir)
    assert resumed.losses == full.losses
