"""Training: the `train` stage (Ray Train driver), the per-worker `loop` (`LoopConfig`, `StepRunner`),
optimisation (`optim`) and `checkpoints`. May import `mrcnn`, `pipelines.data` and `pipelines.infra`."""
