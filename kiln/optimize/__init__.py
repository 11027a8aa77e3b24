"""`kiln optimize`: one command from a model to a smaller, faster, verified deployable.

    kiln optimize SRC --target HW --max-drop D [--drop-type absolute|relative]
                  [--objective latency|size|energy] [--budget MINUTES] [--batch B] --out runs/NAME [--resume]

Composition of the capabilities, in four phases, each kept in the run directory as it ends:
1. analyse and baseline (baseline.json): the graph's FLOPs and roofline bound, the validation
   and test metric, the fastest fp32 backend's latency (kiln.compile.auto, kiln.timing);
2. per-layer sensitivity, once (sensitivity.json): each layer (Linear, Conv) alone at int4, half sparse or
   at half its parameters, every other layer float, the validation metric's change;
3. the search (study.db, kiln.search's engine, Optuna TPE, two objectives: the metric and the
   latency, size or energy), seeded by the fp32 baseline and the sensitivity path;
4. the result: the best trial meeting the constraint on validation, rebuilt by kiln prune,
   kiln lowrank and kiln quantize (model/), confirmed on test, compiled with --backend auto
   (compiled/), run under LoadGen (loadgen.json), and the report (report.html, .md, .json).

- config.py   OptimizeConfig (the command's options), the constraint
- space.py    the combined search space (per Linear/Conv: bits, sparsity, rank; precision, backend)
- phases.py   the four phases
- report.py   the report
- run.py      the run directory: state, resume, the whole command
"""
