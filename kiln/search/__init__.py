"""Search: Optuna studies over kiln's spaces, single- or multi-objective.

    kiln search --config s.toml --out DIR [--storage URL] [--workers N] [--json PATH]

- config.py      the typed search config (`[space]` table checked by its kind's config)
- spaces/        define-by-run spaces: mixed-precision, compression, cnn, vit, train-hparams, python
- objectives.py  named objectives and directions; FLOPs, measured and roofline latency, bytes
- engine.py      the study loop: pruning, hopeless-trial stopping, failures recorded with their reason
- samplers.py    the sampler and pruner registries (TPE, NSGA-II, random, grid, QMC), seeded per slot
- resume.py      interrupted trials (kill, SIGTERM, Ctrl-C) run again, not counted twice
- pareto.py      dominance, the front, exact hypervolume
- storage.py     SQLite by default, PostgreSQL or a journal file to share a study
- workers.py     N worker processes on one storage
- run.py         the run directory (resume after a kill); report.py its report and best configs
- nas/           gradient and weight-sharing NAS algorithms (their own package)
"""
