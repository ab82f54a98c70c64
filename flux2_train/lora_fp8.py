"""The adapter of an fp8 layer added into the layer's own matmul: a PEFT LoRA layer subclass.

Its own module so that importing `flux2_train.lora` does not import PEFT (see there).
"""

from __future__ import annotations

import torch
from peft.tuners.lora import Linear as LoraLinear
from torch import nn

from .lora import ADAPTER_NAME
from .quantize import Float8Linear


def add_adapters_into_fp8_matmuls(module: nn.Module) -> int:
    """Route each adapter on an fp8 layer through the layer's own matmul (`fp8_linear`'s `lora`):
    its up-projection adds into the fp8 product's output in place, where PEFT's forward would write
    the product and then the sum. Returns how many layers."""
    layers = [m for m in module.modules() if type(m) is LoraLinear and isinstance(m.base_layer, Float8Linear)]
    for layer in layers:
        # A class, not a per-layer forward: compiled blocks then share one graph per kind.
        layer.__class__ = Fp8AdapterLinear
    return len(layers)


class Fp8AdapterLinear(LoraLinear):
    """PEFT's LoRA layer over a `Float8Linear` whose adapter adds into the fp8 matmul's output.
    PEFT's forward still runs where it must: adapters disabled or merged, another adapter or a
    variant (DoRA) active, an adapter with a bias, input casts off."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (args or kwargs or self.disable_adapters or self.merged or list(self.active_adapters) != [ADAPTER_NAME]
                or ADAPTER_NAME in self.lora_variant or self.lora_B[ADAPTER_NAME].bias is not None
                or not self.cast_input_dtype_enabled):
            return super().forward(x, *args, **kwargs)
        down, up = self.lora_A[ADAPTER_NAME], self.lora_B[ADAPTER_NAME]
        h = down(self.lora_dropout[ADAPTER_NAME](x.to(down.weight.dtype)))  # as PEFT computes it
        return self.base_layer(x, lora=(h, up.weight, self.scaling[ADAPTER_NAME]))
