"""A training run in its own process, so a test can kill it or fill its disk at an exact point.

    python tests/fault_driver.py kill '<json>'       dies by SIGKILL halfway through writing the
                                                     first file whose path contains `at`
    python tests/fault_driver.py disk_full '<json>'  fills the disk of `out` after step `at`, then
                                                     frees it and resumes; prints a JSON report
    accelerate launch ... tests/fault_driver.py nan_on_rank_1 '<json>'
                                                     the CLI's `train` with `argv`, where process 1's
                                                     output is NaN at its `at`-th training prediction; each
                                                     process that stops on the NaN writes its LoRA
                                                     weights to `out`/rank-<rank>.safetensors

The JSON gives model, dataset, out, cache, steps, save_every and at (nan_on_rank_1: argv, out and
at). Run `disk_full` inside a private tmpfs (see tests/test_faults.py): it fills the whole
filesystem of `out`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

from flux2_train import checkpoint as ckpt
from flux2_train import fsutil
from flux2_train.errors import DiskFull
from flux2_train.train import Trainer
from tiny_run import tiny_config, tiny_trainer


def trainer(args: dict, out: str, resume=None) -> Trainer:
    cfg = tiny_config(args["dataset"], args["model"], out, args["cache"], steps=args["steps"],
                      save_every=args["save_every"])
    return tiny_trainer(cfg, Path(args["model"]), resume=resume)


def die_halfway_through(args: dict) -> None:
    real = fsutil.atomic_write

    def atomic_write(path, write, overwrite=True):
        if args["at"] not in str(path):
            return real(path, write, overwrite)

        def half_then_die(tmp):
            write(tmp)
            with open(tmp, "r+b") as f:
                f.truncate(os.path.getsize(tmp) // 2)
            os.kill(os.getpid(), signal.SIGKILL)

        return real(path, half_then_die, overwrite)

    fsutil.atomic_write = atomic_write  # the module's other writers look it up at call time
    trainer(args, args["out"]).run()
    sys.exit(f"the run finished without writing a file whose path contains {args['at']!r}")


def fill_the_disk(args: dict) -> None:
    filler = Path(args["out"]) / "filler"
    run = trainer(args, args["out"])

    def fill(step, _trainer):
        if step == args["at"]:
            with open(filler, "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * (1 << 20))
                        f.flush()
                except OSError:
                    pass

    run.step_hooks.append(fill)
    report: dict = {}
    try:
        run.run()
        report["error"] = None
    except DiskFull as e:
        report["error"] = str(e)
    run_dir = Path(args["out"]) / "run"
    report["checkpoints"] = [p.name for p in ckpt.list_checkpoints(run_dir)]
    report["hidden"] = sorted(p.name for p in [*run_dir.glob(".*"), *(run_dir / "checkpoints").glob(".*")])
    report["intact"] = [p.name for p in ckpt.list_checkpoints(run_dir) if _loads(p)]
    filler.unlink()
    result = trainer(args, args["out"], resume=run_dir).run()
    report["losses"] = result.losses
    report["hidden_after_resume"] = sorted(p.name for p in [*run_dir.glob(".*"), *(run_dir / "checkpoints").glob(".*")])
    print(json.dumps(report))


def nan_on_rank_1(args: dict) -> None:
    from safetensors.torch import save_file

    from flux2_train import cli, model, train
    from flux2_train.errors import TrainingDiverged

    rank = os.environ["RANK"]
    if rank == "1":
        predict, calls = model.DiffusersFlux2Backbone.predict, []

        def poisoned(self, *a, **kw):
            calls.append(torch.is_grad_enabled())  # training's calls; validation's have no gradients
            out = predict(self, *a, **kw)
            return out * float("nan") if calls[-1] and sum(calls) == args["at"] else out

        model.DiffusersFlux2Backbone.predict = poisoned
    run = train.Trainer.run

    def run_keeping_the_weights(self):
        try:
            return run(self)
        except TrainingDiverged:
            weights = {k: v.detach().cpu().contiguous() for k, v in self.backbone.lora_state_dict().items()}
            save_file(weights, str(Path(args["out"]) / f"rank-{rank}.safetensors"))
            raise

    train.Trainer.run = run_keeping_the_weights
    sys.exit(cli.main(["train", *args["argv"]]))


def _loads(checkpoint: Path) -> bool:
    ckpt.load_checkpoint(checkpoint)
    return True


if __name__ == "__main__":
    mode, arguments = sys.argv[1], json.loads(sys.argv[2])
    {"kill": die_halfway_through, "disk_full": fill_the_disk, "nan_on_rank_1": nan_on_rank_1}[mode](arguments)
