"""The benchmarks of `scripts/benchmark.py` (its help says what each measures), one module each: `layer`,
`train_step`, `generate`, `serve`, `cp` (context parallelism), `gpu` (the prepared GPU check) and `fsdp`; `common`
holds what they share."""
