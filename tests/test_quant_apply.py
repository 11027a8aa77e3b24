"""Quantizing modules: wrappers, rules, calibration, LSQ, attention, reports, runs on disk.

Oracles: scales and rounding written out by hand with torch ops, eager attention, exact
reload of saved runs."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from safetensors.torch import load_file
from torch.nn import functional as F

from kiln.errors import KilnError
from kiln.quant.apply import calibrate, quantize, report
from kiln.quant.config import parse_config
from kiln.quant.modules import QuantOp


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def test_int8_per_channel_weight_matches_hand_rounding():
    m = _mlp()
    w = m[0].weight.detach().clone()
    quantize(m, parse_config({"weight": "int8"}))
    scale = w.abs().amax(1, keepdim=True) / 127
    expected = torch.clamp(torch.round(w / scale), -127, 127) * scale
    assert torch.equal(m[0].quantized_weight(), expected)
    x = torch.randn(3, 16)
    assert torch.allclose(m[0](x), F.linear(x, expected, m[0].bias), atol=1e-6)


def test_group_scales_and_asymmetric_zero_point():
    m = _mlp()
    w = m[0].weight.detach().clone()
    quantize(m, parse_config({"weight": {"format": "int", "bits": 4, "granularity": "group", "group_size": 8,
                                         "symmetric": False}}))
    g = w.reshape(32, 2, 8)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / 15
    zp = torch.round(-8 - lo / scale).clamp(-8, 7)
    expected = ((torch.clamp(torch.round(g / scale) + zp, -8, 7) - zp) * scale).reshape(32, 16)
    assert torch.allclose(m[0].quantized_weight(), expected, atol=1e-7)


def test_calibrated_input_scale_is_minmax_over_batches():
    m = _mlp()
    quantize(m, parse_config({"input": {"format": "int", "bits": 8}}))
    batches = [torch.randn(4, 16) * (i + 1) for i in range(3)]
    calibrate(m, batches, lambda mod, b: mod(b))
    amax = max(b.abs().max() for b in batches)
    assert torch.allclose(m[0].input_q.scale, amax / 127)


def test_percentile_calibration_clips_to_the_quantile():
    m = _mlp()
    quantize(m, parse_config({"input": {"format": "int", "bits": 8, "calib": "percentile", "percentile": 99.0}}))
    x = torch.randn(64, 16)
    calibrate(m, [x], lambda mod, b: mod(b))
    hi = torch.quantile(x.reshape(-1), 0.99)
    lo = torch.quantile(x.reshape(-1), 0.01)
    assert torch.allclose(m[0].input_q.scale, torch.maximum(hi, -lo) / 127)


def test_mse_calibration_is_no_worse_than_minmax():
    x = torch.randn(4096)
    x[0] = 40.0                                     # one outlier: min-max wastes the grid on it
    errs = {}
    for calib in ("minmax", "mse"):
        m = _mlp()
        quantize(m, parse_config({"input": {"format": "int", "bits": 4, "calib": calib}}))
        calibrate(m, [x.reshape(256, 16)], lambda mod, b: mod(b))
        errs[calib] = (m[0].input_q(x.reshape(256, 16)) - x.reshape(256, 16)).pow(2).sum()
    assert errs["mse"] < errs["minmax"] * 0.5


def test_rules_most_specific_wins_and_skip():
    m = nn.Sequential()
    m.add_module("enc", nn.Linear(8, 8))
    m.add_module("head", nn.Linear(8, 2))
    m.add_module("emb", nn.Embedding(10, 8))
    cfg = parse_config({"weight": "int8", "rules": [
        {"match": "fqn:enc", "weight": "int4"},
        {"match": "re:e.*", "weight": "int6"},
        {"match": "type:Embedding", "weight": "int2"},
        {"match": "re:head", "skip": True},
    ]})
    quantize(m, cfg)
    assert m.enc.weight_q.spec.format.bits == 4          # fqn beats re
    assert m.emb.weight_q.spec.format.bits == 6          # re beats type
    assert isinstance(m.head, nn.Linear)                 # skipped


def test_rule_matching_nothing_and_bad_keys_are_errors():
    with pytest.raises(KilnError, match="matches no quantizable module"):
        quantize(_mlp(), parse_config({"weight": "int8", "rules": [{"match": "fqn:nope", "skip": True}]}))
    with pytest.raises(KilnError, match="unknown key 'wieght'"):
        parse_config({"wieght": "int8"})
    with pytest.raises(KilnError, match="unknown format 'int99'"):
        parse_config({"weight": "int99"})
    with pytest.raises(KilnError, match="granularity must be one of"):
        parse_config({"weight": {"format": "int", "bits": 8, "granularity": "row"}})
    with pytest.raises(KilnError, match="group_size 5 does not divide"):
        quantize(_mlp(), parse_config({"weight": {"format": "int", "bits": 4, "granularity": "group", "group_size": 5}}))


def test_lsq_scale_gradient_is_the_papers_closed_form():
    """Esser et al. 2020 (LSQ), eq. 3: d w_hat / d s = round(w/s) - w/s inside the grid, -Qn or
    Qp where w/s is clipped, times the gradient scale g = 1 / sqrt(N * Qp) (section 2.2); the
    weight gets the straight-through gradient, 1 inside the grid and 0 where it is clipped."""
    m = nn.Sequential(nn.Linear(6, 1, bias=False))
    quantize(m, parse_config({"weight": {"format": "int", "bits": 4, "granularity": "tensor", "learnable": True}}))
    wq = m[0].weight_q
    assert isinstance(wq.scale, nn.Parameter) and (wq.spec.format.qmin, wq.spec.format.qmax) == (-7, 7)
    w = torch.tensor([[0.3, -0.7, 1.9, 5.0, 6.0, -5.0]])
    with torch.no_grad():
        m[0].module.weight.copy_(w)
        wq.scale.fill_(0.5)
    wq.calibrated = True
    m.train()
    wq(m[0].module.weight).sum().backward()
    # w/s = 0.6, -1.4, 3.8 inside; 10 and 12 clipped to Qp = 7; -10 clipped to -Qn = -7
    per_weight = [1 - 0.6, -1 + 1.4, 4 - 3.8, 7, 7, -7]
    expected = sum(per_weight) / (6 * 7) ** 0.5
    assert wq.scale.grad.item() == pytest.approx(expected, rel=1e-6)
    assert m[0].module.weight.grad.tolist() == [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0]]


def test_conv_and_embedding_wrappers_match_eager_at_16_bits():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(3, 4, 3))
    ref = copy.deepcopy(m)
    quantize(m, parse_config({"weight": "int16", "input": "int16"}))
    x = torch.randn(2, 3, 9)
    calibrate(m, [x], lambda mod, b: mod(b))
    assert torch.allclose(m(x), ref(x), atol=1e-3)
    emb = nn.Sequential(nn.Embedding(20, 8))
    ref_e = copy.deepcopy(emb)
    quantize(emb, parse_config({"targets": ["Embedding"], "weight": "int16"}))
    ids = torch.tensor([[1, 5, 19]])
    assert torch.allclose(emb(ids), ref_e(ids), atol=1e-3)


def test_attention_matmuls_quantized_zoo_and_hf():
    from kiln.models.zoo.layers import Block

    torch.manual_seed(0)
    blk = Block(32, 4, causal=True).eval()
    ref = copy.deepcopy(blk)
    x = torch.randn(2, 7, 32)
    quantize(blk, parse_config({"targets": ["attention"], "attention": "int16"}))
    assert blk.attn.kiln_attention is not None
    calibrate(blk, [x], lambda mod, b: mod(b))
    assert torch.allclose(blk(x), ref(x), atol=2e-3)          # 16 bits: eager attention's answer
    coarse = copy.deepcopy(ref)
    quantize(coarse, parse_config({"targets": ["attention"], "attention": "int4"}))
    calibrate(coarse, [x], lambda mod, b: mod(b))
    assert (coarse(x) - ref(x)).abs().max() > 1e-2            # 4 bits: the quantizers really act

    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16)
    bert = BertModel(cfg).eval()
    hf_ref = copy.deepcopy(bert)
    ids = torch.randint(0, 50, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    quantize(bert, parse_config({"targets": ["attention"], "attention": "int16"}))
    calibrate(bert, [(ids, mask)], lambda mod, b: mod(input_ids=b[0], attention_mask=b[1]))
    got = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    want = hf_ref(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(got, want, atol=2e-3)


def test_report_bits_bytes_and_sqnr():
    m = _mlp()
    ref = copy.deepcopy(m)
    quantize(m, parse_config({"weight": "int4", "rules": [{"match": "fqn:2", "weight": "int8"}]}))
    x = torch.randn(8, 16)
    rep = report(ref, m, lambda mod: mod(x))
    assert rep["avg_weight_bits"] == pytest.approx((4 * 512 + 8 * 128) / 640)
    # weights at 4 and 8 bits, biases fp32, one fp32 scale per output channel
    assert rep["model_bytes"] == (4 * 512 + 8 * 128 + 32 * (32 + 4) + 32 * (32 + 4)) // 8
    w = m[0].module.weight
    wq = m[0].quantized_weight()
    sq = 10 * torch.log10(w.pow(2).sum() / (w - wq).pow(2).sum())
    assert rep["layers"][0]["weight_sqnr_db"] == pytest.approx(sq.item(), rel=1e-5)


def _kiln(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kiln.cli.main", *args], capture_output=True, text=True, cwd=cwd)


def test_quantize_run_saves_and_reloads_exactly(tmp_path):
    from kiln.runs.artifact import load_artifact
    from kiln.quant.run import quantize_run

    table = {"weight": {"format": "int", "bits": 4}, "input": {"format": "int", "bits": 8, "calib": "percentile"}}
    out = tmp_path / "run"
    res = quantize_run("zoo:mlp", parse_config(table), out, "mnist", calib_batches=2, batch_size=16)
    again = load_artifact(out)
    (record,) = [t.to_json() for t in again.transforms]
    assert (record["kind"], record["version"], record["config"]["smoothed"]) == ("quant", 1, [])
    assert parse_config(record["config"]["quant"]) == parse_config(table)
    x = torch.rand(5, 1, 28, 28)
    assert torch.equal(again.model(x), res["model"].eval()(x))
    r = _kiln("eval", str(out))
    assert r.returncode == 0 and "reproduced" in r.stdout
    assert json.loads((out / "report.json").read_text())["avg_weight_bits"] == 4.0
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"metric", "split", "before", "after"} <= set(metrics) and "after_finetune" not in metrics


def test_qat_from_a_quantized_run_keeps_its_quantizers_and_reloads(tmp_path):
    """`kiln train --init QUANTIZED` trains the quantized model (QAT) and writes a run whose
    transforms are the quantized run's; reloading it gives the trained model exactly."""
    from kiln.quant.run import quantize_run
    from kiln.runs.artifact import load_artifact
    from kiln.train.config import TrainConfig
    from kiln.train.trainer import fit

    torch.set_num_threads(1)
    quantize_run("zoo:mlp", parse_config({"weight": "int8", "input": "int8"}), tmp_path / "q", "mnist",
                 calib_batches=2, batch_size=16, evaluate=False)
    fit(TrainConfig(model="zoo:mlp", dataset="mnist", init=str(tmp_path / "q"), out=str(tmp_path / "qat"),
                    epochs=1, max_steps=3, batch_size=32), progress=False)
    q, qat = load_artifact(tmp_path / "q"), load_artifact(tmp_path / "qat")
    assert qat.transforms == q.transforms and any(isinstance(m, QuantOp) for m in qat.model.modules())
    weights = load_file(tmp_path / "qat" / "model.safetensors")
    assert all(torch.equal(qat.model.state_dict()[k], v) for k, v in weights.items())
    assert any(not torch.equal(q.model.state_dict()[k], v) for k, v in weights.items())


def test_quantize_cli_bad_input_exit_2_nothing_written(tmp_path):
    cfg = tmp_path / "q.toml"
    cfg.write_text('weight = { format = "minifloat9000" }\n')
    out = tmp_path / "run"
    r = _kiln("quantize", "zoo:mlp", "--config", str(cfg), "--out", str(out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown format 'minifloat9000'" in r.stderr
    assert not out.exists()
    cfg.write_text('weight = "int8"\n')
    r = _kiln("quantize", "zoo:mlp", "--config", str(cfg), "--calib-dataset", "rotten-tomatoes", "--out", str(out))
    assert r.returncode == 2 and "does not fit the model" in r.stderr and not out.exists()


def test_smoothquant_run_reloads_exactly(tmp_path):
    """Post-LN BERT gets input-scaling Linears from SmoothQuant; a reload rebuilds them from
    the saved tensors and gives the same outputs bit for bit."""
    from transformers import BertConfig, BertModel

    from kiln.quant.apply import quant_record
    from kiln.quant.run import prepare
    from kiln.runs.weights import load_weights, save_weights

    def bert():
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=16)).eval()

    cfg = parse_config({"weight": "int8", "input": "int8", "smoothquant": {"alpha": 0.5}})
    ids = [torch.randint(0, 60, (4, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    fwd = lambda m, b: m(input_ids=b).last_hidden_state    # noqa: E731
    model = bert()
    done = prepare(model, cfg, ids, fwd)
    assert len(done["smoothquant"]["groups"]) == 5          # Q/K/V and FC1 of both layers, the pooler
    record = quant_record(model, cfg)
    assert record.config["smoothed"]                         # post-LN: some Linears scale their own input
    save_weights(model, tmp_path / "m.safetensors")
    again = record.restore(bert())
    load_weights(again, tmp_path / "m.safetensors")
    assert torch.equal(fwd(again, ids[0]), fwd(model, ids[0]))


def test_per_token_input_scales_are_computed_per_row_at_run_time():
    m = _mlp()
    quantize(m, parse_config({"input": {"format": "int", "bits": 8, "granularity": "token"}}))
    assert not hasattr(m[0].input_q, "scale")                # nothing to calibrate
    x = torch.randn(5, 16) * torch.arange(1, 6).unsqueeze(1)
    scale = x.abs().amax(1, keepdim=True) / 127
    expected = torch.clamp(torch.round(x / scale), -127, 127) * scale
    assert torch.equal(m[0].input_q(x), expected)


def test_a_block_format_skips_a_typed_module_it_cannot_block_and_refuses_a_named_one():
    # MX blocks of 32 run along the reduction axis: 16 inputs hold none, 64 hold two
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))
    mx = {"weight": "mxfp4", "input": "mxfp4", "targets": ["Linear"]}
    skipped: list[dict] = []
    quantize(model, parse_config(mx), skipped)
    assert [s["module"] for s in skipped] == ["0"] and "does not divide the last dimension (16)" in skipped[0]["reason"]
    assert type(model[0]) is nn.Linear and isinstance(model[2], QuantOp)
    x = torch.randn(3, 16)
    ref = model[2].module(F.relu(model[0](x)))
    assert not torch.equal(model(x), ref)   # the second Linear does run in MXFP4
    with pytest.raises(KilnError, match="does not divide the last dimension"):
        quantize(nn.Sequential(nn.Linear(16, 64)), parse_config(mx | {"rules": [{"match": "fqn:0", "weight": "mxfp4"}]}))
    with pytest.raises(KilnError, match="the format fits no module it selects"):
        quantize(nn.Sequential(nn.Linear(16, 4)), parse_config(mx))
