"""`kiln compare`: every optimisation on every model, measured the same way, one report.

A composition of what kiln has, never a copy: the zoo and `kiln train` for a short training
of each base model, `kiln quantize` / `prune` / `lowrank` (their Python entry points) and the
compiler's default passes for the optimisations, `kiln eval` for the task metric, the graph
analysis (FLOPs, bytes, roofline as each artifact runs) on each hardware profile, and
`kiln compile --backend auto` for latency on this CPU. One cell is one (model, optimisation)
pair, saved atomically under OUT/cells/, so a stopped run resumes where it stopped.
"""
from kiln.compare.config import OPTIMIZATIONS, CompareConfig, Optimization, parse_config
from kiln.compare.run import compare_run

__all__ = ["OPTIMIZATIONS", "CompareConfig", "Optimization", "parse_config", "compare_run"]
