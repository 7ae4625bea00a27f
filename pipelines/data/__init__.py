"""The data side: reading and checking a COCO split (`coco`, `categories`), the errors bad input raises
(`errors`, `InputError` and its kinds), the synthetic shapes dataset (`synth`), one record -> one shard row
(`rows`), the shard format (`shards`), a shard set opened once from its URI with its manifest (`shardset`), the
`preprocess` stage (Ray Data) and the loader that turns shards into training batches (`loader`).
May import `mrcnn` and `pipelines.infra`."""
