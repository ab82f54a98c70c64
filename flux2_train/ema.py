"""An exponential moving average of the LoRA weights (`--ema-decay`).

diffusers' `EMAModel` keeps the average: a float32 copy of each trainable tensor, updated after
each optimizer step with a decay that starts low and rises to `ema_decay` (n / (9 + n) at the n-th
update; the first copies the weights), so the first steps do not drag a stale start into the average. The run validates,
previews and saves the average; its checkpoints keep both (the weights to train on, and the
average in the training state), so a resumed run continues both.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import ResumeError


class AdapterAverage:
    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = params
        self.average = EMAModel(params, decay=decay, foreach=True)

    def step(self) -> None:
        """After an optimizer step that changed the weights."""
        self.average.step(self.params)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the adapter's weights for the block's duration (to evaluate or save it),
        the trained weights back afterwards."""
        self.average.store(self.params)
        self.average.copy_to(self.params)
        try:
            yield
        finally:
            self.average.restore(self.params)

    def state(self) -> dict:
        return self.average.state_dict()

    def load_state(self, state: dict, decay: float) -> None:
        """Continue the average of a checkpoint (with this run's decay, which may differ from the
        checkpoint's)."""
        shadow = state.get("shadow_params") or []
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(s.shape) for s in shadow] != shapes:
            raise ResumeError("the checkpoint's average of the LoRA weights (--ema-decay) does not fit this "
                              "adapter's shapes; resume with the rank and targets it was trained with")
        self.average.load_state_dict(state)
        self.average.shadow_params = [s.to(device=p.device, dtype=p.dtype) for s, p in zip(shadow, self.params)]
        self.average.decay = decay
