"""Tensor parallelism: one worker process per device, driven by the engine process.

- `parallel_state`: this process's rank / world size, process-group setup, the collectives the layers use.
- `sharding`: which slice of every parameter a rank holds (Megatron layout), the loader's shard hook, and
  turning a model built at rank-local sizes into a tensor-parallel one.
- `shard_runner`: a worker's model shard, KV cache and forward step (the ModelRunner of a rank).
- `worker`: the worker process main loop. `executor`: the engine-side driver (ModelRunner's interface).
- `messages`: the small per-step batch description the engine broadcasts, and rank 0's reply.

TP=1 uses none of this: the engine keeps its in-process ModelRunner.
"""
