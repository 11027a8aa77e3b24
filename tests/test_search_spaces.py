"""Search spaces: mixed precision against kiln.quant's own path, architectures against
hand-counted sizes and torch.utils.flop_counter, exported configs that load back."""
import copy
import dataclasses

import optuna
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from kiln.errors import KilnError
from kiln.search.config import parse_search_config
from kiln.search.engine import make_space
from kiln.search.run import run_search
from kiln.search.spaces.arch import build_candidate
from kiln.search.spaces.quant import frozen_weights, layer_groups

torch.set_num_threads(1)


def mp_space(**space):
    bits = {} if "formats" in space else {"bits": [4, 8]}
    cfg = parse_search_config({"objectives": ["accuracy", "avg_bits"], "space": {
        "kind": "mixed-precision", "source": "zoo:mlp", "samples": 64, **bits, "calib_batches": 1,
        "batch_size": 16, **space}})
    space, _ = make_space(cfg)
    space.ensure_setup()
    return space


@pytest.fixture(scope="module")
def mlp_space():
    return mp_space()


def test_layer_groups():
    names = ["enc.layer.0.q", "enc.layer.0.k", "enc.layer.1.q", "head"]
    assert layer_groups(names, r"enc.*", "") == {n: [n] for n in names[:3]}
    assert layer_groups(names, r"enc.*", r"enc\.layer\.(\d+)\..*") == {"0": names[:2], "1": names[2:3]}
    with pytest.raises(KilnError, match="has no point"):
        layer_groups(names, r"decoder.*", "")


def test_avg_bits_by_hand(mlp_space):
    choice = {"layers.0": 4, "layers.2": 8, "head": 4}
    scores = mlp_space.score(choice, None)
    numel = {"layers.0": 256 * 784, "layers.2": 128 * 256, "head": 10 * 128}
    assert scores["avg_bits"] == pytest.approx(sum(choice[n] * k for n, k in numel.items()) / sum(numel.values()))
    assert 0.0 <= scores["accuracy"] <= 1.0


def test_uniform_int8_scores_like_kiln_quant_itself(mlp_space):
    from kiln.quant.config import parse_config
    from kiln.quant.run import prepare
    from kiln.train.evaluation import evaluate_model

    table = {"targets": ["Linear"], "weight": {"format": "int", "bits": 8, "granularity": "channel"},
             "input": {"format": "int", "bits": 8, "granularity": "tensor", "calib": "minmax"}}
    model = copy.deepcopy(mlp_space.model)
    prepare(model, parse_config(table), mlp_space.batches)                   # the quantize command's path
    oracle = evaluate_model(model, mlp_space.splits, "val", 100)[1]
    assert mlp_space.score(mlp_space.uniform(8), None)["accuracy"] == oracle


def test_frozen_weights_change_nothing_but_speed(mlp_space):
    from kiln.quant.apply import calibrate, quantize
    from kiln.quant.config import parse_config
    from kiln.train.tasks import forward as model_forward

    model = quantize(copy.deepcopy(mlp_space.model), parse_config(mlp_space.quant_table(
        mlp_space.bits_of({"layers.0": 4, "layers.2": 8, "head": 4}))))
    calibrate(model, mlp_space.batches, model_forward)
    x = torch.randn(5, 1, 28, 28)
    ref = model(x)
    with frozen_weights(model):
        assert torch.equal(model(x), ref)
    assert torch.equal(model(x), ref)                                        # and restored after


def test_export_is_a_quant_config_that_resolves_to_the_chosen_bits(mlp_space, tmp_path):
    from kiln.config import read_toml
    from kiln.quant.config import parse_config

    (path,) = mlp_space.export({"layers.0": 4, "layers.2": 8, "head": 4}, tmp_path)
    config = parse_config(read_toml(path))
    assert {n: config.resolve(n, "Linear")[1]["weight"].bits for n in ("layers.0", "layers.2", "head")} == \
        {"layers.0": 4, "layers.2": 8, "head": 4}


def test_per_layer_formats_count_their_own_bits_and_export_as_chosen(tmp_path):
    from kiln.config import read_toml
    from kiln.quant.config import parse_config

    space = mp_space(formats=["int8", "mxfp4", "fp8_e4m3"])
    choice = {"layers.0": "fp8_e4m3", "layers.2": "mxfp4", "head": "int8"}
    numel = {"layers.0": 256 * 784, "layers.2": 128 * 256, "head": 10 * 128}
    bits = {"layers.0": 8, "layers.2": 4 + 8 / 32, "head": 8}            # MX: one 8-bit scale per 32
    assert space.score(choice, None)["avg_bits"] == pytest.approx(
        sum(bits[n] * k for n, k in numel.items()) / sum(numel.values()))
    (path,) = space.export(choice, tmp_path)
    config = parse_config(read_toml(path))
    assert {n: type(config.resolve(n, "Linear")[1]["weight"].format).__name__ for n in numel} == \
        {"layers.0": "MiniFloat", "layers.2": "MXFormat", "head": "IntFormat"}
    with pytest.raises(KilnError, match="unknown format 'int77'"):
        mp_space(formats=["int8", "int77"])
    with pytest.raises(KilnError, match="give bits or formats, not both"):
        mp_space(formats=["int8"], bits=[2, 8])


@pytest.mark.parametrize("kind", ["mixed-precision", "compression"])
def test_bad_regexes_are_config_errors(kind):
    for key in ("include", "group"):
        with pytest.raises(KilnError, match=f"{kind} space: bad regex '\\('|mixed-precision space: bad regex"):
            parse_search_config({"space": {"kind": kind, "source": "zoo:mlp", key: "("}})


def test_seed_uniform_runs_every_uniform_point_first_and_only_once(tmp_path):
    cfg = parse_search_config({"objectives": ["accuracy", "avg_bits"], "sampler": "random", "trials": 3, "space": {
        "kind": "mixed-precision", "source": "zoo:mlp", "samples": 32, "bits": [4, 8], "calib_batches": 1,
        "batch_size": 16, "seed_uniform": True}})
    run_search(cfg, tmp_path / "run", progress=False)
    run_search(dataclasses.replace(cfg, trials=4), tmp_path / "run", progress=False)       # resumed: not again
    import json

    rows = json.loads((tmp_path / "run" / "results.json").read_text())["trials_detail"]
    assert [r["params"] for r in rows[:2]] == [{n: b for n in ("layers.0", "layers.2", "head")} for b in (4, 8)]
    assert rows[0]["attrs"]["avg_bits"] == 4 and rows[1]["attrs"]["avg_bits"] == 8
    assert len(rows) == 4 and all(r["state"] == "COMPLETE" for r in rows)
    with pytest.raises(KilnError, match="seed_uniform is a mixed-precision space option"):
        parse_search_config({"space": {"kind": "compression", "source": "zoo:mlp", "seed_uniform": True}})


def test_a_space_with_no_valid_point_stops_before_writing(tmp_path):
    for space in ({"kind": "mixed-precision", "source": "zoo:mlp", "include": "nothing.*"},
                  {"kind": "vit", "dim": [30], "heads": [4, 8]},
                  {"kind": "cnn", "depth": [6]}):
        cfg = parse_search_config({"space": space})
        with pytest.raises(KilnError, match="no (valid )?point"):
            run_search(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()


def test_cnn_candidate_size_and_flops_by_hand():
    params = {"depth": 2, "s0_channels": 8, "s0_kernel": 5, "s0_blocks": 2, "s1_channels": 16, "s1_kernel": 3,
              "s1_blocks": 1}
    model = build_candidate("cnn", params)
    convs = 8 * 1 * 25 + 8 * 8 * 25 + 16 * 8 * 9
    bns = 2 * (8 + 8 + 16)
    assert sum(p.numel() for p in model.parameters()) == convs + bns + 16 * 10 + 10
    from kiln.search.objectives import count_flops

    x = torch.randn(1, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        model(x)
    assert count_flops(model, (x,)) == counter.get_total_flops()
    # convolutions at 28x28, 28x28, then 14x14 after the pool: 2 FLOPs per multiply-add
    assert counter.get_total_flops() == 2 * (28 * 28 * (8 * 25) + 28 * 28 * (8 * 8 * 25) + 14 * 14 * (16 * 8 * 9)
                                             + 16 * 10)


def test_vit_heads_always_divide_the_width():
    cfg = parse_search_config({"sampler": "random", "space": {"kind": "vit", "dim": [24, 32], "heads": [3, 4, 8]}})
    space, _ = make_space(cfg)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(30):
        params = space.suggest(study.ask())
        assert params["dim"] % params["heads"] == 0
        model = space.build(params)
        assert model.blocks[0].attn.heads == params["heads"] and len(model.blocks) == params["depth"]


def test_cnn_search_exports_a_model_that_loads_and_trains(tmp_path):
    from kiln.config import read_toml
    from kiln.models.spec import load

    cfg = parse_search_config({"objectives": ["accuracy", "params"], "sampler": "random", "trials": 2, "threads": 1,
                               "space": {"kind": "cnn", "steps": 4, "eval_every": 2, "samples": 64,
                                         "depth": [1, 2], "channels": [4, 8]}})
    summary = run_search(cfg, tmp_path / "run", progress=False)
    n = summary["best"][0]
    trial_dir = tmp_path / "run" / "best" / f"trial-{n}"
    train = read_toml(trial_dir / "train.toml")
    loaded = load(train["model"])
    params_of_trial = summary["front"][summary["best"].index(n)][1]
    assert sum(p.numel() for p in loaded.model.parameters()) == params_of_trial
    assert loaded.model(*loaded.example_inputs).shape == (1, 10)


@pytest.mark.slow
def test_compression_aware_scoring_reports_quantized_size(tmp_path):
    cfg = parse_search_config({"objectives": ["accuracy", "model_bytes"], "sampler": "random", "trials": 1,
                               "threads": 1, "space": {"kind": "cnn", "steps": 3, "eval_every": 10, "samples": 64,
                                                       "depth": [1], "compress": "configs/quant/w8a8.toml"}})
    space, _ = make_space(cfg)
    space.ensure_setup()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    params = space.suggest(study.ask())
    scores = space.score(params, lambda *a: None)
    model = space.build(params)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    others = sum(p.numel() for p in model.parameters()) - weights
    channels = params["s0_channels"] + 10            # one fp32 scale per output channel, conv and linear
    assert scores["avg_bits"] == 8.0
    assert scores["model_bytes"] == weights + 4 * others + 4 * channels


def test_compression_space_prunes_factorises_and_quantizes_by_hand():
    cfg = parse_search_config({"objectives": ["accuracy", "params"], "space": {
        "kind": "compression", "source": "zoo:mlp", "samples": 64, "bits": [4, 8], "calib_batches": 1,
        "batch_size": 16, "budgets": [1.0, 0.25], "sparsity": [0.0, 0.5]}})
    space, _ = make_space(cfg)
    space.ensure_setup()
    choice = {"layers.0:sparsity": 0.5, "layers.0:budget": 1.0, "layers.0:bits": 4,
              "layers.2:sparsity": 0.0, "layers.2:budget": 0.25, "layers.2:bits": 8,
              "head:sparsity": 0.0, "head:budget": 1.0, "head:bits": 8}
    model, bits = space.compress(choice)
    rank = int(0.25 * 256 * 128 / (256 + 128))                   # the largest rank within a quarter of the weights
    assert model.layers[2].rank == rank
    assert bits == {"layers.0": 4, "layers.2.first": 8, "layers.2.second": 8, "head": 8}
    assert int((model.layers[0].weight == 0).sum()) == 256 * 784 // 2
    scores = space.score(choice, None)
    assert scores["params"] == 256 * 784 // 2 + 256 + rank * (256 + 128) + 128 + 10 * 128 + 10
    weights = {4: 256 * 784, 8: rank * (256 + 128) + 10 * 128}
    assert scores["avg_bits"] == pytest.approx(sum(b * n for b, n in weights.items()) / sum(weights.values()))


def test_compression_export_run_through_kiln_gives_the_trials_candidate(tmp_path):
    """prune.toml, lowrank.toml and quant.toml through kiln's own run functions, in README.txt's
    order, give the weights, ranks and bits of the candidate the trial scored."""
    from kiln.config import read_toml
    from kiln.lowrank.config import parse_config as parse_lowrank
    from kiln.lowrank.run import lowrank_run
    from kiln.prune.config import parse_config as parse_prune
    from kiln.prune.run import prune_run
    from kiln.quant.config import parse_config as parse_quant
    from kiln.quant.modules import QuantOp
    from kiln.quant.run import quantize_run

    cfg = parse_search_config({"objectives": ["accuracy", "params"], "space": {
        "kind": "compression", "source": "zoo:mlp", "samples": 64, "bits": [4, 8], "calib_batches": 1,
        "batch_size": 16, "budgets": [1.0, 0.25], "sparsity": [0.0, 0.5, 0.75]}})
    space, _ = make_space(cfg)
    space.ensure_setup()
    choice = {"layers.0:sparsity": 0.5, "layers.0:budget": 0.25, "layers.0:bits": 4,
              "layers.2:sparsity": 0.0, "layers.2:budget": 0.25, "layers.2:bits": 8,
              "head:sparsity": 0.75, "head:budget": 1.0, "head:bits": 4}
    out = tmp_path / "export"
    out.mkdir()
    assert [p.name for p in space.export(choice, out)] == ["prune.toml", "lowrank.toml", "quant.toml", "README.txt"]
    pruned, factorised = tmp_path / "pruned", tmp_path / "factorised"
    prune_run("zoo:mlp", parse_prune(read_toml(out / "prune.toml")), pruned, evaluate=False)
    low = lowrank_run(str(pruned), parse_lowrank(read_toml(out / "lowrank.toml")), factorised, evaluate=False)["model"]
    quantized = quantize_run(str(factorised), parse_quant(read_toml(out / "quant.toml")), None, calib_batches=1,
                             batch_size=16, evaluate=False)["model"]

    expected, bits = space.compress(choice)
    assert low.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(low.state_dict()[k], v) for k, v in expected.state_dict().items())
    assert {n: m.rank for n, m in low.named_modules() if hasattr(m, "rank")} == {"layers.0": 48, "layers.2": 21}
    assert float((low.head.weight == 0).float().mean()) == 0.75
    assert {op.fqn: op.weight_q.spec.format.bits for op in quantized.modules() if isinstance(op, QuantOp)} == bits

    dense = {k: 0.0 if k.endswith("sparsity") else 1.0 if k.endswith("budget") else v for k, v in choice.items()}
    only = tmp_path / "only-quant"
    only.mkdir()
    assert [p.name for p in space.export(dense, only)] == ["quant.toml", "README.txt"]   # no step it does not use


def test_cost_objectives_match_kiln_analysis():
    from kiln.analysis.report import analyze
    from kiln.hardware.profiles import load_profile
    from kiln.models.loaded import LoadedModel
    from kiln.search.objectives import cost_scores

    model = build_candidate("cnn", {"depth": 1, "s0_channels": 8, "s0_kernel": 3, "s0_blocks": 1}).eval()
    x = (torch.randn(1, 1, 28, 28),)
    scores = cost_scores(model, x, {"params", "model_bytes", "flops", "latency_ms", "roofline_ms"}, "h100")
    a = analyze(LoadedModel("cnn", model, x), load_profile("h100"), measure_time=False)
    assert scores["roofline_ms"] == pytest.approx(1e3 * a.roofline.latency_s)
    assert scores["flops"] == a.flops
    assert scores["params"] == a.params and scores["model_bytes"] == a.param_bytes == 4 * a.params
    assert scores["latency_ms"] > 0


def test_a_repeated_point_takes_the_earlier_trials_values_without_running():
    from kiln.search.engine import Setup, open_study, optimize

    cfg = parse_search_config({"objectives": ["accuracy", "avg_bits"], "sampler": "random", "trials": 3, "space": {
        "kind": "mixed-precision", "source": "zoo:mlp", "samples": 64, "bits": [4, 8], "calib_batches": 1,
        "batch_size": 16}})
    space, objectives = make_space(cfg)
    calls = []
    score = space.score
    space.score = lambda *a: calls.append(1) or score(*a)
    study = open_study(cfg, None, space)
    point = {"layers.0": 4, "layers.2": 8, "head": 4}
    for p in (point, point, dict(point, head=8)):
        study.enqueue_trial(p)
    optimize(Setup(cfg, space, objectives, study))
    t = study.trials
    assert len(calls) == 2 and t[1].user_attrs["duplicate_of"] == 0 and t[1].values == t[0].values


def test_output_distortion_is_kl_of_softmax_or_relative_mse():
    from kiln.search.spaces.quant import output_distortion

    g = torch.Generator().manual_seed(0)
    r, q = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    p_r, p_q = r.softmax(1), q.softmax(1)
    kl = float((p_r * (p_r.log() - p_q.log())).sum(1).mean())
    assert output_distortion([r], [q], logits=True) == pytest.approx(kl, rel=1e-5)
    assert output_distortion([r, r], [q, r], logits=True) == pytest.approx(kl / 2, rel=1e-5)
    # token logits (batch, seq, vocab): per token
    assert output_distortion([r.reshape(1, 5, 3)], [q.reshape(1, 5, 3)], logits=True) == pytest.approx(kl, rel=1e-5)
    v, w = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert output_distortion([v], [w], logits=False) == pytest.approx(float(((w - v) ** 2).mean() / (v ** 2).mean()), rel=1e-5)


def test_spaced_takes_the_first_path_point_at_or_below_each_target():
    from kiln.search.spaces.quant import spaced

    path = [(8.0, {"a": 8}), (7.0, {"a": 7}), (6.5, {"a": 6}), (4.5, {"a": 5}), (4.0, {"a": 4})]
    # targets 6.67 and 5.33
    assert spaced(path, 2) == [{"a": 6}, {"a": 5}]
    # targets 7, 6 and 5: 7.0, then 4.5 twice (kept once)
    assert spaced(path, 3) == [{"a": 7}, {"a": 5}]


def test_sensitivity_path_walks_from_widest_to_narrowest_by_least_distortion_per_bit():
    space = mp_space(bits=[3, 4, 8], seed_sensitivity=3, seed_uniform=True)
    sens = space.sensitivity()
    assert set(sens) == {"layers.0", "layers.2", "head"}
    assert all(s[8] == 0.0 and set(s) == {3, 4, 8} for s in sens.values())
    params = space.group_params()
    path = space.sensitivity_path()
    assert path[0][1] == space.uniform(8) and path[-1][1] == space.uniform(3)
    bits = [b for b, _ in path]
    assert all(a > b for a, b in zip(bits, bits[1:]))
    for (_, before), (_, after) in zip(path, path[1:]):
        assert sum(before[g] != after[g] for g in before) == 1
    # the first step is the cheapest added distortion per weight bit saved
    first = min(((sens[g][b] / (params[g] * (8 - b)), -params[g] * (8 - b)), g, b)
                for g in sens for b in (3, 4))
    assert path[1][1] == {**space.uniform(8), first[1]: first[2]}
    # the path's average bits are the trial's measured ones (exact arithmetic over the weights)
    for b, choice in path[:: max(1, len(path) // 3)]:
        assert space.score(choice, None)["avg_bits"] == pytest.approx(b, abs=1e-9)
    points = space.initial_points()
    assert points[:3] == [space.uniform(b) for b in (3, 4, 8)]
    assert 3 < len(points) <= 6 and all(p not in points[:3] for p in points[3:])
    with pytest.raises(KilnError, match="seed_sensitivity is a mixed-precision space option"):
        parse_search_config({"space": {"kind": "compression", "source": "zoo:mlp", "seed_sensitivity": 2}})
    with pytest.raises(KilnError, match="seed_sensitivity must be >= 0"):
        mp_space(seed_sensitivity=-1)


def test_choice_bits_count_each_formats_own_bits():
    cfg = mp_space(formats=["int8", "fp8_e4m3", "mxfp4", "int4", "fp4_e2m1"]).config
    assert [cfg.choice_bits(c) for c in cfg.choices] == [8.0, 8.0, 4.25, 4.0, 4.0]
    assert mp_space().config.choice_bits(4) == 4.0


def test_seed_sensitivity_points_run_first_and_a_resume_does_not_measure_again(tmp_path, monkeypatch):
    from kiln.search.spaces.quant import MixedPrecisionSpace

    cfg = parse_search_config({"objectives": ["accuracy", "avg_bits"], "sampler": "nsga2", "population": 2,
                               "trials": 4, "space": {
        "kind": "mixed-precision", "source": "zoo:mlp", "samples": 32, "bits": [3, 4, 8], "calib_batches": 1,
        "batch_size": 16, "seed_sensitivity": 2}})
    calls = []
    path = MixedPrecisionSpace.sensitivity_path
    monkeypatch.setattr(MixedPrecisionSpace, "sensitivity_path", lambda self: calls.append(1) or path(self))
    run_search(cfg, tmp_path / "run", progress=False)
    space, _ = make_space(cfg)
    space.ensure_setup()
    from kiln.search.spaces.quant import spaced

    seeds = spaced(path(space), 2)
    import json

    rows = json.loads((tmp_path / "run" / "results.json").read_text())["trials_detail"]
    assert [r["params"] for r in rows[:len(seeds)]] == seeds and calls == [1]
    run_search(dataclasses.replace(cfg, trials=6), tmp_path / "run", progress=False)       # resumed
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["trials_detail"]
    assert calls == [1] and len(rows) == 6
    study = optuna.load_study(study_name=cfg.study, storage=f"sqlite:///{tmp_path / 'run' / 'study.db'}")
    assert [t.number for t in study.trials if "fixed_params" in t.system_attrs] == list(range(len(seeds)))
