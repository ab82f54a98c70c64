"""User-facing errors: each message says what is wrong and what to do about it.

Everything the trainer raises for bad input or a failed run derives from
`Flux2TrainError`, so the CLI and the ComfyUI nodes can show the message as is
(no traceback) and let genuine bugs surface as ordinary exceptions.
"""

from __future__ import annotations


class Flux2TrainError(Exception):
    """A problem the user can fix; the message says how."""


class DatasetError(Flux2TrainError):
    """The image folder or its captions cannot be used."""


class ModelError(Flux2TrainError):
    """The model is not FLUX.2, or cannot be loaded."""


class ConfigError(Flux2TrainError):
    """A training option, or a combination of options, is invalid."""


class PathRefused(Flux2TrainError):
    """A path from the user points outside the folders the trainer may touch."""


class ResumeError(Flux2TrainError):
    """A checkpoint cannot continue this run."""


class TrainingDiverged(Flux2TrainError):
    """The loss became NaN or infinite."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class OutOfMemory(Flux2TrainError):
    """The accelerator ran out of memory."""


class DiskFull(Flux2TrainError):
    """A write ran out of disk space (or quota); the file it would have replaced is untouched."""


class ProcessLost(Flux2TrainError):
    """Another process of a multi-process run stopped; this one cannot go on without it."""


class TrainingCancelled(Flux2TrainError):
    """The run was stopped on request; a checkpoint was written first."""

    def __init__(self, message: str, step: int, checkpoint: str | None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
