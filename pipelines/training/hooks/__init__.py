"""The hooks of `mrcnn-cli train`'s trainer (pipelines/training/trainer.py), one file each; the worker
(pipelines/training/loop.py) lists them in the order they run at each point:

    averaging.py      post-local SGD: the workers' weights averaged on schedule, before validation and checkpoints
    validation.py     the validation loss every `train.val_every` epochs and after the last step
    progress.py       rank 0's console progress and MLflow metrics
    checkpointing.py  a checkpoint reported to Ray Train every `train.checkpoint_every` steps and at each epoch end
    step_callback.py  `after_step(step, rank)` after each step: the tests' fault drills
"""
