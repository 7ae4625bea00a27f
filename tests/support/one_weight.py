"""A stand-in for the model in distributed step tests: one weight, loss terms known by hand."""

import torch
from torch import nn

from mrcnn.model import LOSS_KEYS


class OneWeight(nn.Module):
    """One weight w (1 at the start); the loss terms w * sum(x) * 1..5, so d total / dw = 15 * sum(x) and a NaN
    in x makes this rank's loss non-finite."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, batch):
        return {k: (self.w * batch["x"]).sum() * (i + 1) for i, k in enumerate(LOSS_KEYS)}
