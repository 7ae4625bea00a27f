"""Training: the `train` stage (Ray Train driver) and its `plan` for the workers (`WorkerPlan`), the worker
entry point `loop`, the `trainer` and its `hooks`, one optimisation `step` (`StepRunner`), `local_sgd`,
optimisation (`optim`), `checkpoints` and `pretrained` (`torchvision:FILE` weights). May import `mrcnn`,
`pipelines.data` and `pipelines.infra`."""
