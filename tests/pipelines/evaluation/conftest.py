"""Fixtures the evaluation tests share."""

from __future__ import annotations

import pytest

from tests.support.trained_shapes import train_shapes_checkpoint


@pytest.fixture(scope="session")
def trained_shapes(synth_shards, tmp_path_factory) -> str:
    """A shapes model trained in-process for 150 steps on `synth_shards` (tests/support/trained_shapes.py), once per
    session: the stage-equivalence test of test_inference and the ONNX tests of test_onnx_export share it."""
    return train_shapes_checkpoint(synth_shards, tmp_path_factory.mktemp("trained"), steps=150)
