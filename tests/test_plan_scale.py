"""The planner at scale: presets planned without weights (meta device), the step-time model of
processes that share a machine's cores, and ZeRO-1's per-parameter broadcasts."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from kiln.plan.workload import load_workload

# Llama 3 8B's architecture (GQA, SwiGLU, RMSNorm, untied head) at a width a test can build
SMALL_LLAMA = ("preset:llama3-8b?hidden_size=64&intermediate_size=128&num_attention_heads=4"
               "&num_key_value_heads=2&vocab_size=256")


def _blocks(w):
    return [layer for layer in w.layers if layer.name.rsplit(".", 1)[-1].isdigit()]


def test_a_preset_too_big_for_memory_is_planned_on_the_meta_device_without_weights(monkeypatch):
    """`preset:llama3-70b` at one layer still has 2.1 B parameters of embedding and head (8.4
    GB of fp32): the planner builds it on the meta device, as `kiln analyze` does, and never
    calls the loader outside it (the preset's own guard would refuse if it did)."""
    import kiln.models.meta as meta

    real = meta.load

    def only_meta(spec):
        assert torch.get_default_device().type == "meta", f"{spec} built with weights"
        return real(spec)

    monkeypatch.setattr(meta, "load", only_meta)
    w = load_workload("preset:llama3-70b?num_hidden_layers=1", seq=64)
    h, f, v, kv = 8192, 28672, 128256, 8 * 128
    block = 2 * h * h + 2 * h * kv + 3 * h * f + 2 * h        # q, o, k, v; SwiGLU; two RMSNorms
    assert w.params == 2 * v * h + block + h                    # embedding, untied head, final norm
    assert [layer.params for layer in _blocks(w)] == [block]
    assert w.seq == 64 and "meta device" in w.source and "training step" in w.source


def test_a_preset_plan_equals_the_same_config_built_small_scaled_per_layer():
    """The plan of 4 layers equals the plan of the same config captured at 2 layers with its
    blocks repeated: every block costs the same, so the per-layer figures scale exactly, and
    the planner's memory and step time follow."""
    from kiln.hardware.profiles import load_profile
    from kiln.plan.cluster import load_cluster
    from kiln.plan.plans import Plan, Predictor, Schedule

    four = load_workload(SMALL_LLAMA + "&num_hidden_layers=4", seq=32, meta=True)
    two = load_workload(SMALL_LLAMA + "&num_hidden_layers=2", seq=32, meta=True)
    b2, b4 = _blocks(two), _blocks(four)
    assert len(b4) == 4 and all(replace(b, name="") == replace(b2[0], name="") for b in b2 + b4)
    last = two.layers.index(b2[-1]) + 1       # the blocks repeated where they stand, in order
    scaled = replace(two, layers=two.layers[:last] + tuple(replace(b, name=f"{b.name}'") for b in b2) + two.layers[last:])
    assert [l.name for l in four.layers if l not in b4] == [l.name for l in two.layers if l not in b2]
    cluster, hw = load_cluster("dgx-h100"), load_profile("h100")
    for plan in (Plan(dp=8, zero=3, microbatch=2), Plan(tp=2, pp=2, microbatch=1, microbatches=4,
                                                        schedule=Schedule.ONE_F_ONE_B)):
        a = Predictor(four, cluster, hw, 16).predict(plan)
        b = Predictor(scaled, cluster, hw, 16).predict(plan)
        assert a.memory == b.memory and a.step_s == pytest.approx(b.step_s, rel=1e-12)


def test_a_model_planned_without_weights_equals_the_model_with_them():
    """Shapes are all the planner reads: zoo:cnn on the meta device (its training step traced
    on fake tensors) gives its workload with weights exactly, the saved activations included."""
    real = load_workload("zoo:cnn", meta=False)
    ghost = load_workload("zoo:cnn", meta=True)
    assert "meta device" in ghost.source and "training step" in ghost.source
    assert ghost.layers == real.layers and ghost.params == real.params


# -- the step-time model: processes sharing the cores, ZeRO-1's broadcasts ---------------------


def _shared(contention=None, latency: float = 0.0, bandwidth: float = 1e30):
    from kiln.plan.cluster import Cluster, ClusterConfig, LinkConfig, Precision

    return Cluster(ClusterConfig("shared", "", "cpu", 1e12, 4, 1, Precision.FP32, LinkConfig(latency, bandwidth),
                                 share_node=True, contention=contention))


def _flat_hw():
    from kiln.hardware.profiles import HardwareProfile

    return HardwareProfile("flat", "", "cpu", {"fp32": 1e12}, 1e30)


def _toy(tensors=(600, 300, 100)):
    from kiln.plan.workload import LayerCost, OpCost, Workload

    blocks = tuple(LayerCost(f"blocks.{i}", sum(tensors), (OpCost(1e9, 0.0),), 1e6, 1e3, tensors=tensors)
                   for i in range(4))
    return Workload("toy", blocks, seq=1, weight_bytes=4)


def test_contention_is_measured_at_its_counts_and_linear_between():
    from kiln.plan.cluster import ContentionConfig

    c = ContentionConfig((2, 4), (1.5, 2.5))
    assert [c.at(n) for n in (1, 2, 3, 4, 8)] == [1.0, 1.5, 2.0, 2.5, 2.5]
    with pytest.raises(ValueError):
        ContentionConfig((1,), (1.0,))


def test_processes_computing_at_once_divide_peak_and_bandwidth_by_the_slowdown():
    """Compute and the optimizer's memory traffic take `slowdown` times as long with 2
    processes at once, the engine overhead measured alone too; one process alone (what the
    efficiency is calibrated on) is untouched; communication is not compute."""
    from kiln.plan.cluster import ContentionConfig
    from kiln.plan.plans import Plan, Predictor

    w, hw = _toy(), _flat_hw()
    plain = Predictor(w, _shared(), hw, 8, overheads={"ddp": 0.01})
    slow = Predictor(w, _shared(ContentionConfig((2,), (1.25,))), hw, 8, overheads={"ddp": 0.01})
    one = Plan(microbatch=8)
    assert slow.predict(one).step_s == plain.predict(one).step_s
    a, b = plain.predict(Plan(dp=2, microbatch=4)), slow.predict(Plan(dp=2, microbatch=4))
    for part in ("compute", "optimizer", "framework"):
        assert b.parts[part] == pytest.approx(1.25 * a.parts[part], rel=1e-12)
    assert b.parts["framework"] == pytest.approx(0.0125, rel=1e-12) and b.parts["dp"] == a.parts["dp"]


def test_zero1_adds_one_exposed_broadcast_per_parameter_tensor_to_ddps_all_reduce():
    """kiln's zero1 (ZeroRedundancyOptimizer under DDP): DDP's gradient all-reduce, then each
    parameter tensor broadcast from its owner: binomial broadcast log2(n) (alpha + S/B) per
    tensor (Thakur et al. 2005), on a 2-process group 1 step each."""
    from kiln.plan.plans import Plan, Predictor

    alpha, bw = 1e-3, 1e9
    w, hw = _toy(), _flat_hw()
    p = Predictor(w, _shared(latency=alpha, bandwidth=bw), hw, 8)
    ddp, zero1 = p.predict(Plan(dp=2, microbatch=4)), p.predict(Plan(dp=2, zero=1, microbatch=4))
    grads = 4 * w.params
    all_reduce = min(2 * alpha + grads / bw, 2 * (alpha + grads / bw))   # ring or tree, the faster
    broadcasts = sum(alpha + 4 * n / bw for layer in w.layers for n in layer.param_tensors)
    assert ddp.parts["dp"] == pytest.approx(all_reduce, rel=1e-12)
    assert zero1.parts["dp"] == pytest.approx(all_reduce + broadcasts, rel=1e-12)
    assert broadcasts == pytest.approx(12 * alpha + 4 * w.params / bw, rel=1e-12)


def test_parameter_tensors_are_counted_from_the_model_and_the_formula_alike():
    """The workload's tensors are the model's parameters one by one (the captured zoo:cnn), and
    the closed form's per-block list sums to its parameter formula (checked against the built
    hf-config:gpt2 by test_plan's formula test)."""
    from kiln.models.spec import load
    from kiln.plan.workload import TransformerShape, transformer

    w = load_workload("zoo:cnn", step_memory=False)
    assert sorted(n for layer in w.layers for n in layer.param_tensors) == \
        sorted(p.numel() for p in load("zoo:cnn").model.parameters())
    for gated, bias in ((False, True), (True, False)):
        f = transformer(TransformerShape(3, 64, 4, 100, 16, 128, 32, gated=gated, kv_heads=2, bias=bias), "t")
        assert all(sum(layer.param_tensors) == layer.params for layer in f.layers if layer.params)
