"""An exponential moving average of the LoRA weights (`--ema-decay`).

diffusers' `EMAModel` keeps the average: a float32 copy of each trainable tensor, updated after
each optimizer step with a decay that starts low and rises to `ema_decay` (n / (9 + n) at the n-th
update; the first copies the weights), so the first steps do not drag a stale start into the average. The run validates,
previews and saves the average; its checkpoints keep both (the weights to train on, and the
average in the training state), so a resumed run continues both. Where FSDP shards the weights,
each process averages its own part, and a checkpoint holds the whole average, gathered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import ResumeError
from .lora import local_part, part_of_whole, reshard, whole_of_part


class AdapterAverage:
    def __init__(self, params: list[torch.nn.Parameter], decay: float, module: torch.nn.Module | None = None):
        from diffusers.training_utils import EMAModel

        self.params = params  # FSDP's shards where the run shards the adapter
        self.module = module  # the model that holds them (FSDP's gathered copies are dropped around a swap)
        self.average = EMAModel(self._parts(), decay=decay, foreach=True)

    def _parts(self) -> list[torch.Tensor]:
        """This process's part of each weight (all of it unless FSDP shards it), in place. Taken with
        grad enabled: `EMAModel` copies, not averages, a tensor that does not require grad."""
        with torch.enable_grad():
            return [local_part(p) for p in self.params]

    def step(self) -> None:
        """After an optimizer step that changed the weights."""
        self.average.step(self._parts())

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The average in the adapter's weights for the block's duration (to evaluate or save it),
        the trained weights back afterwards."""
        parts = self._parts()
        self._reshard()
        self.average.store(parts)
        self.average.copy_to(parts)
        try:
            yield
        finally:
            self._reshard()
            self.average.restore(parts)

    def _reshard(self) -> None:
        if self.module is not None:
            reshard(self.module)

    def state(self) -> dict:
        """The average as whole tensors (gathered from FSDP's shards: every process calls it)."""
        whole = [whole_of_part(s, p) for s, p in zip(self.average.shadow_params, self.params)]
        return {**self.average.state_dict(), "shadow_params": whole}

    def load_state(self, state: dict, decay: float) -> None:
        """Continue the average of a checkpoint (with this run's decay, which may differ from the
        checkpoint's)."""
        shadow = state.get("shadow_params") or []
        shapes = [tuple(p.shape) for p in self.params]
        if [tuple(s.shape) for s in shadow] != shapes:
            raise ResumeError("the checkpoint's average of the LoRA weights (--ema-decay) does not fit this "
                              "adapter's shapes; resume with the rank and targets it was trained with")
        self.average.load_state_dict(state)
        self.average.shadow_params = [part_of_whole(s, p) for s, p in zip(shadow, self.params)]
        self.average.decay = decay
