"""The training run: the loop (`loop`), its checkpoints, how it stops early (`stopping`) and its progress lines
(`progress`)."""
