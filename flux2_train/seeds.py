"""Random streams derived from the run's seed, which may be as large as ComfyUI's seed widget (2^64 - 1)."""

import torch


def generator(value: int) -> torch.Generator:
    """A CPU generator seeded with `value`, folded into the range torch takes (a signed 64-bit seed)."""
    return torch.Generator().manual_seed(value % (2**63 - 1))
