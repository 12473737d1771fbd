"""The training run: its checks before any work (`preflight`), the loop (`loop`), its checkpoints, how it stops early
(`stopping`) and its progress lines (`progress`); what a step costs: memory (`memory_plan`), FLOPs (`flops`)."""
