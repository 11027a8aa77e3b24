"""kiln.config: one recursive loader and writer. Oracle: the round trip gives back an equal
config, through TOML (tomllib reads kiln's writer) and through JSON."""
from __future__ import annotations

import ast
import enum
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

import kiln
from kiln.config import from_dict, to_dict, to_toml
from kiln.errors import KilnError


class Color(str, enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    n: int = 1
    color: Color = Color.RED


@dataclass(frozen=True)
class Outer:
    VERSION = 2
    name: str = "x"
    names: tuple[str, ...] = ()
    pair: tuple[int, float] = (1, 2.0)
    inner: Inner = Inner()
    items: tuple[Inner, ...] = ()
    table: dict | None = None
    scale: float | None = None


CASES = [
    Outer(),
    Outer('quote " and \\ backslash', ("a", "b c"), (3, 0.5), Inner(2, Color.BLUE), (Inner(), Inner(5, Color.BLUE)),
          {"k": 1, "nested": {"z": [1, 2], "s": "t"}}, 1e-7),
    Outer("ünïcode", scale=float("inf")),
]


@pytest.mark.parametrize("config", CASES)
def test_round_trip_through_toml_and_json(config):
    assert from_dict(Outer, tomllib.loads(to_toml(config))) == config
    assert from_dict(Outer, json.loads(json.dumps(to_dict(config)))) == config


@pytest.mark.parametrize("table, message", [
    ({"nope": 1}, "unknown key 'nope'; accepted: name, names"),
    ({"inner": {"color": "green"}}, "key 'color' is 'green'; accepted: red, blue"),
    ({"pair": [1]}, "key 'pair' needs 2 items, got 1"),
    ({"items": [{"n": "one"}]}, "key 'n' needs int"),
    ({"items": [{"m": 1}]}, r"outer.items\[0\]: unknown key .m."),
    ({"version": 3}, "version 3 is not one this kiln reads"),
    ({"inner": 5}, "key .inner. needs a table"),
    ({"names": "ab"}, "key 'names' needs a list of str, got 'ab'"),
])
def test_bad_tables_are_one_line_errors_naming_the_key(table, message):
    with pytest.raises(KilnError, match=message):
        from_dict(Outer, table, "outer")


@dataclass(frozen=True)
class Needs:
    match: str
    n: int = 1


def test_a_missing_required_key_is_named():
    with pytest.raises(KilnError, match="^rule: missing key 'match'$"):
        from_dict(Needs, {"n": 2}, "rule")


def test_version_up_to_the_class_version_is_accepted_and_not_a_field():
    assert from_dict(Outer, {"version": 2, "name": "y"}) == Outer(name="y")


# -- conformance: every config class in kiln round-trips through TOML and JSON -------------------
# Each entry: a non-default instance and the parse/write pair its command uses (kiln.config's
# from_dict/to_dict unless the config has its own). A new `*Config` dataclass in kiln fails
# test_every_config_class_is_listed until it is added here.

def _configs() -> list[tuple[Any, Callable, Callable]]:
    from kiln.adapt.config import parse_config as early_exit_config
    from kiln.bench.loadgen import BenchConfig, Mode, Scenario
    from kiln.compare.config import CompareConfig
    from kiln.compile.backends import Precision
    from kiln.compile.fusion import FusionConfig
    from kiln.compile.passes import DCEConfig, FoldConfig, NoConfig
    from kiln.compile.run import CompileConfig
    from kiln.federated import config as fl
    from kiln.hw.design import EmitConfig
    from kiln.hw.synth import SynthConfig, Target
    from kiln.hw.verify import VerifyConfig
    from kiln.lowrank import config as lowrank
    from kiln.models.zoo.gpt import GPTConfig
    from kiln.optimize.config import DropType, Goal, OptimizeConfig
    from kiln.optimize.space import OptimizeSpaceConfig
    from kiln.plan import cluster as plan_cluster
    from kiln.plan.prices import InstanceConfig
    from kiln.plan.run import PlanConfig
    from kiln.prune import config as prune
    from kiln.quant import config as quant
    from kiln.hw.systolic import ArrayConfig, Dataflow, Energy
    from kiln.search.config import SearchConfig
    from kiln.search.objectives import HwConfig
    from kiln.search.nas import config as nas
    from kiln.search.nas.fit import Recipe
    from kiln.search.spaces.arch import CNNConfig, HParamsConfig, ViTConfig
    from kiln.search.spaces.compress import CompressionConfig
    from kiln.search.spaces.python import PythonConfig
    from kiln.search.spaces.quant import MixedPrecisionConfig
    from kiln.lowrank.lora import Bias, LoraConfig
    from kiln.timing import TimingConfig
    from kiln.train.config import Schedule, TrainConfig
    from kiln.train.parallel.config import Mode as ParallelMode
    from kiln.train.parallel.config import ParallelConfig, PipeSchedule

    def plain(config):
        return config, lambda t: from_dict(type(config), t, type(config).__name__), to_dict

    nas_space = nas.SpaceConfig(ops=("none", "skip_connect", "sep_conv_3x3"), nodes=3, channels=4, layers=2)
    fl_parts = dict(
        partition=fl.PartitionConfig(fl.Partitioner.PATHOLOGICAL, alpha=0.1, labels_per_client=3, min_size=4),
        strategy=fl.StrategyConfig(fl.StrategyName.MULTIKRUM, fraction_train=0.5, min_train_clients=3,
                                   fraction_evaluate=0.2, proximal_mu=0.1, server_lr=0.05, tau=1e-2, trim_beta=0.1,
                                   byzantine=2, keep=4),
        local=fl.LocalConfig(epochs=2, batch_size=8, lr=0.1, optimizer="adamw", momentum=0.5, weight_decay=0.1,
                             max_steps=7),
        compression=fl.UpdateCompressionConfig("topk", topk_fraction=0.05, error_feedback=True),
        privacy=fl.PrivacyConfig(fl.PrivacyMode.CENTRAL, noise_multiplier=0.7, clipping_norm=2.0, delta=1e-6),
        attack=fl.AttackConfig(fl.Attack.LABEL_FLIP, clients=2, scale=3.0))
    return [
        plain(fl.FederateConfig("zoo:cnn", dataset="mnist", rounds=5, clients=9, seed=2, engine=fl.Engine.DEPLOYMENT,
                                superlink="127.0.0.1:9092", eval_batch_size=64, threads=1, secagg=True, **fl_parts)),
        *(plain(part) for part in fl_parts.values()),
        plain(TrainConfig(model="zoo:mlp", dataset="mnist", epochs=2, lr=3e-4, optimizer="sgd",
                          schedule=Schedule.ONECYCLE, bf16=True, grad_clip=1.0, quant="q.toml", teacher="zoo:cnn")),
        plain(ParallelConfig(modes=(ParallelMode.DDP, ParallelMode.PP), mesh=(2, 2), schedule=PipeSchedule.INTERLEAVED,
                             microbatches=8, split=("blocks.1", "blocks.2", "blocks.3"), checkpoint_activations=True)),
        (prune.parse_config({"method": "structured", "criterion": "random", "reduction": "l2", "ratio": 0.3,
                             "scope": "local", "round_to": 4, "rules": [{"match": "fqn:fc2", "ratio": 0.5},
                                                                       {"match": "type:Conv2d", "skip": True}],
                             "finetune": {"epochs": 1, "distill": True}}), prune.parse_config, prune.to_table),
        (lowrank.parse_config({"energy": 0.9, "seed": 3, "finetune": {"epochs": 1},
                               "rules": [{"match": "fqn:fc", "rank": 3}, {"match": "re:.*head", "skip": True}]}),
         lowrank.parse_config, lowrank.to_table),
        (early_exit_config({"exits": ["layers.0", "layers.1"], "criterion": "confidence", "threshold": 0.8,
                            "weights": [1.0, 2.0, 3.0], "freeze_backbone": False, "train": {"epochs": 2}}),
         early_exit_config, to_dict),
        (quant.parse_config({"targets": ["Linear", "Conv2d"], "weight": "int4",
                             "input": {"format": "int", "bits": 8, "calib": "percentile", "percentile": 99.9},
                             "rules": [{"match": "type:Embedding", "weight": "int8"},
                                       {"match": "fqn:a.b", "input": False},
                                       {"match": "re:.*classifier.*", "skip": True}],
                             "smoothquant": {"alpha": 0.7}, "gptq": {"act_order": True, "block": 64}}),
         quant.parse_config, quant.to_table),
        plain(quant.SmoothQuantConfig(0.8)),
        plain(quant.GPTQConfig(group_size=64, block=32, percdamp=0.05, act_order=True)),
        plain(CompileConfig("eager+onnxruntime", batch=8, precision=Precision.BF16, rounds=5)),
        plain(BenchConfig(Scenario.SERVER, Mode.ACCURACY, batch=4, target_qps=100.0, target_latency_ms=50.0,
                          min_duration_s=1.0, max_samples=64)),
        plain(TimingConfig(rounds=5, warmup=1, short_call_s=0.01, remeasure=False, runoff_margin=0.05, rotate=False)),
        plain(FusionConfig(4)), plain(FoldConfig(False, 1024)), plain(DCEConfig(False)), plain(NoConfig()),
        plain(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)),
        plain(SearchConfig(space={"kind": "python", "objective": "py:f.py:g", "grid": {"x": [1, 2]}},
                           objectives=("accuracy", "avg_bits"), sampler="nsga2", trials=7, reference=(0.5, 32.0),
                           early_stop=False)),
        plain(MixedPrecisionConfig(source="zoo:mlp", bits=(4, 8), group="re:.*fc.*", granularity="tensor",
                                   act_bits=0, seed_uniform=True)),
        plain(ArrayConfig(8, 32, Dataflow.OS, ifmap_sram_kb=32.0, bandwidth=4.0, word_bits=4,
                          energy=Energy(dram_64bit_pj=2600.0))),
        plain(HwConfig(target="xilinx", reuse=64, array="8x8", dataflow="is")),
        plain(CompressionConfig(source="zoo:mlp", bits=(8,), sparsity=(0.0, 0.25), budgets=(1.0, 0.75))),
        plain(CompareConfig(models=("zoo:cnn", "zoo:gpt"), optimizations=("int8", "2:4"), hardware=("h100",),
                            train_steps=0, finetune_steps=3, latency=False, backend="eager+onnxruntime", rounds=2)),
        plain(OptimizeConfig("runs/cnn", target="h100", max_drop=0.02, drop_type=DropType.RELATIVE,
                             objective=Goal.SIZE, budget_min=3.5, batch=4, bits=(8,), sparsity=(0.0,))),
        plain(OptimizeSpaceConfig(source="zoo:mlp", bits=(8,), target="a100", batch=2, precisions=("int8",),
                                  fp32_backends=("eager", "onnxruntime"), baseline_ms=1.5)),
        plain(CNNConfig(depth=(1, 2), steps=10, compress="q.toml")),
        plain(EmitConfig(reuse=4, layer_reuse=(("fc1", 8), ("fc2", 2)), check_samples=16)),
        plain(VerifyConfig(samples=7, fake_quant=False)),
        plain(SynthConfig(target=Target.ICE40, pnr=False, device="hx8k", timeout_s=60.0)),
        plain(ViTConfig(patch=4, dim=(16,), lr=1e-3)),
        plain(HParamsConfig(lr_range=(1e-3, 1e-2), samples=50)),
        plain(PythonConfig("py:f.py:g", {"x": [1, 2], "y": ["a"]})),
        plain(nas_space),
        plain(LoraConfig(r=4, alpha=8.0, dropout=0.05, targets=("query", "value"), bias=Bias.LORA_ONLY, rslora=True,
                         train=("head",), qlora=True, block=32, scaler_block=128)),
        plain(nas.DartsRun(dataset="mnist", seed=1, space=nas_space, retrain=Recipe(epochs=2.0, lr=0.1))),
        plain(nas.SampledRun(search=nas.SampledSearch(max_archs=5, proxy=Recipe(epochs=0.5)), space=nas_space)),
        plain(nas.SposRun(space=nas.SposSpace(layers=3, downsample_after=(0, 2)), search=nas.SposSearch(archs=10))),
        plain(plan_cluster.ClusterConfig(
            "c", "d", "a100", 8e10, 8, 2, plan_cluster.Precision.BF16, plan_cluster.LinkConfig(1e-6, 3e11),
            plan_cluster.LinkConfig(1e-5, 2.5e10), collectives={"p2p": plan_cluster.CalibratedConfig((2, 4), (1e-4, 2e-4), (1e9, 5e8))},
            sources={"device": "x"}, contention=plan_cluster.ContentionConfig((2, 4), (1.34, 2.1)))),
        plain(plan_cluster.ContentionConfig((2,), (1.2,))),
        plain(plan_cluster.LinkConfig(2e-6, 1e10)),
        plain(plan_cluster.CalibratedConfig((2,), (1e-3,), (1e9,))),
        plain(InstanceConfig("i", "p", "a100", 8, 10.5, "s", "2024-01-01")),
        plain(PlanConfig("zoo:gpt", "dgx-a100", 4, global_batch=32, seq=64, tokens=1e9, deadline_h=2.0, instance="i")),
    ]


def _id(entry) -> str:
    return type(entry[0]).__name__


@pytest.mark.parametrize("entry", _configs(), ids=_id)
def test_every_config_round_trips_through_toml_and_json(entry):
    config, parse, write = entry
    assert parse(tomllib.loads(to_toml(write(config)))) == config
    assert parse(json.loads(json.dumps(write(config)))) == config


def test_every_config_class_is_listed():
    """Every `*Config` dataclass defined in kiln (found by reading the source, so nothing
    optional needs importing) has an entry above."""
    defined = set()
    for path in Path(kiln.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config") and any(
                    "dataclass" in ast.unparse(d) for d in node.decorator_list):
                defined.add(node.name)
    listed = {_id(e) for e in _configs()}
    assert defined - listed == set(), "add these to _configs()"
