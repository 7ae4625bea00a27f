"""Evaluation: the `evaluate` stage (a Ray Data pipeline of `inference`'s three stages: decode, the model, the way
back to original pixels), the COCO metrics wrapper (`coco_eval`, pycocotools) and `predict` on any image files.
May import `mrcnn`, `pipelines.data`, `pipelines.infra`, `pipelines.models` and `pipelines.pictures`."""
