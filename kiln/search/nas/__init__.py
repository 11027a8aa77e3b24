"""Neural architecture search: the DARTS cell space (space), DARTS (darts), SPOS one-shot
supernets (spos), and sampling strategies over a categorical encoding (random_search, evolution,
rl) driven by one loop (strategy); run holds the per-method pipelines behind `kiln nas`."""
