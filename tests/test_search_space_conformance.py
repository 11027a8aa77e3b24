"""Every registered search space, one suite (in the manner of Optuna's reusable sampler tests):

- what it suggests lies inside its grid, and the grid is exactly the space (the grid sampler
  then walks what the space would suggest);
- the same parameters suggest the same candidate again (define-by-run is a function of the
  trial's parameters: a resumed or exported trial is the trial that ran);
- it exports a best trial as configs that kiln's own parsers accept, and a model file that loads.

A new space registers a small table in TABLES, or this suite fails for it.
"""
import textwrap

import optuna
import pytest
import torch

from kiln.config import from_dict, read_toml
from kiln.search.config import parse_search_config
from kiln.search.engine import make_space
from kiln.search.spaces import SPACES

torch.set_num_threads(1)
SPACES.load()

USER = textwrap.dedent('''
    def fn(trial):
        kind = trial.suggest_categorical("kind", ["a", "b"])
        depth = trial.suggest_int("depth", 1, 3) if kind == "a" else 0
        return {"accuracy": float(depth)}
''')
QUANT = {"source": "zoo:mlp", "samples": 64, "bits": [4, 8], "calib_batches": 1, "batch_size": 16}
CHAIN = ["prune.toml", "lowrank.toml", "quant.toml"]      # the order kiln allows: quantize last
CHAIN_COMMANDS = {"prune.toml": "prune", "lowrank.toml": "lowrank", "quant.toml": "quantize"}
TRAINED = {"steps": 2, "eval_every": 1, "samples": 32}
TABLES = {
    "python": {"grid": {"kind": ["a", "b"], "depth": [1, 2, 3]}},
    "mixed-precision": QUANT,
    "compression": QUANT | {"sparsity": [0.0, 0.5], "budgets": [1.0, 0.5]},
    "cnn": TRAINED | {"depth": [1, 2], "channels": [4, 8]},
    "vit": TRAINED | {"depth": [1], "dim": [8, 12], "heads": [1, 2, 4]},
    "train-hparams": TRAINED | {"channels": [4]},
}


@pytest.fixture(scope="module")
def user_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("user") / "user.py"
    path.write_text(USER)
    return path


def space_of(kind, user_file):
    table = dict(TABLES[kind])
    if kind == "python":
        table["objective"] = f"py:{user_file}:fn"
    cfg = parse_search_config({"objectives": ["accuracy"], "space": {"kind": kind, **table}})
    space, _ = make_space(cfg)
    space.ensure_setup()
    return space


def test_every_registered_space_is_in_the_suite():
    assert sorted(TABLES) == SPACES.names()


def _trials(space, n=6):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(n):
        trial = study.ask()
        candidate = space.suggest(trial)
        if space.kind == "python":     # the user's function suggests when it runs
            space.score(trial, lambda step, partial: None)
        yield trial, candidate
        study.tell(trial, 0.0)


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_suggestions_lie_in_the_grid_and_the_grid_is_the_space(kind, user_file):
    space = space_of(kind, user_file)
    grid = space.grid()
    for trial, _ in _trials(space):
        if grid is None:        # continuous or conditional: every value inside its distribution
            assert all(d._contains(d.to_internal_repr(trial.params[n])) for n, d in trial.distributions.items())
            continue
        assert set(trial.params) <= set(grid)
        for name, dist in trial.distributions.items():
            assert trial.params[name] in grid[name]
            values = dist.choices if hasattr(dist, "choices") else range(dist.low, dist.high + 1, dist.step)
            assert list(values) == list(grid[name])


@pytest.mark.parametrize("kind", sorted(set(TABLES) - {"python"}))   # python: the user's function is the candidate
def test_the_same_parameters_suggest_the_same_candidate(kind, user_file):
    space = space_of(kind, user_file)
    for trial, candidate in _trials(space):
        assert space.suggest(optuna.trial.FixedTrial(trial.params)) == candidate


def _parses(path):
    """The parser kiln itself uses for each kind of exported file."""
    if path.name == "quant.toml":
        from kiln.quant.config import parse_config

        return parse_config(read_toml(path), str(path))
    if path.name == "prune.toml":
        from kiln.prune.config import parse_config

        return parse_config(read_toml(path), str(path))
    if path.name == "lowrank.toml":
        from kiln.lowrank.config import parse_config

        return parse_config(read_toml(path), str(path))
    if path.name == "README.txt":     # the commands run the configs exported beside it, quantize last
        lines = [line.split() for line in path.read_text().splitlines() if line.strip().startswith("kiln ")]
        configs = [words[words.index("--config") + 1] for words in lines]
        assert configs == sorted((p.name for p in path.parent.glob("*.toml")), key=CHAIN.index)
        assert [words[1] for words in lines] == [CHAIN_COMMANDS[c] for c in configs]
        return lines
    if path.name == "train.toml":
        from kiln.models.spec import load
        from kiln.train.config import TrainConfig

        cfg = from_dict(TrainConfig, read_toml(path), str(path))
        model = load(cfg.model)
        assert model.model(*model.example_inputs).shape[-1] == 10
        return cfg
    if path.suffix == ".py":
        return path.read_text()       # loaded through train.toml's model spec
    raise AssertionError(f"no parser known for exported {path.name}")


@pytest.mark.parametrize("kind", sorted(set(TABLES) - {"python"}))
def test_a_trial_exports_configs_that_kiln_parses(kind, user_file, tmp_path):
    space = space_of(kind, user_file)
    for k, (trial, _) in enumerate(_trials(space, 2)):
        out = tmp_path / f"trial-{k}"
        out.mkdir()
        paths = space.export(trial.params, out)
        assert paths and all(_parses(p) for p in paths)
