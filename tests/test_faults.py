"""Faults during a run and files from elsewhere: each stops with a message, loses nothing, and resumes exactly.

A run that was cancelled, killed or ran out of disk resumes from its last checkpoint
with the loss sequence of a run that was never interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux2_train import checkpoint as ckpt
from flux2_train.demo import DEMO_DATA
from flux2_train.errors import ConfigError, ModelError, ResumeError, TrainingCancelled
from flux2_train.model import load_transformer
from flux2_train.train import Trainer
from tiny_run import TINY_OPTIONS, tiny_config, tiny_trainer

DRIVER = Path(__file__).with_name("fault_driver.py")
STEPS, SAVE_EVERY = TINY_OPTIONS["steps"], TINY_OPTIONS["save_every"]


class Interrupted(Exception):
    """Stands for ComfyUI's InterruptProcessingException, raised from inside a step."""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("faults") / "dataset"
    shutil.copytree(DEMO_DATA, dst, ignore=shutil.ignore_patterns("*.md"))
    return dst


@pytest.fixture(scope="module")
def uninterrupted(dataset, tiny_pipeline_dir, tmp_path_factory):
    """The reference: the same run, never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    return tiny_trainer(tiny_config(dataset, tiny_pipeline_dir, root, root / "cache"), tiny_pipeline_dir).run()


def resume(dataset, model, out: Path, cache: Path):
    return tiny_trainer(tiny_config(dataset, model, out, cache), model, resume=out / "run").run()


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in [*run_dir.glob(".*"), *(run_dir / ckpt.CHECKPOINTS).glob(".*")])


def assert_same_run(resumed, reference) -> None:
    assert resumed.losses == pytest.approx(reference.losses, rel=1e-6, abs=1e-9)
    a, b = load_file(str(resumed.lora_path)), load_file(str(reference.lora_path))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-7) for k in a)


# --------------------------------------------------------------------------- Cancel

@pytest.mark.failure_case("Cancel during caching")
def test_cancel_while_caching_keeps_what_was_cached_and_the_next_run_reuses_it(dataset, tiny_pipeline_dir,
                                                                               tmp_path, uninterrupted):
    cache = tmp_path / "cache"
    cached = lambda: len(list((cache / "latents").rglob("*.safetensors"))) if cache.exists() else 0  # noqa: E731
    with pytest.raises(TrainingCancelled, match="cancelled while caching") as stopped:
        tiny_trainer(tiny_config(dataset, tiny_pipeline_dir, tmp_path, cache), tiny_pipeline_dir,
                     should_stop=lambda: cached() >= 2).run()
    assert stopped.value.checkpoint is None and stopped.value.step == 0
    assert 2 <= cached() < 12, "the cache kept what was encoded before Cancel"
    assert ckpt.list_checkpoints(tmp_path / "run") == []

    again = tiny_trainer(tiny_config(dataset, tiny_pipeline_dir, tmp_path, cache), tiny_pipeline_dir).run()
    assert again.run_dir.name == "run-2" and cached() == 12  # a new run, which finishes the cache
    assert_same_run(again, uninterrupted)


@pytest.mark.failure_case("Cancel during a step")
def test_cancel_inside_a_step_drops_that_step_and_resume_redoes_it(dataset, tiny_pipeline_dir, tmp_path,
                                                                   uninterrupted):
    backbone = load_transformer(tiny_pipeline_dir, dtype=torch.float32)
    real_predict, calls = backbone.predict, {"n": 0}

    def predict(*args, **kwargs):  # Cancel caught by the host inside the forward pass of step 4
        calls["n"] += torch.is_grad_enabled()  # training steps only, not the validation loss
        if calls["n"] == 4:
            raise Interrupted()
        return real_predict(*args, **kwargs)

    backbone.predict = predict
    cfg = tiny_config(dataset, tiny_pipeline_dir, tmp_path, tmp_path / "cache", save_every=0)
    with pytest.raises(TrainingCancelled, match="stopped during step 4") as stopped:
        tiny_trainer(cfg, tiny_pipeline_dir, backbone, stop_exceptions=(Interrupted,)).run()
    assert stopped.value.step == 3
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000003"]
    assert_same_run(resume(dataset, tiny_pipeline_dir, tmp_path, tmp_path / "cache"), uninterrupted)


@pytest.mark.failure_case("Cancel during a checkpoint write")
def test_cancel_while_a_checkpoint_is_written_ends_the_run_on_that_checkpoint(dataset, tiny_pipeline_dir, tmp_path,
                                                                             uninterrupted, monkeypatch):
    pressed = {}
    real_save_state = ckpt.save_state

    def save_state(state, path):  # Cancel pressed halfway through the step-2 checkpoint
        pressed["yes"] = True
        real_save_state(state, path)

    monkeypatch.setattr(ckpt, "save_state", save_state)
    with pytest.raises(TrainingCancelled, match="stopped at step 2") as stopped:
        tiny_trainer(tiny_config(dataset, tiny_pipeline_dir, tmp_path, tmp_path / "cache"), tiny_pipeline_dir,
                     should_stop=lambda: pressed.get("yes", False)).run()
    assert stopped.value.checkpoint.endswith("step-000002")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-000002"]
    monkeypatch.undo()
    assert_same_run(resume(dataset, tiny_pipeline_dir, tmp_path, tmp_path / "cache"), uninterrupted)


# --------------------------------------------------------------------------- killed, disk full

def run_driver(mode: str, dataset, model, out: Path, cache: Path, at, prefix=()) -> subprocess.CompletedProcess:
    args = dict(dataset=str(dataset), model=str(model), out=str(out), cache=str(cache), steps=STEPS,
                save_every=SAVE_EVERY, at=at)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*prefix, sys.executable, str(DRIVER), mode, json.dumps(args)], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.failure_case("killed during a checkpoint write")
def test_a_kill_during_a_checkpoint_write_leaves_the_earlier_one_and_resume_reproduces_the_run(
        dataset, tiny_pipeline_dir, tmp_path, uninterrupted):
    cache = tmp_path / "cache"
    done = run_driver("kill", dataset, tiny_pipeline_dir, tmp_path, cache, at="step-000004")
    assert done.returncode == -9, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)] == ["step-000002"]
    assert leftovers(run_dir) and all(name.startswith(".step-000004") for name in leftovers(run_dir))
    ckpt.load_checkpoint(run_dir / ckpt.CHECKPOINTS / "step-000002")  # whole and loadable

    resumed = resume(dataset, tiny_pipeline_dir, tmp_path, cache)
    assert_same_run(resumed, uninterrupted)
    assert leftovers(run_dir) == []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


@pytest.mark.failure_case("killed during the final save")
def test_a_kill_during_the_final_save_is_finished_by_a_resume(dataset, tiny_pipeline_dir, tmp_path, uninterrupted):
    cache = tmp_path / "cache"
    done = run_driver("kill", dataset, tiny_pipeline_dir, tmp_path, cache, at=f"{os.sep}run.safetensors")
    assert done.returncode == -9, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert not (run_dir / "run.safetensors").exists(), "a half-written LoRA is in view"
    assert [p.name for p in ckpt.list_checkpoints(run_dir)][-1] == f"step-{STEPS:06d}"
    assert leftovers(run_dir) and all(name.startswith(".run.safetensors.") for name in leftovers(run_dir))

    finished = resume(dataset, tiny_pipeline_dir, tmp_path, cache)  # writes the final files, trains nothing
    assert_same_run(finished, uninterrupted)
    assert leftovers(run_dir) == [] and (run_dir / "summary.txt").is_file()


def _private_tmpfs(mount_point: Path, size: str) -> list[str]:
    """A command prefix that runs the rest in a user and mount namespace with a tmpfs on `mount_point`."""
    unshare = shutil.which("unshare")
    probe = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "true"], capture_output=True) \
        if unshare else None
    if not probe or probe.returncode:
        pytest.skip("needs `unshare --user --mount` (util-linux, user namespaces) to give the run a small disk")
    script = f'mount -t tmpfs -o size={size} tmpfs "{mount_point}" && exec "$@"'
    return [unshare, "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh"]


@pytest.mark.failure_case("disk full during a save")
def test_a_full_disk_during_a_checkpoint_is_named_and_resume_reproduces_the_run(dataset, tiny_pipeline_dir,
                                                                                tmp_path, uninterrupted):
    disk = tmp_path / "disk"
    disk.mkdir()
    done = run_driver("disk_full", dataset, tiny_pipeline_dir, disk, tmp_path / "cache", at=3,
                      prefix=_private_tmpfs(disk, "16m"))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "the disk is full" in report["error"] and "step-000004" in report["error"]
    assert "The last checkpoint" in report["error"] and "step-000002, is intact" in report["error"]
    assert report["checkpoints"] == report["intact"] == ["step-000002"]
    assert report["hidden"] == [], "a failed write left a temporary file"
    assert report["losses"] == pytest.approx(uninterrupted.losses, rel=1e-6, abs=1e-9)
    assert report["hidden_after_resume"] == []


@pytest.mark.failure_case("disk full during a save")
def test_a_disk_too_full_for_a_new_folder_is_named_too(tmp_path, monkeypatch):
    import errno
    import tempfile

    from flux2_train.errors import DiskFull

    def no_space(*args, **kwargs):  # what ext4 says when a new folder finds no free block
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "mkdtemp", no_space)
    with pytest.raises(DiskFull, match=r"the disk is full: .*step-000004 could not be written"):
        ckpt.save_checkpoint(tmp_path / "run", 4, adapter={}, write_lora=lambda p: None, state={}, info={}, keep=2)
    from flux2_train import fsutil
    from flux2_train.fsutil import atomic_write_text

    monkeypatch.setattr(fsutil, "_new_temp_file", no_space)

    with pytest.raises(DiskFull, match="summary.txt could not be written"):
        atomic_write_text(tmp_path / "run" / "summary.txt", "x")


@pytest.mark.failure_case("killed during a checkpoint write")
def test_a_checkpoint_rewrite_cut_short_between_its_renames_is_put_back(tmp_path):
    import os

    run = tmp_path / "run"
    save = dict(adapter={"a": torch.ones(2)}, write_lora=lambda p: save_file({"x": torch.ones(1)}, str(p)),
                state={"step": 2}, info={"step": 2}, keep=2)
    first = ckpt.save_checkpoint(run, 2, **save)
    aside = first.with_name(f".{first.name}.old-123")  # the old folder moved aside, the new one not yet in
    os.replace(first, aside)
    assert ckpt.list_checkpoints(run) == []
    ckpt.remove_leftovers(run)
    assert ckpt.list_checkpoints(run) == [first] and not aside.exists()
    ckpt.save_checkpoint(run, 2, **save)  # a rewrite of the same step, done whole
    assert ckpt.list_checkpoints(run) == [first] and not list((run / ckpt.CHECKPOINTS).glob(".*"))


# --------------------------------------------------------------------------- files from elsewhere

@pytest.fixture
def finished_run(dataset, tiny_pipeline_dir, tmp_path) -> Path:
    tiny_trainer(tiny_config(dataset, tiny_pipeline_dir, tmp_path, tmp_path / "cache", steps=2), tiny_pipeline_dir).run()
    return tmp_path / "run"


def resume_error(dataset, model, run: Path) -> str:
    with pytest.raises(ResumeError) as e:
        tiny_trainer(tiny_config(dataset, model, run.parent, run.parent / "cache", steps=4), model, resume=run).run()
    return str(e.value)


@pytest.mark.failure_case("checkpoint with a malformed safetensors header")
def test_a_checkpoint_with_a_malformed_header_is_refused_by_name(dataset, tiny_pipeline_dir, finished_run):
    adapter = finished_run / ckpt.CHECKPOINTS / "step-000002" / "adapter.safetensors"
    raw = bytearray(adapter.read_bytes())
    raw[:8] = (len(raw) * 4).to_bytes(8, "little")  # a header longer than the file
    adapter.write_bytes(bytes(raw))
    msg = resume_error(dataset, tiny_pipeline_dir, finished_run)
    assert "step-000002 is damaged" in msg and "resume from an earlier one" in msg


@pytest.mark.failure_case("checkpoint with unexpected keys")
def test_a_checkpoint_whose_keys_are_not_this_runs_is_refused(dataset, tiny_pipeline_dir, finished_run):
    adapter = finished_run / ckpt.CHECKPOINTS / "step-000002" / "adapter.safetensors"
    weights = load_file(str(adapter))
    weights["transformer_blocks.99.attn.to_q.lora_A.weight"] = torch.zeros(4, 8)
    save_file(weights, str(adapter))
    msg = resume_error(dataset, tiny_pipeline_dir, finished_run)
    assert "do not fit this run" in msg and "1 unexpected (e.g. transformer_blocks.99.attn.to_q.lora_A.weight)" in msg

    first = sorted(weights)[0]
    weights = {k: v for k, v in weights.items() if "blocks.99" not in k}
    weights[first] = torch.zeros(3, 3)
    save_file(weights, str(adapter))
    assert "1 of another shape" in resume_error(dataset, tiny_pipeline_dir, finished_run)


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled"))


@pytest.mark.failure_case("pickle file in a checkpoint", "pickle file passed as a model")
def test_pickle_files_are_refused_and_never_unpickled(dataset, tiny_pipeline_dir, finished_run, tmp_path):
    import pickle

    marker = tmp_path / "was-unpickled"
    step = finished_run / ckpt.CHECKPOINTS / "step-000002"
    (step / ckpt.STATE_FILE).unlink()
    (step / "state.pt").write_bytes(pickle.dumps({"step": _Payload(marker)}))
    msg = resume_error(dataset, tiny_pipeline_dir, finished_run)
    assert "as a pickle file" in msg and "it is never loaded" in msg

    for name in ("flux2-dev.ckpt", "flux2-dev.pt", "diffusion_pytorch_model.bin"):
        (tmp_path / name).write_bytes(pickle.dumps(_Payload(marker)))
        with pytest.raises(ModelError, match="safetensors only"):
            load_transformer(tmp_path / name)
    assert not marker.exists(), "a pickle was loaded"


@pytest.mark.failure_case("resume from a file instead of a run folder")
def test_resume_from_a_file_says_what_resume_takes(dataset, tiny_pipeline_dir, finished_run):
    msg = resume_error(dataset, tiny_pipeline_dir, finished_run / "run.safetensors")
    assert "this is a file; resume takes a run folder" in msg


# --------------------------------------------------------------------------- data and options

@pytest.mark.failure_case("caption longer than the text encoder's limit")
def test_a_caption_longer_than_the_token_limit_is_truncated_with_a_warning(dataset, tiny_pipeline_dir, tmp_path,
                                                                          caplog):
    data = tmp_path / "data"
    shutil.copytree(dataset, data)
    (data / "robot_01.txt").write_text("r0b0t " + "a very long description of the robot " * 40, encoding="utf-8")
    cfg = tiny_config(data, tiny_pipeline_dir, tmp_path, tmp_path / "cache", steps=1, max_sequence_length=16)
    with caplog.at_level(logging.WARNING):
        tiny_trainer(cfg, tiny_pipeline_dir).run()
    warned = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warned and "longer than 16 tokens" in warned[0] and "robot_01.png" in warned[0]


@pytest.mark.failure_case("invalid option combinations")
def test_options_this_machine_cannot_run_are_named_before_any_work(dataset, tiny_pipeline_dir, tmp_path):
    class NoModel:  # the checks come before the model is touched
        spec = load_transformer(tiny_pipeline_dir, dtype=torch.float32).spec

    cases = {
        "float16 needs a CUDA GPU": dict(dtype="float16"),
        "adamw8bit runs on CUDA GPUs only": dict(optimizer="adamw8bit"),
    }
    for message, options in cases.items():
        cfg = tiny_config(dataset, tiny_pipeline_dir, tmp_path, tmp_path / "cache", **options)
        with pytest.raises(ConfigError, match=message):
            Trainer(cfg, NoModel()).run()
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()
    with pytest.raises(ConfigError, match="Prodigy sets its own step size"):
        tiny_config(dataset, tiny_pipeline_dir, tmp_path, tmp_path / "cache", optimizer="prodigy", learning_rate=1e-4)


@pytest.mark.failure_case("Ctrl-C or SIGTERM")
def test_sigterm_to_a_command_line_run_stops_it_at_a_checkpoint_that_resumes(dataset, tiny_pipeline_dir, tmp_path):
    import signal

    from flux2_train.cli import main
    from test_distributed import options, start_training, wait_until

    out = tmp_path / "out"
    proc = start_training(options(tiny_pipeline_dir, dataset, out, tmp_path / "cache", steps=100000,
                                  save_every=100000))
    metrics = out / "run" / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and '"kind": "step"' in metrics.read_text())
    proc.send_signal(signal.SIGTERM)  # what a preempted job or `docker stop` sends
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "[cancelled] stopped at step" in stdout
    (saved,) = ckpt.list_checkpoints(out / "run")
    step = ckpt.checkpoint_info(saved)["step"]

    assert main(["train", *options(tiny_pipeline_dir, dataset, out, tmp_path / "cache", steps=step + 2),
                 "--resume", str(out / "run")]) == 0
    done = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if json.loads(x)["kind"] == "step"]
    assert done[-2:] == [step + 1, step + 2]
