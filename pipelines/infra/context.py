"""The run context: where a stage runs and where it reports, built once and passed to every stage.

The command line (one per command, from its shared options) or the DAG (one for the pipeline) builds a
`RunContext`; every stage takes it beside its own request: `preprocess(config, ..., ctx=ctx)`,
`train(config, request, ctx)`, `evaluate(request, ctx)`, `run_inspect(request, ctx)`,
`run_pipeline(config, request, ctx)`. A request holds what its stage is asked to do; the context what the
stages share: the Ray cluster, the MLflow store, experiment and parent run, GPU use, the workers and the
checkpoint storage. The DAG gives each stage its own context from the pipeline's by `dataclasses.replace`
(its parent run, the train stage's storage and tags). Starting Ray goes through `start_ray`, the one place
a stage connects to it.

Importable without Ray and MLflow: they are imported when a method that needs them is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from pipelines.infra import tracking


@dataclass(frozen=True)
class RunContext:
    """What every stage of one run shares. Fields marked `compared` change a stage's results or speed (the
    DAG logs them as the pipeline's params); the others only say where things run and go."""

    address: str | None = None  # the Ray cluster; None: RAY_ADDRESS, else a local Ray
    tracking_uri: str | None = None  # the MLflow store; None: MLFLOW_TRACKING_URI, else ./mlflow.db (`mlflow_uri`)
    experiment: str = tracking.DEFAULT_EXPERIMENT
    parent_run_id: str | None = None  # the MLflow run the stage's run nests under (the DAG's pipeline run)
    use_gpu: bool | None = field(default=None, metadata={"compared": True})  # None: GPUs when the cluster has them
    # train: data-parallel workers (one GPU each with GPUs); evaluate: inference actors (one model each)
    workers: int = field(default=1, metadata={"compared": True})
    storage: str | None = None  # checkpoints: a path or URI every node reads; None: ./checkpoints on one node
    tags: Mapping[str, str] = field(default_factory=dict)  # on the MLflow run the stage creates

    def start_ray(self) -> str:
        """Connect to `address` (or RAY_ADDRESS), else start a local Ray; a no-op when Ray is up. The one place
        the stages start Ray. Returns where Ray runs (`init_ray`)."""
        from pipelines.infra.ray_env import init_ray

        return init_ray(self.address)

    def gpus(self) -> bool:
        """Whether the stage's workers use GPUs: `use_gpu`, else whether the cluster has any (Ray started)."""
        if self.use_gpu is not None:
            return self.use_gpu
        from pipelines.infra.ray_env import cluster_has_gpus

        return cluster_has_gpus()

    def mlflow_uri(self) -> str:
        """The MLflow store, resolved (absolute) on the driver so that workers log to the same one."""
        return tracking.resolve_tracking_uri(self.tracking_uri)

    def create_run(self, run_name: str, tags: Mapping[str, str]) -> str:
        """A new MLflow run of the stage in `experiment`, under `parent_run_id`, with `tags` and the context's
        own; returns its id."""
        return tracking.create_run(self.mlflow_uri(), experiment=self.experiment, run_name=run_name,
                                   parent_run_id=self.parent_run_id, tags={**tags, **self.tags})

    def compared(self) -> dict[str, Any]:
        """The settings runs are compared by ({"use_gpu": ..., "workers": ...}), as MLflow params."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("compared")}
