"""The DAG's stage keys by hand (pipelines/dag.py `stage_keys`): pure, no Ray, no MLflow (test_dag.py runs the
executor on both)."""

import hashlib
import json
from pathlib import Path

from pipelines.dag import Stage, stage_keys


def test_stage_keys_are_the_documented_fingerprint_of_the_inputs_in_any_order():
    """A key names the stage's output directory (`name-key`): it depends on the inputs' values and the key before,
    not on the order of a dict, and stays the same from one release to the next so cached stages are found again."""
    def noop(out_dir, upstream, ctx):
        return {}

    first, second = stage_keys([Stage("prep", {"b": 2, "a": Path("/data/x")}, noop), Stage("fit", {"lr": 0.1}, noop)])
    blob = json.dumps({"a": "/data/x", "b": 2, "stage": "prep", "upstream": ""}, sort_keys=True)
    assert first.key == hashlib.sha256(blob.encode()).hexdigest()[:12]  # a Path written as its str
    blob = json.dumps({"lr": 0.1, "stage": "fit", "upstream": first.key}, sort_keys=True)
    assert second.key == hashlib.sha256(blob.encode()).hexdigest()[:12]
    reordered = stage_keys([Stage("prep", {"a": Path("/data/x"), "b": 2}, noop)])[0]
    assert reordered.key == first.key
