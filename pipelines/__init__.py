"""The stages of mrcnn-pipeline around the `mrcnn` model: data in, training, evaluation, inspection, the DAG.

    infra/        storage (local paths and URIs), MLflow tracking, the Ray connection, logging, the run context
    data/         COCO splits, the synthetic dataset, shard rows, the shard format, the shard set, the loader,
                  `preprocess`, the input errors; COCO results from the model's detections and COCOeval
                  (coco_results, coco_metrics: under training, whose quick evaluation at each validation uses
                  them, and evaluation)
    training/     `train` (the Ray Train driver), the per-worker loop, optimisation, checkpoints, model sources
    models.py     a trained model from any model source: what it is and the model loaded (evaluation, predict,
                  inspect)
    pictures.py   drawing instances, figures and PNGs (evaluation, inspection)
    evaluation/   `evaluate` (batch inference + COCO metrics), the COCO-eval wrapper, `predict`
    inspection/   `inspect`: one picture per sub-net
    serving/      `serve`: the model behind an HTTP endpoint on Ray Serve (ingress, batched model deployment)
    dag.py        `run`: the stages as a cached DAG
    cli_options.py  what the commands of cli.py share: options, the run context, the error-to-message mapping

Imports go down this list, never up: `infra` imports nothing else of the project (bar the package roots, for
their paths), `data` only `infra`, `training` `data` and `infra`; `models` and `pictures` sit under their two
consumers, `evaluation` and `inspection` (which also runs the trainer's `StepRunner`); `dag` imports the stages.
`mrcnn/` imports nothing from here. tests/test_layout.py checks all of it.

Imports are at the top of each module, except Ray, MLflow and pycocotools (and matplotlib where a module
draws only in one function), which are imported inside the functions that use them where a module's other
functions run without them: the GPU machine has no Ray, MLflow or pycocotools, and `mrcnn-cli --help` should
not import them.
"""
