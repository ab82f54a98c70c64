"""The engine's messages in the node pack's words.

The engine names its options as the CLI spells them (`--learning-rate`, `--no-memory-check`); in
ComfyUI the same option is a widget (`learning_rate`) or a line of the config node's advanced
options (`memory_check: false`). Every error a node raises, and every failure the chart shows,
passes through `in_widget_words`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from contextlib import contextmanager

from flux2_train.config import TrainConfig
from flux2_train.errors import Flux2TrainError

# Engine options whose widget has another name.
_WIDGET_NAMES = {"dataset": "folder", "caption_ext": "caption_extension"}
_OPTIONS = {*TrainConfig.__dataclass_fields__, "resume"}
_FLAG = re.compile(r"(?<![\w-])--(no-)?([a-z][a-z0-9]*(?:-[a-z0-9]+)*)")
ADVANCED_WHERE = "set in the advanced box of FLUX.2 LoRA Config"


@functools.cache
def _not_advanced() -> frozenset[str]:
    """Options set on a widget, or by another node or ComfyUI itself: named, with no pointer to the
    advanced box. (Imported here: the config node imports this module.)"""
    from .config_node import SET_ELSEWHERE

    return frozenset(SET_ELSEWHERE)


def in_widget_words(message: str) -> str:
    """`message` with each engine option named as the node pack shows it; options that only the
    advanced box sets are listed at the end. Other `--` flags (ComfyUI's own) stay as they are."""
    advanced: list[str] = []

    def rename(match: re.Match) -> str:
        negated, option = match.group(1), match.group(2).replace("-", "_")
        if option not in _OPTIONS:
            return match.group(0)
        if option not in _not_advanced() and option not in advanced:
            advanced.append(option)
        name = _WIDGET_NAMES.get(option, option)
        return f"{name}: false" if negated else name

    text = _FLAG.sub(rename, message)
    if advanced:
        text += ("\n" if "\n" in text else " ") + f"({', '.join(advanced)}: {ADVANCED_WHERE})"
    return text


@contextmanager
def widget_words() -> Iterator[None]:
    """Re-raise the engine's errors in the node pack's words (the same exception, its type kept)."""
    try:
        yield
    except Flux2TrainError as e:
        e.args = (in_widget_words(str(e)), *e.args[1:])
        raise
