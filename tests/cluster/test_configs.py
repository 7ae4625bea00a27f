"""Cluster configs: the launcher YAML passes Ray's own validation; the KubeRay manifests have the keys a
RayCluster / RayJob needs; the GPU workers cover `mrcnn-cli train --workers 16`."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
GPUS_PER_INSTANCE = {"g5.12xlarge": 4, "g5.48xlarge": 8, "p4d.24xlarge": 8, "p5.48xlarge": 8}


def _gpu_total_k8s(worker_groups) -> int:
    total = 0
    for group in worker_groups:
        containers = group["template"]["spec"]["containers"]
        per_pod = sum(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) for c in containers)
        total += per_pod * int(group["maxReplicas"])
    return total


def test_aws_launcher_config_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    validate_config(prepare_config(config))  # raises on any schema error
    types = config["available_node_types"]
    gpu_types = [t for t in types.values() if t["node_config"]["InstanceType"] in GPUS_PER_INSTANCE]
    gpus = sum(GPUS_PER_INSTANCE[t["node_config"]["InstanceType"]] * t["max_workers"] for t in gpu_types)
    assert gpus >= 16
    assert any(t["node_config"]["InstanceType"].startswith(("c5", "m5")) for n, t in types.items() if n != "head")
    assert any("pip install" in cmd and "mrcnn-pipeline" in cmd for cmd in config["setup_commands"])
    assert all("0.0.0.0" not in cmd for cmd in config["head_start_ray_commands"])  # dashboard on loopback


def test_launcher_validation_is_real():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["head"]["unexpected_key"] = 1
    with pytest.raises(Exception, match="unexpected_key"):
        validate_config(prepare_config(config))


def test_kuberay_raycluster_manifest():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert _gpu_total_k8s(spec["workerGroupSpecs"]) >= 16
    assert {g["groupName"] for g in spec["workerGroupSpecs"]} >= {"gpu-workers", "cpu-workers"}


def test_kuberay_rayjob_manifest():
    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert spec["entrypoint"].startswith("mrcnn-cli run") and "--workers 16" in spec["entrypoint"]
    assert _gpu_total_k8s(spec["rayClusterSpec"]["workerGroupSpecs"]) >= 16
    assert spec["shutdownAfterJobFinishes"] is True


def test_kuberay_rayservice_manifest_holds_a_serve_config_our_app_builder_takes():
    """The RayService's serveConfigV2 passes Serve's own schema, names our app builder, and its args are
    ServeOptions (GPU replicas, autoscaled to one per GPU worker); the GPU workers can hold the most replicas."""
    from ray.serve.schema import ServeDeploySchema

    from pipelines.serving.options import ServeOptions
    from pipelines.serving.server import IMPORT_PATH

    doc = yaml.safe_load((CLUSTER / "kuberay" / "rayservice.yaml").read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayService"
    serve_config = ServeDeploySchema.parse_obj(yaml.safe_load(doc["spec"]["serveConfigV2"]))
    (application,) = serve_config.applications
    assert application.import_path == IMPORT_PATH
    options = ServeOptions.from_args(application.args)
    assert options.use_gpu and options.autoscale is not None and options.model_path.endswith("@champion")
    cluster = doc["spec"]["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    assert _gpu_total_k8s(cluster["workerGroupSpecs"]) >= options.autoscale[1]
