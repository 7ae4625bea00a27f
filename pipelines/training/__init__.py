"""Training: the `train` stage (Ray Train driver), the per-worker `loop` (`LoopConfig`, `StepRunner`),
optimisation (`optim`), `checkpoints`, `pretrained` (`torchvision:FILE` weights, weights files) and
`model_source` (one parser and one loader for every way a model is named). May import `mrcnn`,
`pipelines.data` and `pipelines.infra`."""
