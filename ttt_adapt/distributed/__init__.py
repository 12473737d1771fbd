"""Training over several processes: context parallelism (`context_parallel`: one sequence split across ranks)
and FSDP2 (`fsdp`: the weights sharded across ranks)."""
