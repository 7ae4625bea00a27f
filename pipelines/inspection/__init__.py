"""`mrcnn-cli inspect`: one picture per sub-net. `panels` (the shared layout), `samples` (the image shown),
`data_stages` (no model needed), `model_stages` (model and trainer stages), `command` (dispatch, MLflow).
May import `mrcnn`, `pipelines.data`, `pipelines.infra`, `pipelines.models`, `pipelines.pictures` and
`pipelines.training` (the trainer's own step, for the `batch` stage)."""
