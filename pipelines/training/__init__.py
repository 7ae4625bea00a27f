"""Training: the `train` stage (Ray Train driver) and its `plan` for the workers (`WorkerPlan`), the worker
entry point `loop`, the `trainer` and its `hooks`, one optimisation `step` (`StepRunner`), `local_sgd`,
optimisation (`optim`), `checkpoints`, `pretrained` (`torchvision:FILE` weights, weights files) and
`model_source` (one parser and one loader for every way a model is named). May import `mrcnn`,
`pipelines.data` and `pipelines.infra`."""
