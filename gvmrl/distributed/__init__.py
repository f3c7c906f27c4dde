"""Multi-process training on torch.distributed, launched by torchrun.

One job per module:

- `context`: the run's process context from torchrun's environment: process group (gloo on CPU,
  NCCL on CUDA) with a timeout, device mesh, rank-0-only output;
- `dealing`: pure numpy: per-sample seeds from global (prompt, sample) indices, prompts and
  samples dealt to ranks by expected tokens;
- `reduction`: global statistics from per-rank pieces: whole tables from per-rank rows, global
  token weights, equal micro-batch counts;
- `sharding`: FSDP2 over decoder layers and the root, the policy's log-prob forward under FSDP,
  gathering full weights;
- `checkpoint`: sharded model + optimizer checkpoints with torch.distributed.checkpoint, the
  final plain Hugging Face checkpoint.

A plain `gvmrl train` (no torchrun environment) is world size 1 without a process group, and
nothing here changes what it computes.
"""
