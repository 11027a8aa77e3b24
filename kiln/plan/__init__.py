"""Planning parallel training before spending a cluster (`kiln plan`, `kiln cluster`).

workload.py  per-layer parameters, FLOPs, bytes and activations (kiln's analysis, or a
             transformer's closed form for models too large to build)
collectives.py  the alpha-beta model of ring/tree all-reduce, all-gather, reduce-scatter, p2p
cluster.py   cluster profiles (TOML, every figure sourced; clusters/*.toml built in)
calibrate.py gloo collectives measured under torchrun -> the `local` profile
memory.py    ZeRO model states and activations per device
plans.py     enumeration of DP/ZeRO/PP/TP plans, step-time prediction, ranking
prices.py    the on-demand price table (prices.toml), budgets
emit.py      the `kiln train` command and torchrun/SLURM launch scripts
run.py       `plan(PlanConfig)`, the verb; `predict_mode` for comparing with measured runs
"""
