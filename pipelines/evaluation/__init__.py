"""Evaluation: the `evaluate` stage (batch inference in Ray Data, the way back to original pixels), the COCO
metrics wrapper (`coco_eval`, pycocotools) and `predict` on any image files. May import `mrcnn`,
`pipelines.data`, `pipelines.infra`, `pipelines.models` and `pipelines.pictures`."""
