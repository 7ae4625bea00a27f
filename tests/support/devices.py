"""The devices a device test runs on: the CPU always, CUDA where present. The `cuda` cases carry the `gpu` marker
(skipped without a CUDA GPU, tests/conftest.py), the `cpu` ones none, so CI runs every check a CPU can make and a
change cannot break the GPU path's code unseen. Imports only torch and pytest (the GPU machine has no Ray, MLflow
or pycocotools).

    @pytest.mark.parametrize("device", DEVICES)
    def test_something(device): ...
"""

from __future__ import annotations

import pytest
import torch

DEVICES = [pytest.param(torch.device("cpu"), id="cpu"),
           pytest.param(torch.device("cuda"), id="cuda", marks=pytest.mark.gpu)]
