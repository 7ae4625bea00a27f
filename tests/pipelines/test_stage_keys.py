"""The DAG's stage keys and the stages' inputs and requests by hand (pipelines/dag.py `stage_keys`,
`pipeline_stages`, `train_request`, `evaluate_request`): pure, no Ray, no MLflow (test_dag.py runs the executor)."""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from mrcnn.config import shapes
from pipelines.dag import (
    PipelineRequest,
    Stage,
    evaluate_headline,
    evaluate_request,
    evaluate_stage,
    pipeline_stages,
    preprocess_stage,
    stage_config_fields,
    stage_keys,
    train_headline,
    train_request,
    train_stage,
)
from pipelines.data.shards import SCHEMA_VERSION
from pipelines.evaluation.evaluate import EvaluateRequest
from pipelines.infra.context import RunContext
from pipelines.training.train import TrainRequest


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


def test_the_pipelines_stages_by_hand(tmp_path):
    """`pipeline_stages` builds three stages without running anything: their names, the stage functions with the
    arguments bound, headlines, and the inputs each key is made of, written out (a renamed input changes every key:
    each cached stage would rerun)."""
    data = tmp_path / "data"
    (data / "annotations").mkdir(parents=True)
    sha = {}
    for split, text in (("tr", '{"images": []}'), ("va", '{"images": [1]}')):
        (data / "annotations" / f"instances_{split}.json").write_text(text)
        (data / split).mkdir()
        sha[split] = hashlib.sha256(text.encode()).hexdigest()
    weights = tmp_path / "w.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    config = shapes()
    request = PipelineRequest(dataset=str(data), train_split="tr", val_split="va", eval_limit=5, cpus_per_worker=3.0,
                              placement_strategy="SPREAD", init=f"torchvision:{weights}")
    stages = pipeline_stages(config, request, RunContext(workers=4))

    assert [s.name for s in stages] == ["preprocess", "train", "evaluate"]
    init = f"torchvision:{weights}"
    splits = [("tr", str(data / "annotations/instances_tr.json"), str(data / "tr")),
              ("va", str(data / "annotations/instances_va.json"), str(data / "va"))]
    assert [(s.fn.func, s.fn.args, s.fn.keywords) for s in stages] == [
        (preprocess_stage, (config, str(data), splits, sha), {}), (train_stage, (config, request, init), {}),
        (evaluate_stage, (config, request), {})]
    assert [s.headline for s in stages] == [None, train_headline, evaluate_headline]
    fields = stage_config_fields(config)
    assert stages[0].key_inputs == {"dataset": str(data), "splits": ["tr", "va"], "annotations": sha,
                                    "shard_schema": SCHEMA_VERSION, **fields["preprocess"]}
    assert stages[1].key_inputs == {**fields["train"], "workers": 4, "init": init,
                                    "init_sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert stages[2].key_inputs == {**fields["evaluate"], "limit": 5}

    upstream = {"preprocess": {"shards": "/s"}, "train": {"checkpoint": "/c"}}
    assert asdict(train_request(request, upstream, init=init)) == {
        **asdict(TrainRequest(shards="/s")),
        "split": "tr", "val_split": "va", "run_name": "train", "cpus_per_worker": 3.0, "placement_strategy": "SPREAD",
        "model_path": init}
    got = evaluate_request(config, request, upstream, out="/o")
    assert asdict(got) == {**asdict(EvaluateRequest(shards="/s", model_path="/c")), "split": "va", "out": "/o",
                           "run_name": "evaluate", "limit": 5, "detection": asdict(config.detection),
                           "settings": asdict(config.evaluate)}
