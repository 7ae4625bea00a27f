"""The data side: reading and checking a COCO split (`coco`, `categories`, `errors`), the synthetic shapes
dataset (`synth`), one record -> one shard row (`rows`), the shard format and manifest (`shards`), the
`preprocess` stage (Ray Data) and the loader that turns shards into training batches (`loader`).
May import `mrcnn` and `pipelines.infra`."""
