"""kiln plan: the collectives model, memory and compute formulas against their papers' numbers
and exact arithmetic, the closed-form transformer against kiln's analysis of the built model,
pipeline bubbles, enumeration, cluster profiles, launch scripts and the CLI's best plan."""
from __future__ import annotations

import itertools

import pytest

from kiln.errors import KilnError
from kiln.plan.cluster import Cluster, ClusterConfig, LinkConfig, Precision, available, load_cluster
from kiln.plan.collectives import (Algorithm, Collective, Link, best_all_reduce, bus_factor, collective_time,
                                   fit_latency_bandwidth)
from kiln.plan.emit import Emit, script, train_args
from kiln.plan.memory import model_state_bytes
from kiln.plan.plans import Plan, Predictor, Schedule, enumerate_plans, partition, rank
from kiln.plan.workload import LayerCost, OpCost, Workload, load_workload, six_n_tokens, train_flops

GPT3_175B = "hf-config:gpt2?n_layer=96&n_embd=12288&n_head=96&n_positions=2048&vocab_size=50257&n_inner=49152"


def test_ring_all_reduce_is_nccl_tests_bus_bandwidth_arithmetic():
    link = Link(latency_s=1e-6, bandwidth=1e9)
    # 2(n-1) steps of latency and 2(n-1)/n of the payload per process
    assert collective_time(Collective.ALL_REDUCE, 8e6, 4, link) == pytest.approx(6e-6 + 1.5 * 8e6 / 1e9)
    assert collective_time(Collective.ALL_GATHER, 8e6, 4, link) == pytest.approx(3e-6 + 0.75 * 8e6 / 1e9)
    assert collective_time(Collective.REDUCE_SCATTER, 8e6, 8, link) == pytest.approx(7e-6 + 7 / 8 * 8e6 / 1e9)
    assert collective_time(Collective.P2P, 1e6, 2, link) == pytest.approx(1e-6 + 1e-3)
    assert collective_time(Collective.ALL_REDUCE, 1e9, 1, link) == 0.0


def test_tree_wins_small_messages_and_ring_large_ones():
    link = Link(latency_s=1e-5, bandwidth=1e10)
    assert best_all_reduce(1e3, 64, link)[1] is Algorithm.TREE     # 12 latency terms against 126
    assert best_all_reduce(1e9, 64, link)[1] is Algorithm.RING     # 2(n-1)/n < 2 log2 n payloads


def test_latency_bandwidth_fit_recovers_exact_figures():
    sizes = [1e3, 1.6e4, 2.56e5, 4e6, 3.2e7]
    times = [5e-4 + 1.5 * s / 2e9 for s in sizes]      # 4 processes: all-reduce bus factor 1.5
    fit = fit_latency_bandwidth(Collective.ALL_REDUCE, 4, sizes, times)
    # ring all-reduce at 4 processes: 2(n-1) = 6 steps share the 500 us
    assert fit.latency_s == pytest.approx(5e-4 / 6) and fit.bus_bandwidth == pytest.approx(2e9)
    assert fit.time(Collective.ALL_REDUCE, 1e6) == pytest.approx(5e-4 + 1.5 * 1e6 / 2e9)


def test_a_calibrated_collective_at_another_process_count_follows_its_algorithm():
    """Measured at 2 processes (1 ring step of all-gather, 2 of all-reduce), read at 8: the
    per-step latency and per-process bandwidth stay, the steps and bus factor follow n."""
    from kiln.plan.collectives import fitted_time, steps

    sizes = [1e3, 1e5, 1e7]
    for op in (Collective.ALL_GATHER, Collective.ALL_REDUCE):
        times = [steps(op, 2) * 1e-4 + bus_factor(op, 2) * s / 1e9 for s in sizes]
        fit = fit_latency_bandwidth(op, 2, sizes, times)
        ring = collective_time(op, 4e6, 8, Link(1e-4, 1e9))
        assert fitted_time(op, 4e6, 8, (fit,)) == pytest.approx(ring)


@pytest.mark.parametrize("stage,expected_gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_model_states_of_7_5b_on_64_devices(stage, expected_gb):
    # Rajbhandari et al. (arXiv 1910.02054), Figure 1: psi = 7.5B, N_d = 64, K = 12
    total = sum(model_state_bytes(7.5e9, Precision.BF16, stage, 64).values()) / 1e9
    assert total == pytest.approx(expected_gb, abs=0.05)


def test_gpt3_175b_from_its_config_and_its_training_compute():
    w = load_workload(GPT3_175B, seq=2048)
    assert w.params == pytest.approx(175e9, rel=0.005)          # GPT-3 Table 2.1
    assert six_n_tokens(w.params, 300e9) == pytest.approx(3.14e23, rel=0.01)    # Table D.1
    # the full count (attention, logits) stays within 5% of the paper's 6*N*D figure
    assert train_flops(w, 300e9 / 2048) == pytest.approx(3.14e23, rel=0.05)


@pytest.mark.parametrize("spec", ["hf-config:gpt2", "hf-config:llama", "hf-config:gpt2?n_layer=3&n_embd=96&n_head=6"])
def test_transformer_formulas_equal_the_analysis_of_the_built_model(spec):
    formula = load_workload(spec, from_config=True, head=False)
    captured = load_workload(spec, step_memory=False)
    assert formula.params == captured.params
    assert formula.flops_per_sample == captured.flops_per_sample


def test_partition_minimises_the_largest_stage_exactly():
    costs = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    for stages in (2, 3, 4):
        got = partition(costs, stages)
        assert [a for a, _ in got] == sorted(a for a, _ in got) and all(b > a for a, b in got)
        assert got[0][0] == 0 and got[-1][1] == len(costs)
        brute = min(max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, len(costs))))
                    for cuts in itertools.combinations(range(1, len(costs)), stages - 1))
        assert max(sum(costs[a:b]) for a, b in got) == pytest.approx(brute)


def _toy(layers: int = 8) -> Workload:
    blocks = tuple(LayerCost(f"blocks.{i}", 1000, (OpCost(1e9, 0.0),), 1e6, 1e3, tp_collectives=2) for i in range(layers))
    return Workload("toy", blocks, seq=1, hidden=64, heads=8, weight_bytes=4)


def _cluster(memory: float = 1e12, bandwidth: float = 1e30) -> Cluster:
    link = LinkConfig(0.0, bandwidth)
    return Cluster(ClusterConfig("test", "", "a100", memory, 8, 1, Precision.FP32, link))


def _hw():
    from kiln.hardware.profiles import HardwareProfile
    return HardwareProfile("flat", "", "gpu", {"fp32": 1e12}, 1e30)


@pytest.mark.parametrize("p,m", [(2, 4), (4, 8), (4, 4)])
def test_pipeline_bubble_is_p_minus_1_over_m_plus_p_minus_1(p, m):
    pred = Predictor(_toy(), _cluster(), _hw(), m).predict(Plan(pp=p, microbatches=m, schedule=Schedule.ONE_F_ONE_B))
    bubble = pred.parts["bubble"] / (pred.parts["bubble"] + pred.parts["compute"])
    assert bubble == pytest.approx((p - 1) / (m + p - 1))      # Narayanan et al., arXiv 2104.04473


def test_interleaving_divides_the_bubble_by_the_chunks():
    pred = Predictor(_toy(), _cluster(), _hw(), 8).predict(Plan(pp=4, microbatches=8, schedule=Schedule.INTERLEAVED))
    assert pred.parts["bubble"] / pred.parts["compute"] == pytest.approx((4 - 1) / (2 * 8))


def test_data_parallel_compute_divides_by_the_replicas_and_memory_rejects_with_the_gap():
    hw = _hw()
    one = Predictor(_toy(), _cluster(), hw, 8).predict(Plan(microbatch=8))
    four = Predictor(_toy(), _cluster(), hw, 8).predict(Plan(dp=4, microbatch=2))
    assert four.parts["compute"] == pytest.approx(one.parts["compute"] / 4)
    # 8 layers x 1e6 activation bytes x 8 samples + 16 bytes x 8000 params
    need = 8 * 1e6 * 8 + 16 * 8000
    tight = Predictor(_toy(), _cluster(memory=need - 1e6), hw, 8).predict(Plan(microbatch=8))
    assert not tight.fits and tight.reason.startswith("out of memory on device 0 by 0.00") and tight.memory.total == need


def test_tensor_parallel_splits_the_sharded_ops_and_repeats_the_replicated_ones():
    """Per sample 1e9 FLOPs split by TP and 2e8 replicated (a norm): at t = 2 the compute is
    1e9/2 + 2e8 per sample, exactly, where splitting everything would give 6e8."""
    block = LayerCost("blocks.0", 1000, (OpCost(1e9, 0.0), OpCost(2e8, 0.0, replicated=True)), 1e6, 1e3, tp_collectives=2)
    w = Workload("toy", (block,), seq=1, hidden=64, heads=8, weight_bytes=4)
    one = Predictor(w, _cluster(), _hw(), 8).predict(Plan(microbatch=8))
    two = Predictor(w, _cluster(), _hw(), 8).predict(Plan(tp=2, microbatch=8))
    assert one.parts["compute"] == pytest.approx(3 * 8 * 1.2e9 / 1e12)
    assert two.parts["compute"] == pytest.approx(3 * 8 * (0.5e9 + 2e8) / 1e12)


def test_kiln_tp_plans_leave_norms_residuals_embeddings_and_heads_whole():
    from kiln.plan.workload import tp_replicated

    w = load_workload("zoo:gpt", step_memory=False)
    split = {l.name: [op.replicated for op in l.ops] for l in w.layers}
    assert all(split["lm_head"]) and all(split["wte"])                  # outside any block
    assert any(split["blocks.0"]) and not all(split["blocks.0"])        # norms and adds whole, the rest split
    assert tp_replicated("blocks.0", "blocks.0.ln1") and tp_replicated("blocks.0", "blocks.0")
    assert not tp_replicated("blocks.0", "blocks.0.attn.qkv") and not tp_replicated("blocks.0", "blocks.0.mlp.0")
    assert tp_replicated("model.layers.2", "model.layers.2.post_attention_layernorm")


def test_calibrated_efficiency_reproduces_the_measured_one_device_step():
    from kiln.plan.plans import calibrated_efficiency

    w, c, hw = _toy(), _cluster(), _hw()
    roofline = Predictor(w, c, hw, 8).predict(Plan(microbatch=8)).step_s
    e = calibrated_efficiency(w, c, hw, 8, 4 * roofline)
    assert Predictor(w, c, hw, 8, e).predict(Plan(microbatch=8)).step_s == pytest.approx(4 * roofline, rel=1e-9)
    assert e == pytest.approx(0.25, rel=1e-6)       # all compute-bound: a quarter of the peak
    assert calibrated_efficiency(w, c, hw, 8, roofline / 2) == 1.0     # faster than the roofline: capped


def test_measured_engine_overhead_adds_to_its_mode_alone():
    w, c, hw = _toy(), _cluster(), _hw()
    plain = Predictor(w, c, hw, 8)
    extra = Predictor(w, c, hw, 8, overheads={"fsdp": 0.5})
    fsdp, ddp = Plan(dp=2, zero=3, microbatch=4), Plan(dp=2, microbatch=4)
    assert extra.predict(fsdp).step_s == pytest.approx(plain.predict(fsdp).step_s + 0.5)
    assert extra.predict(ddp).step_s == plain.predict(ddp).step_s


@pytest.mark.parametrize("spec", ["zoo:cnn", pytest.param("zoo:gpt", marks=pytest.mark.slow)])
def test_planner_memory_of_one_device_is_the_training_step_analysis(spec):
    """The planner's per-device memory for one device at the example batch equals kiln's
    training-step analysis (kiln.analysis.train_step) kind by kind: fp32 AdamW model states
    (4 + 4 + 8 bytes per parameter; the step counters aside) and the activations saved for
    backward, which the workload now takes from that analysis."""
    from kiln.analysis.train_step import analyze_step
    from kiln.models.spec import load

    loaded = load(spec)
    batch = loaded.example_inputs[0].shape[0]
    step = analyze_step(loaded.model, tuple(loaded.example_inputs))
    w = load_workload(spec)
    memory = Predictor(w, _cluster(), _hw(), batch).predict(Plan(microbatch=batch)).memory
    kinds = step.memory.max_by_kind
    assert memory.weights == kinds.weights and memory.gradients == kinds.gradients
    assert memory.optimizer == kinds.optimizer_states - step.memory.counter_bytes
    assert memory.activations == pytest.approx(kinds.activations, rel=1e-12)
    assert "training step" in w.source


def test_enumeration_covers_each_2d_layout_once_per_variant():
    plans = enumerate_plans(8, 16)
    assert all(p.devices == 8 and sum(d > 1 for d in (p.dp, p.tp, p.pp)) <= 2 for p in plans)
    assert all(p.dp * p.microbatch * p.microbatches == 16 for p in plans)
    layouts = {(p.dp, p.tp, p.pp) for p in plans}
    assert (8, 1, 1) in layouts and (1, 8, 1) in layouts and (2, 4, 1) in layouts and (2, 1, 4) in layouts
    assert not any(p.pp > 1 and p.zero > 1 for p in plans)


def test_tp_that_does_not_divide_the_heads_is_rejected_by_name():
    w = _toy()
    pred = Predictor(w, _cluster(), _hw(), 6).predict(Plan(tp=3, microbatch=6))
    assert "does not divide the heads 8" in pred.reason
    assert rank([pred]).rejected[0].reason == pred.reason


def test_every_builtin_cluster_loads_with_a_source_for_each_figure():
    names = set(available())
    assert {"dgx-a100", "dgx-h100", "dgx-a100-ib", "dgx-h100-ib", "tpu-v4-slice", "local"} <= names
    for name in names:
        c = load_cluster(name)
        assert c.config.device_memory > 0 and c.max_devices >= c.config.devices_per_node


def test_multi_node_groups_cross_the_network():
    c = load_cluster("dgx-a100-ib")
    assert c.link(8, 1).bandwidth == 300e9          # one node: NVLink
    assert c.link(2, 8).bandwidth == 25e9           # a stride of a node: InfiniBand


def test_unknown_cluster_names_the_known_ones():
    with pytest.raises(KilnError, match="unknown cluster profile 'nope'.*dgx-a100"):
        load_cluster("nope")


def test_train_command_and_launch_scripts():
    plan = Plan(dp=4, tp=4, zero=3, microbatch=2, microbatches=2)
    args = train_args("zoo:gpt", plan, 16, 8)
    assert args[:8] == ["kiln", "train", "zoo:gpt", "--out", "runs/plan", "--parallel", "fsdp,tp", "--nproc"]
    assert args[8] == "8" and "--mesh" in args and args[args.index("--mesh") + 1] == "4x4"
    assert args[args.index("--nnodes") + 1] == "2"
    slurm = script(Emit.SLURM, args, plan, 8, "test", hours=1.0)
    assert "#SBATCH --nodes=2" in slurm and "--node-rank \"$SLURM_NODEID\"" in slurm and "#SBATCH --time=01:27:00" in slurm
    torchrun = script(Emit.TORCHRUN, args, plan, 8, "test")
    assert '--rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"' in torchrun


def test_cli_best_plan_and_script(tmp_path):
    from typer.testing import CliRunner

    from kiln.cli.main import app

    out = tmp_path / "launch.sh"
    result = CliRunner().invoke(app, ["plan", GPT3_175B, "--cluster", "dgx-a100-ib", "--devices", "64",
                                      "--global-batch", "64", "--seq", "2048", "--steps", "10", "--emit", "torchrun",
                                      "--script", str(out), "--json", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    import json
    data = json.loads((tmp_path / "plan.json").read_text())
    best = data["best"]
    assert best["fits"] and best["step_s"] == min(p["step_s"] for p in data["fitting"])
    assert best["memory_bytes"]["total"] <= 85899345920.0
    assert all(r["reason"] for r in data["rejected"])
    assert "kiln train" in out.read_text() and best["usd"] > 0


def test_calibration_fits_small_and_large_messages_apart_exactly():
    from kiln.plan.calibrate import FIT_SIZES, SPLIT_BYTES, fit_all

    # a backend with 50 us + 1 GB/s up to the split and 4 GB/s from it on, continuous there
    large_latency = 5e-5 + SPLIT_BYTES / 1e9 - SPLIT_BYTES / 4e9

    def t(s):
        return 5e-5 + s / 1e9 if s <= SPLIT_BYTES else large_latency + s / 4e9
    ops = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p")
    fitted = fit_all({2: {op: {s: t(s) for s in FIT_SIZES} for op in ops}})
    fit = fitted["p2p"].fits(Collective.P2P)[0]   # p2p: 1 step, bus factor 1
    assert fit.pair(1e3) == pytest.approx((5e-5, 1e9), rel=1e-6)
    assert fit.pair(1e7) == pytest.approx((large_latency, 4e9), rel=1e-6)
    # the profile keeps a collective's whole latency at n; its fits hold the per-step share
    ar = fitted["all_reduce"]
    assert ar.small_latency_s[0] == pytest.approx(5e-5, rel=1e-6)
    assert ar.fits(Collective.ALL_REDUCE)[0].small_latency_s == pytest.approx(5e-5 / 2, rel=1e-6)
    assert load_cluster("local").time(Collective.ALL_REDUCE, 1e6, 2) > 0     # stored profiles still read


PLAIN = """
import torch
from torch import nn

def plain():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    return model, (torch.randn(1, 1, 8, 8),)
"""


@pytest.mark.distributed
def test_emitted_torchrun_script_on_two_nodes_matches_one_process(tmp_path):
    """Two "nodes" on 127.0.0.1, each running the emitted torchrun script with its NODE_RANK,
    end with the parameters of one process training the same global batches."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file

    from kiln.train.config import TrainConfig
    from kiln.train.trainer import fit

    (tmp_path / "m.py").write_text(PLAIN)
    spec = f"py:{tmp_path / 'm.py'}:plain"
    steps = ["--dataset", "digits", "--epochs", "1", "--max-steps", "4", "--seed", "0", "--optimizer", "sgd",
             "--lr", "0.05", "--threads", "1"]
    plan = Plan(dp=2, microbatch=16)
    args = train_args(spec, plan, 32, devices_per_node=1, out=str(tmp_path / "two")) + steps
    help_text = subprocess.run([sys.executable, "-m", "kiln.cli.main", "train", "--help"], capture_output=True, text=True).stdout
    if "--parallel" not in help_text:   # before the parallel modes land, DDP is what --nproc > 1 runs
        i = args.index("--parallel")
        del args[i:i + 2]
    args[0:1] = [sys.executable, "-m", "kiln.cli.main"]
    path = tmp_path / "launch.sh"
    path.write_text(script(Emit.TORCHRUN, args, plan, 1, "test"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    nodes = [subprocess.Popen(["bash", str(path)], env=env | {"NODE_RANK": str(r)}, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    outputs = [n.communicate(timeout=500)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outputs
    fit(TrainConfig(model=spec, dataset="digits", out=str(tmp_path / "one"), epochs=1, max_steps=4, seed=0,
                    optimizer="sgd", lr=0.05, batch_size=32, threads=1), progress=False)
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "two" / "last.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


@pytest.mark.distributed
def test_engine_overheads_are_measured_on_one_process_against_ddp():
    from kiln.plan.overhead import engine_overheads

    got = engine_overheads("zoo:gpt", {"ddp": 2, "fsdp": 2}, rounds=3)
    assert set(got["overhead_s"]) == {"ddp", "fsdp"} and got["overhead_s"]["ddp"] == 0.0
    assert got["overhead_s"]["fsdp"] >= 0 and set(got["median_s"]) == {"ddp@2", "fsdp@2"}


@pytest.mark.distributed
def test_calibration_measures_gloo_and_saves_a_loadable_local_profile(tmp_path, monkeypatch):
    from kiln.plan.calibrate import calibrate
    from kiln.plan.cluster import save_cluster

    monkeypatch.setenv("KILN_HOME", str(tmp_path))
    profile, raw = calibrate((2,), sizes=(1 << 10, 16 << 10, 256 << 10, 1 << 20))
    assert set(raw[2]) == {"all_reduce", "all_gather", "reduce_scatter", "broadcast", "p2p"}
    assert all(t > 0 for per in raw[2].values() for t in per.values())
    loaded = load_cluster(str(save_cluster(profile)))       # every figure has its source
    assert loaded.config.collectives["all_reduce"].processes == (2,)
    assert loaded.time(Collective.ALL_REDUCE, 1 << 20, 2) > 0
    # the contention of 2 processes computing at once, measured beside them (never below alone)
    assert loaded.config.contention.processes == (2,) and loaded.slowdown(2) >= 1.0 == loaded.slowdown(1)
    assert raw["contention"]["alone_s"] > 0 and raw["contention"]["together_s"][2] > 0


def test_cost_bills_whole_instances_and_the_deadline_picks_the_cheapest_in_time():
    from kiln.plan.prices import instance_for, instances
    from kiln.plan.run import PlanConfig, plan

    table = instances()
    assert len({i.name for i in table if i.device in ("a100", "h100", "a100-40gb")}) >= 6
    assert all(i.published and i.source.startswith("https://") for i in table)
    lam = instance_for("a100")
    assert lam.usd_per_hour / lam.devices == min(i.usd_per_hour / i.devices for i in table if i.device == "a100")
    assert lam.cost(9, 2.0) == 2 * lam.usd_per_hour * 2.0            # 9 GPUs: two 8-GPU instances
    work = _toy(16)
    steps = 1000
    # brute force over the device counts the search considers (8, 4, 2, 1): the cheapest in time
    report = plan(PlanConfig("toy", "dgx-a100-ib", 8, global_batch=64, steps=steps, deadline_h=1e-2), work)
    cands = []
    for n in (8, 4, 2, 1):
        sub = plan(PlanConfig("toy", "dgx-a100-ib", n, global_batch=64, steps=steps), work)
        cands += [(lam.cost(n, steps * p.step_s / 3600), p.step_s) for p in sub.ranking.fitting
                  if steps * p.step_s / 3600 <= 1e-2]
    best = report.cheapest
    assert best is not None and report.dollars(best) == pytest.approx(min(cands)[0])
    assert report.hours(best) <= 1e-2
