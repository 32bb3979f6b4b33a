"""Beyond one process: torchrec DistributedModelParallel, launch, sharding plans."""
