"""Several processes through accelerate (gloo on the CPU; NCCL where there are two GPUs): the same LoRA as
one process, one writer, resume anywhere."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flux2_train import checkpoint as ckpt
from flux2_train.cli import main

REPO = Path(__file__).resolve().parents[1]


def options(model: Path, dataset: Path, out: Path, cache: Path, **kw) -> list[str]:
    values = dict(model=model, dataset=dataset, output_dir=out, cache_dir=cache, name="run", trigger_word="r0b0t",
                  resolution=64, max_upscale=4.0, max_sequence_length=32, steps=4, rank=4, alpha=4.0,
                  learning_rate=1e-3, dtype="float32", device="cpu", save_every=2, seed=7, lora_dropout=0.1,
                  caption_dropout=0.2)
    values.update(kw)
    args = []
    for k, v in values.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            args.append(flag)
        elif v is not False:
            args += [flag, str(v)]
    return args + ["--flip", "--no-tensorboard"]


def child_env(*paths: Path) -> dict[str, str]:
    """This environment for a training process: the repo (and `paths`) importable, one thread each, and
    no launcher's WORLD_SIZE."""
    path = [str(REPO), *map(str, paths), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def launch(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux2_train", "train", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_training(args: list[str], new_session: bool = False) -> subprocess.Popen:
    """`python -m flux2_train train ARGS` in the background, as a user starts it in a terminal."""
    return subprocess.Popen([sys.executable, "-m", "flux2_train", "train", *args], cwd=REPO, env=child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def wait_until(done, seconds: float = 120) -> bool:
    deadline = time.time() + seconds
    while time.time() < deadline and not done():
        time.sleep(0.2)
    return done()


def step_losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def assert_same_lora(a: Path, b: Path) -> None:
    """Tensor for tensor. Weights equal to float32's last bits may round to bfloat16 (a LoRA file's
    dtype) one step apart, so such files agree to bfloat16's step (2^-7 relative, at most)."""
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        rtol = 2**-7 if sa[k].dtype == torch.bfloat16 else 1e-4
        torch.testing.assert_close(sa[k], sb[k], rtol=rtol, atol=1e-6, msg=k)


def assert_same_average(a: Path, b: Path) -> None:
    """The float32 moving averages that two checkpoints hold, whole (gathered from FSDP's shards)."""
    sa, sb = (ckpt.load_state(c / ckpt.STATE_FILE)["ema"]["shadow_params"] for c in (a, b))
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


# The runs compared with the reference save the moving average of the weights (`--ema-decay`): the
# same average from the same weights, whether the processes hold the whole adapter (DDP) or shards
# (FSDP). Every Linear has an adapter, the root's too: FSDP keeps the root's gathered weights after a
# forward pass without gradients (validation), where the average is swapped in and out.
REFERENCE_OPTIONS = dict(ema_decay=0.9, targets="all_linear")


@pytest.fixture(scope="module")
def one_process_batch_two(tiny_pipeline_dir, tmp_path_factory):
    """The reference: one process, batch 1 x accumulation 2, 4 steps."""
    root = tmp_path_factory.mktemp("reference")
    from flux2_train.demo import DEMO_DATA

    args = options(tiny_pipeline_dir, DEMO_DATA, root / "out", root / "cache", gradient_accumulation=2,
                   **REFERENCE_OPTIONS)
    assert main(["train", *args]) == 0
    return root / "out" / "run"


def test_two_processes_train_what_one_process_trains_with_their_batch_and_one_resumes_them(
        one_process_batch_two, tiny_pipeline_dir, demo_dataset, tmp_path, caplog):
    out = tmp_path / "out"
    # Accumulation 2, shared by the processes.
    keep = dict(gradient_accumulation=2, keep_effective_batch=True, **REFERENCE_OPTIONS)
    done = launch(options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache", **keep) + ["--num-gpus", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (DDP): effective batch 1 x 1 x 2 = 2" in done.stderr
    run = out / "run"
    assert_same_lora(run / "run.safetensors", one_process_batch_two / "run.safetensors")
    assert_same_average(run / "checkpoints" / "step-000004", one_process_batch_two / "checkpoints" / "step-000004")
    assert step_losses(run) == pytest.approx(step_losses(one_process_batch_two), rel=1e-5)

    # One writer: one run folder, one line per step, each checkpoint once, the summary printed once.
    assert [p.name for p in out.iterdir()] == ["run"]
    assert len(step_losses(run)) == 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert done.stdout.count("LoRA         ") == 1
    info = json.loads((run / "checkpoints" / "step-000004" / "checkpoint.json").read_text())
    assert info["processes"] == 2 and info["accumulation_per_process"] == 1

    # The second process's batches count: one process with batch 1 trains another LoRA.
    alone = tmp_path / "alone"
    assert main(["train", *options(tiny_pipeline_dir, demo_dataset, alone, tmp_path / "cache")]) == 0
    with pytest.raises(AssertionError):
        assert_same_lora(alone / "run" / "run.safetensors", run / "run.safetensors")

    # Their step-2 checkpoint resumes on one process, with the same effective batch: the same LoRA.
    caplog.set_level("INFO")
    assert main(["train", *options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache", **keep),
                 "--resume", str(run / "checkpoints" / "step-000002")]) == 0
    assert "written by 2 process(es); resuming on 1, with the same effective batch (2)" in caplog.text
    assert_same_lora(run / "run.safetensors", one_process_batch_two / "run.safetensors")
    assert step_losses(run)[-2:] == pytest.approx(step_losses(one_process_batch_two)[-2:], rel=1e-5)  # steps 3, 4


def test_fsdp_shards_train_the_same_lora_and_resume_on_one_process(one_process_batch_two, tiny_pipeline_dir,
                                                                   demo_dataset, tmp_path):
    out = tmp_path / "out"
    keep = dict(gradient_accumulation=2, keep_effective_batch=True, **REFERENCE_OPTIONS)
    # With the validation loss and previews, which need every process in each sharded forward pass.
    watch = dict(validate_every=1, preview_every=2, preview_resolution=64, preview_steps=2)
    done = launch(options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache", multi_gpu="fsdp",
                          **keep, **watch) + ["--num-gpus", "2"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (FSDP)" in done.stderr
    run = out / "run"
    assert sorted(p.name for p in (run / "previews").iterdir()) == [f"step-00000{s}-0.png" for s in (0, 2, 4)]
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["kind"] == "validation"] == [0, 1, 2, 3, 4]
    # The validation passes swap the average in and out: training goes on from the trained weights.
    assert step_losses(run) == pytest.approx(step_losses(one_process_batch_two), rel=1e-5)
    assert_same_lora(run / "run.safetensors", one_process_batch_two / "run.safetensors")
    assert_same_average(run / "checkpoints" / "step-000004", one_process_batch_two / "checkpoints" / "step-000004")
    info = json.loads((run / "checkpoints" / "step-000002" / "checkpoint.json").read_text())
    assert info["multi_gpu"] == "fsdp"
    # The checkpoint holds the whole adapter, optimizer state and average, gathered from the shards.
    state = ckpt.load_state(run / "checkpoints" / "step-000002" / ckpt.STATE_FILE)
    adapter = load_file(str(run / "checkpoints" / "step-000002" / "adapter.safetensors"))
    shapes = sorted(tuple(v.shape) for v in adapter.values())
    assert sorted(tuple(s["exp_avg"].shape) for s in state["optimizer"]["state"].values()) == shapes
    assert sorted(tuple(s.shape) for s in state["ema"]["shadow_params"]) == shapes

    # Its step-2 checkpoint resumes on one process.
    (run / "run.safetensors").unlink()
    shutil.rmtree(run / "checkpoints" / "step-000004")
    assert main(["train", *options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache", **keep),
                 "--resume", str(run / "checkpoints" / "step-000002")]) == 0
    assert_same_lora(run / "run.safetensors", one_process_batch_two / "run.safetensors")
    assert_same_average(run / "checkpoints" / "step-000004", one_process_batch_two / "checkpoints" / "step-000004")
    assert step_losses(run)[-2:] == pytest.approx(step_losses(one_process_batch_two)[-2:], rel=1e-5)


def test_a_one_process_checkpoint_resumes_on_two_fsdp_processes(one_process_batch_two, tiny_pipeline_dir,
                                                                demo_dataset, tmp_path):
    run = tmp_path / "out" / "run"
    shutil.copytree(one_process_batch_two, run)
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "run.safetensors").unlink()
    done = launch(options(tiny_pipeline_dir, demo_dataset, tmp_path / "out", tmp_path / "cache",
                          gradient_accumulation=2, keep_effective_batch=True, multi_gpu="fsdp", **REFERENCE_OPTIONS)
                  + ["--num-gpus", "2", "--resume", str(run)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_lora(run / "run.safetensors", one_process_batch_two / "run.safetensors")
    assert_same_average(run / "checkpoints" / "step-000004", one_process_batch_two / "checkpoints" / "step-000004")


@pytest.mark.gpu
def test_fsdp_on_two_gpus_trains_and_averages_what_one_gpu_trains(tiny_pipeline_dir, demo_dataset, tmp_path):
    """NCCL's collectives and CUDA's shards: the same losses, LoRA and moving average as one GPU with their batch."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    keep = dict(gradient_accumulation=2, keep_effective_batch=True, device="cuda", validate_every=1,
                **REFERENCE_OPTIONS)
    runs = {}
    for name, extra in (("one", []), ("fsdp", ["--num-gpus", "2", "--multi-gpu", "fsdp"])):
        done = launch(options(tiny_pipeline_dir, demo_dataset, tmp_path / name, tmp_path / "cache", **keep) + extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert ("2 processes (FSDP)" in done.stderr) == (name == "fsdp")
        runs[name] = tmp_path / name / "run"
    one, fsdp = runs["one"], runs["fsdp"]
    assert step_losses(fsdp) == pytest.approx(step_losses(one), rel=1e-4)
    assert_same_lora(fsdp / "run.safetensors", one / "run.safetensors")
    assert_same_average(fsdp / "checkpoints" / "step-000004", one / "checkpoints" / "step-000004")


@pytest.mark.parametrize("problem", ["accumulation", "empty dataset"])
def test_what_every_process_would_refuse_is_named_once_before_any_starts(problem, tiny_pipeline_dir, demo_dataset,
                                                                         tmp_path, capsys, caplog):
    out, dataset, extra = tmp_path / "out", demo_dataset, dict(gradient_accumulation=3, keep_effective_batch=True)
    if problem == "empty dataset":
        dataset, extra = tmp_path / "empty", {}
        dataset.mkdir()
    caplog.set_level("INFO")
    assert main(["train", *options(tiny_pipeline_dir, dataset, out, tmp_path / "cache", **extra),
                 "--num-gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error: ") == 1 and "launching" not in caplog.text and not out.exists()
    assert ("--keep-effective-batch divides --gradient-accumulation (3) among 2 processes" if problem == "accumulation"
            else "has 0 images") in err


@pytest.mark.failure_case("a process of a multi-GPU run dies")
def test_a_process_that_dies_ends_the_run_and_its_checkpoint_resumes(tiny_pipeline_dir, demo_dataset, tmp_path):
    out = tmp_path / "out"
    proc = start_training(["--num-gpus", "2", *options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache",
                                                       steps=100000, save_every=5)])
    checkpoints = out / "run" / "checkpoints"
    wait_until(lambda: checkpoints.exists() and any(checkpoints.glob("step-*")))
    assert any(checkpoints.glob("step-*")), "no checkpoint within 2 minutes"
    second = [pid for pid in _children(proc.pid) if _env_of(pid).get("RANK") == "1"]
    assert len(second) == 1
    os.kill(second[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Root Cause" in stderr and "rank      : 1" in stderr
    assert "the 2-process run ended with exit code" in stderr and "--resume RUN_FOLDER" in stderr

    last = sorted(checkpoints.glob("step-*"))[-1]
    step = int(last.name.split("-")[1])
    assert main(["train", *options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache", steps=step + 2),
                 "--resume", str(last)]) == 0
    assert len(step_losses(out / "run")) >= step + 2


@pytest.mark.failure_case("Ctrl-C or SIGTERM")
def test_ctrl_c_stops_every_process_at_a_checkpoint(tiny_pipeline_dir, demo_dataset, tmp_path):
    out = tmp_path / "out"
    # A session of its own: Ctrl-C in a terminal reaches the whole foreground group, as here.
    proc = start_training(["--num-gpus", "2", *options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache",
                                                       steps=100000, save_every=100000)], new_session=True)
    metrics = out / "run" / "metrics.jsonl"
    wait_until(lambda: metrics.exists() and '"kind": "step"' in metrics.read_text())
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "cancelled: the processes stopped after a step" in stderr and "[cancelled] stopped at step" in stdout
    saved = sorted((out / "run" / "checkpoints").glob("step-*"))
    assert len(saved) == 1
    assert json.loads((saved[0] / "checkpoint.json").read_text())["step"] == len(step_losses(out / "run"))


@pytest.mark.failure_case("NaN or infinite loss")
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_nan_on_one_process_stops_them_all_at_its_step_with_the_weights_before_it(device, one_process_batch_two,
                                                                                    tiny_pipeline_dir, demo_dataset,
                                                                                    tmp_path):
    """Each loss is read a step late here too: the processes agree on the device to skip the NaN step's
    update (DDP's averaged gradients hold the NaN on every process), and on the step they stop at."""
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    reference = one_process_batch_two  # one process with their batch: the same losses and weights
    if device == "cuda":  # the same two processes without the NaN, on the same GPUs
        reference = tmp_path / "clean"
        done = launch(options(tiny_pipeline_dir, demo_dataset, reference, tmp_path / "cache", device=device, steps=2,
                              **REFERENCE_OPTIONS) + ["--num-gpus", "2"])
        assert done.returncode == 0, done.stderr[-3000:]
        reference = reference / "run"
    out = tmp_path / "out"
    argv = options(tiny_pipeline_dir, demo_dataset, out, tmp_path / "cache", device=device, save_every=0,
                   **REFERENCE_OPTIONS)
    out.mkdir()
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
                           "--dynamo_backend", "no", str(REPO / "tests" / "fault_driver.py"), "nan_on_rank_1",
                           json.dumps(dict(argv=argv, out=str(out), at=3))],
                          cwd=REPO, env=child_env(REPO / "tests"), capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count("the loss became nan (on 1 of the 2 processes) at step 3") == 2, done.stderr[-3000:]
    assert step_losses(out / "run") == pytest.approx(step_losses(reference)[:2], rel=1e-5)
    # Both processes hold the weights of step 2.
    after_2 = reference / "checkpoints" / "step-000002" / "adapter.safetensors"
    for rank in (0, 1):
        assert_same_lora(out / f"rank-{rank}.safetensors", after_2)


def _children(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return found


def _env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(x.decode(errors="replace").split("=", 1) for x in raw if b"=" in x)


def test_num_gpus_asks_for_gpus_that_are_there(tiny_pipeline_dir, demo_dataset, tmp_path, capsys):
    if torch.cuda.device_count() >= 64:
        pytest.skip("a machine with 64 GPUs")
    code = main(["train", *options(tiny_pipeline_dir, demo_dataset, tmp_path / "out", tmp_path / "cache",
                                   device="cuda"), "--num-gpus", "64"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--num-gpus 64, but" in err and "GPU(s) are visible to PyTorch" in err
    assert main(["train", *options(tiny_pipeline_dir, demo_dataset, tmp_path / "out", tmp_path / "cache"),
                 "--num-gpus", "0"]) == 2
    assert "give 2 or more" in capsys.readouterr().err


def test_num_gpus_takes_the_device_from_the_config_and_save_config_starts_no_processes(tiny_pipeline_dir,
                                                                                      demo_dataset, tmp_path):
    from flux2_train.cli import build_parser, check_before_launch

    cpu = tmp_path / "cpu.yaml"
    cpu.write_text("device: cpu\n")
    given = options(tiny_pipeline_dir, demo_dataset, tmp_path / "out", tmp_path / "cache", device=False)
    # CPU processes need no GPU: the count is checked against the device the config names.
    check_before_launch(build_parser().parse_args(["train", *given, "--config", str(cpu), "--num-gpus", "2"]))
    saved = tmp_path / "saved.yaml"
    assert main(["train", "--rank", "8", "--num-gpus", "64", "--save-config", str(saved)]) == 0
    assert "rank: 8" in saved.read_text()


def test_auto_takes_ddp_where_the_model_fits_one_gpu_and_fsdp_where_it_does_not(capsys):
    from flux2_train.config import resolve_config
    from flux2_train.memory import CUDA_CONTEXT, GIB, Placement, choose_strategy, estimate_memory
    from flux2_train.model import family_spec

    spec = family_spec("dev")
    cfg = resolve_config(overrides=dict(resolution=1024, rank=16, gradient_checkpointing=True))
    strategy, placement, why = choose_strategy(spec, cfg, int(79.6 * GIB), 2)
    assert strategy == "ddp" and placement.shards == 1 and "the whole model fits each GPU" in why
    strategy, placement, why = choose_strategy(spec, cfg, int(44 * GIB), 2)
    assert strategy == "fsdp" and placement.shards == 2 and "sharded over 2" in why
    assert choose_strategy(spec, cfg, int(79.6 * GIB), 2, asked="fsdp")[0] == "fsdp"

    whole = estimate_memory(spec, cfg, Placement("engine")).parts["frozen weights"]
    sharded = estimate_memory(spec, cfg, placement)
    assert whole / 2 < sharded.parts["frozen weights"] < whole / 2 + 3 * GIB  # a shard, and the blocks in flight
    # Measured per GPU on two H200s: 39.23 GiB allocated (bench/README.md, call 3).
    assert sharded.total - CUDA_CONTEXT["native"] == pytest.approx(39.23 * GIB, rel=0.05)

    assert main(["estimate", "--model", "dev", "--resolution", "1024", "--rank", "16", "--gradient-checkpointing",
                 "--num-gpus", "2", "--gpu-memory", "44"]) == 0
    assert "multi-GPU auto: FSDP" in capsys.readouterr().out


def test_the_world_of_one_process_and_a_bad_launch_environment(monkeypatch):
    from flux2_train.distributed import World, launched_processes
    from flux2_train.errors import ConfigError

    world = World.join(torch.device("cpu"))
    assert (world.rank, world.size, world.is_main) == (0, 1, True)
    assert world.share("x") == "x" and world.sum([1.5, 2.0], torch.device("cpu")) == [1.5, 2.0]
    assert world.accumulation(3, keep_effective_batch=True) == 3
    assert World(rank=1, size=2).accumulation(4, keep_effective_batch=True) == 2
    with pytest.raises(ConfigError, match="does not divide evenly"):
        World(rank=0, size=2).accumulation(3, keep_effective_batch=True)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ConfigError, match="not a number of processes"):
        launched_processes()


def test_an_accelerate_config_that_asks_for_what_the_trainer_decides_is_named(monkeypatch):
    from flux2_train.distributed import check_launch_config, check_precision
    from flux2_train.errors import ConfigError

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="asks for DeepSpeed.*--multi-gpu ddp\\|fsdp\\|auto"):
        check_launch_config()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="accelerate's FSDP"):
        check_launch_config()
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_launch_config()

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    with pytest.raises(ConfigError, match="mixed_precision fp16, and --dtype trains with bf16; pass --dtype float16"):
        check_precision("bf16")
    check_precision("fp16")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")  # what --num-gpus passes: the trainer decides
    check_precision("bf16")


def test_a_host_that_trains_in_its_own_process_ignores_a_launcher_environment(tiny_pipeline_dir, demo_dataset,
                                                                             tmp_path, monkeypatch):
    """ComfyUI started under torchrun (WORLD_SIZE set) still trains alone: no process group to wait for."""
    from flux2_train.config import resolve_config
    from flux2_train.encoders import load_pipeline_encoders
    from flux2_train.model import load_transformer
    from flux2_train.train import Trainer

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = resolve_config(overrides=dict(dataset=str(demo_dataset), model=str(tiny_pipeline_dir), output_dir=str(tmp_path),
                                        name="run", trigger_word="r0b0t", resolution=64, max_upscale=4.0,
                                        max_sequence_length=32, steps=2, rank=4, dtype="float32", device="cpu",
                                        tensorboard=False))
    trainer = Trainer(cfg, load_transformer(tiny_pipeline_dir, dtype=torch.float32),
                      encoder=load_pipeline_encoders(tiny_pipeline_dir, device="cpu", dtype=torch.float32),
                      several_processes=False)
    result = trainer.run()
    assert trainer.world.size == 1 and not torch.distributed.is_initialized()
    assert result.lora_path.is_file() and len(result.losses) == 2
