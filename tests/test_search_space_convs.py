"""Convolutions in the searched spaces (mixed precision, compression, `kiln optimize`'s): every
Conv of a CNN is a searched layer with the formats it can hold, and a sampled point quantizes,
prunes and factorises exactly the convs it chose, as eager per-channel rounding, float8 casts
and kiln's own prune/lowrank/quantize commands do."""
import copy

import optuna
import pytest
import torch
from torch import nn

from kiln.search.config import parse_search_config
from kiln.search.engine import make_space

torch.set_num_threads(1)
FORMATS = ["int8", "int4", "fp8_e4m3", "mxfp4"]
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _space(kind: str, source: str, **extra):
    objectives = ["accuracy", "avg_bits"] if kind == "mixed-precision" else ["accuracy", "params"]
    cfg = parse_search_config({"objectives": objectives, "space": {
        "kind": kind, "source": source, "samples": 16, "calib_batches": 1, "batch_size": 8, **extra}})
    space, _ = make_space(cfg)
    space.ensure_setup()
    return space


def _eager_fake_quant(w: torch.Tensor, fmt: str) -> torch.Tensor:
    """Per output channel, symmetric: ints round half to even on amax / (2^(b-1) - 1); fp8 E4M3
    is torch's own float8_e4m3fn cast of w scaled to amax = 448."""
    amax = w.reshape(w.shape[0], -1).abs().amax(1).reshape(-1, *[1] * (w.dim() - 1))
    if fmt == "fp8_e4m3":
        s = amax / 448
        return (w / s).to(torch.float8_e4m3fn).float() * s
    qmax = 2 ** (int(fmt[3:]) - 1) - 1
    s = amax / qmax
    return torch.round(w / s).clamp(-qmax, qmax) * s


@pytest.mark.parametrize("source", ["zoo:cnn", "zoo:resnet20"])
def test_every_conv_is_a_searched_layer_with_the_formats_its_weight_can_hold(source):
    space = _space("mixed-precision", source, formats=FORMATS)
    modules = dict(space.model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    assert len(convs) == (4 if source == "zoo:cnn" else 21) and linears == ["fc"]
    assert set(space.groups) == set(convs) | set(linears)
    grid = space.grid()
    for n in convs:          # MX blocks of 32 run along the reduction axis: a 3-wide kernel holds none
        assert grid[n] == ["int8", "int4", "fp8_e4m3"]
    assert grid["fc"] == FORMATS
    # the uniform mxfp4 point gives the convs the nearest format they can hold (4-bit int)
    assert space.uniform("mxfp4") == {n: "int4" for n in convs} | {"fc": "mxfp4"}


def test_a_sampled_point_quantizes_exactly_its_convs_as_eager_fake_quantization():
    from kiln.quant.apply import quantize
    from kiln.quant.config import parse_config
    from kiln.quant.modules import QuantOp

    include = r"features\.(0|7|10)|fc"            # features.3 left out: it stays a float Conv2d
    space = _space("mixed-precision", "zoo:cnn", formats=FORMATS, include=include, fixed_bits=0, act_bits=0)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    seen = set()
    for _ in range(6):
        choice = space.suggest(study.ask())
        seen |= {v for k, v in choice.items() if k != "fc"}
        assert set(choice) == {"features.0", "features.7", "features.10", "fc"}
        model = quantize(copy.deepcopy(space.model), parse_config(space.quant_table(space.bits_of(choice))))
        ops = {op.fqn: op for op in model.modules() if isinstance(op, QuantOp)}
        assert set(ops) == set(choice)
        assert isinstance(model.features[3], nn.Conv2d)
        expected = copy.deepcopy(space.model)
        with torch.no_grad():
            for n, fmt in choice.items():
                if fmt == "mxfp4":
                    assert n == "fc"
                    w = ops[n].quantized_weight()
                else:
                    w = _eager_fake_quant(expected.get_submodule(n).weight, fmt)
                    assert torch.equal(ops[n].quantized_weight(), w), (n, fmt)
                expected.get_submodule(n).weight.copy_(w)
            x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
            assert torch.equal(model(x), expected(x))
    assert "mxfp4" not in seen and seen


def test_a_conv_point_exported_and_run_through_kiln_gives_the_trials_candidate(tmp_path):
    """A conv pruned, a conv factorised (Tucker-2 at kiln lowrank's own ranks for the budget) and
    every layer quantized: prune.toml, lowrank.toml and quant.toml through kiln's run functions
    give the candidate the trial scored."""
    from kiln.config import read_toml
    from kiln.lowrank.config import parse_config as parse_lowrank
    from kiln.lowrank.run import lowrank_run
    from kiln.lowrank.tucker import Tucker2Conv2d, ranks_for_budget
    from kiln.prune.config import parse_config as parse_prune
    from kiln.prune.run import prune_run
    from kiln.quant.config import parse_config as parse_quant
    from kiln.quant.modules import QuantOp
    from kiln.quant.run import quantize_run

    space = _space("compression", "zoo:cnn", bits=[4, 8], budgets=[1.0, 0.5], sparsity=[0.0, 0.5])
    assert set(space.rankable) == set(space.groups)            # every Conv2d and the Linear
    choice = {f"{g}:{k}": v for g in space.groups for k, v in (("sparsity", 0.0), ("budget", 1.0), ("bits", 8))}
    choice |= {"features.3:sparsity": 0.5, "features.7:budget": 0.5, "features.7:bits": 4, "features.10:bits": 4}
    out = tmp_path / "export"
    out.mkdir()
    assert [p.name for p in space.export(choice, out)] == ["prune.toml", "lowrank.toml", "quant.toml", "README.txt"]
    pruned, factorised = tmp_path / "pruned", tmp_path / "factorised"
    prune_run("zoo:cnn", parse_prune(read_toml(out / "prune.toml")), pruned, evaluate=False)
    low = lowrank_run(str(pruned), parse_lowrank(read_toml(out / "lowrank.toml")), factorised, evaluate=False)["model"]
    quantized = quantize_run(str(factorised), parse_quant(read_toml(out / "quant.toml")), None, calib_batches=1,
                             batch_size=8, evaluate=False)["model"]

    expected, bits = space.compress(choice)
    assert all(torch.equal(low.state_dict()[k], v) for k, v in expected.state_dict().items())
    assert low.state_dict().keys() == expected.state_dict().keys()
    tucker = low.features[7]
    assert isinstance(tucker, Tucker2Conv2d)
    assert (tucker.first.out_channels, tucker.last.in_channels) == ranks_for_budget(space.model.features[7], 0.5)
    assert float((low.features[3].weight == 0).float().mean()) == 0.5
    assert {op.fqn: op.weight_q.spec.format.bits for op in quantized.modules() if isinstance(op, QuantOp)} == bits
    assert {k for k, b in bits.items() if b == 4} == {"features.7.first", "features.7.core", "features.7.last",
                                                       "features.10"}


def test_optimize_space_searches_each_conv_and_an_int8_candidate_may_leave_a_layer_float():
    """kiln optimize's space on the CNN: every conv has bits (or FLOAT), sparsity and a Tucker-2
    budget; an int8 candidate quantizes exactly the layers not at FLOAT, as eager rounding does."""
    from kiln.optimize.config import OptimizeConfig
    from kiln.optimize.phases import none_choice, seed_points
    from kiln.optimize.run import make_space
    from kiln.optimize.space import FLOAT
    from kiln.quant.modules import QuantOp
    from kiln.runs.artifact import load_source

    cfg = OptimizeConfig(src="zoo:cnn", target="h100", val_samples=32)
    space = make_space(cfg, load_source(cfg.src), {"metric": "accuracy", "backend": "eager"})
    space.ensure_setup()
    convs = ["features.0", "features.3", "features.7", "features.10"]
    assert set(space.groups) == {*convs, "fc"} and set(space.rankable) == set(space.groups)
    assert all(space.group_choices[g] == [8, 4, FLOAT] for g in space.groups)
    params = space.suggest(optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask())
    kinds = ("sparsity", "budget", "bits") if params["precision"] == "int8" else ("sparsity", "budget")
    assert {f"{g}:{k}" for g in space.groups for k in kinds} <= set(params)

    choice = none_choice(space, "int8", "onnxruntime:dtype=int8") | {
        "features.3:bits": FLOAT, "features.7:bits": FLOAT, "features.10:bits": FLOAT, "features.0:bits": 4}
    built = space.build(choice)
    ops = {op.fqn: op for op in built.model.modules() if isinstance(op, QuantOp)}
    assert set(ops) == {"features.0", "fc"} == set(built.bits)
    assert all(isinstance(built.model.features[i], nn.Conv2d) for i in (3, 7, 10))
    assert torch.equal(ops["features.0"].quantized_weight(), _eager_fake_quant(space.model.features[0].weight, "int4"))
    assert torch.equal(ops["fc"].quantized_weight(), _eager_fake_quant(space.model.fc.weight, "int8"))
    # a factorised conv left in float: its Tucker-2 parts are skipped, not quantized
    built = space.build(choice | {"features.7:budget": 0.5})
    assert {op.fqn for op in built.model.modules() if isinstance(op, QuantOp)} == {"features.0", "fc"}
    # the seeds: fp32, every layer at int8, and the Linear alone at int8 (the convs float)
    seeds = seed_points(space, [], "eager")
    assert [s["precision"] for s in seeds] == ["fp32", "int8", "int8"]
    assert [seeds[2][f"{g}:bits"] for g in space.groups] == [FLOAT] * 4 + [8]
