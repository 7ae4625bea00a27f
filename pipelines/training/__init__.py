"""Training: the `train` stage (Ray Train driver), the per-worker `loop` (`LoopConfig`, `StepRunner`),
optimisation (`optim`), `checkpoints` and `pretrained` (`torchvision:FILE` weights). May import `mrcnn`,
`pipelines.data` and `pipelines.infra`."""
