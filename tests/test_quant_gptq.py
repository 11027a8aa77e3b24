"""GPTQ and SmoothQuant against their oracles: RTN where GPTQ must reduce to it, a sequential
Optimal Brain Surgeon loop with explicit inverse updates (the maths GPTQ reorganises), the
layer objective, the int grid, and the fp32 model's own outputs for SmoothQuant."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kiln.errors import KilnError
from kiln.models.zoo.gpt import GPT, GPTConfig
from kiln.models.zoo.layers import Block
from kiln.quant.formats import parse_format
from kiln.quant.config import GPTQConfig, parse_config
from kiln.quant.gptq import collect_hessians, gptq, gptq_linear, grid_params, output_error, rtn, rtn_linear
from kiln.quant.smoothquant import SmoothedLinear, Unfoldable, fake_quant_linears, outlier_ratio, smooth


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """Inputs with strongly correlated channels and uneven variances, as real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5
    return torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3.0, d) + 0.05 * torch.randn(n, d, generator=g)


def hessian(x: torch.Tensor) -> torch.Tensor:
    return 2 * x.double().T @ x.double() / x.shape[0]


@pytest.mark.parametrize("fmt", ["int4", "uint4", "int3"])
@pytest.mark.parametrize("group", [0, 16, 64])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_identity_hessian_is_rtn(fmt, group, act_order):
    # with H = I no column informs another: every OBS update is exactly zero
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    a, b = gptq_linear(w, torch.eye(64), fmt, group, block=32, act_order=act_order), rtn_linear(w, fmt, group)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    assert torch.equal(a.group_index, b.group_index)


def sequential_obs(w: torch.Tensor, H: torch.Tensor, fmt, group: int, percdamp: float = 0.01) -> torch.Tensor:
    """Reference: quantize column j, move its error onto columns > j with the explicit inverse
    Hessian, then remove j from the inverse (the OBS downdate), all in float64."""
    W = w.double().clone()
    Hd = H.double().clone()
    Hd.diagonal().add_(percdamp * Hd.diagonal().mean())
    Hinv = torch.linalg.inv(Hd)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        if j % group == 0:
            scale, zero = grid_params(W[:, j:j + group].float(), fmt)
        Q[:, j] = fmt.quantize(W[:, j:j + 1].float(), scale, zero)[:, 0].double()
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j:] -= err[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / Hinv[j, j]
    return Q.float()


@pytest.mark.parametrize("group", [8, 64])
def test_gptq_equals_sequential_obs(group):
    # Cholesky rows and lazy block updates (block 16 < 64 columns) reorganise the same maths
    x = correlated_inputs(512, 64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    fmt = parse_format("int4")
    got = gptq_linear(w, hessian(x), fmt, group, block=16).weight
    want = sequential_obs(w, hessian(x), fmt, group)
    agree = (torch.isclose(got, want, atol=1e-6)).float().mean()
    assert agree > 0.99   # float32 vs float64 may flip a rare near-tie
    assert output_error(w, got, hessian(x)) == pytest.approx(output_error(w, want, hessian(x)), rel=0.02)


@pytest.mark.parametrize("fmt,group,act_order", [("int4", 0, False), ("int4", 32, False), ("int4", 32, True),
                                                 ("int3", 16, True), ("uint4", 32, False)])
def test_gptq_beats_rtn_and_stays_on_the_grid(fmt, group, act_order):
    x = correlated_inputs(1024, 96)
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(3)) * 0.1
    f = parse_format(fmt)
    q, r = gptq_linear(w, hessian(x), f, group, act_order=act_order), rtn_linear(w, f, group)
    err = lambda wq: float(((x @ w.T - x @ wq.T) ** 2).sum())  # noqa: E731
    assert err(q.weight) < 0.8 * err(r.weight)
    # each weight is an integer times its group's scale (minus the zero point), within range
    ratio = q.weight / q.scale[:, q.group_index]
    if q.zero_point is not None:
        ratio = ratio + q.zero_point[:, q.group_index]
    assert torch.allclose(ratio, ratio.round(), atol=1e-4)
    assert ratio.round().min() >= f.qmin and ratio.round().max() <= f.qmax
    # a group holds exactly `group` columns (act_order groups are permuted, not resized)
    counts = torch.bincount(q.group_index)
    assert (counts[:-1] == (group or 96)).all()


def test_dead_inputs_get_zero_weight():
    x = correlated_inputs(256, 32)
    x[:, [3, 17]] = 0.0
    w = torch.randn(8, 32)
    q = gptq_linear(w, hessian(x), "int4", 16, act_order=True)
    assert torch.isfinite(q.weight).all()
    assert (q.weight[:, [3, 17]] == 0).all()
    assert output_error(w, q.weight, hessian(x)) < output_error(w, rtn_linear(w, "int4", 16).weight, hessian(x))


def test_bad_settings_are_errors():
    model, batches = tiny_gpt(), [torch.randint(0, 40, (2, 16))]
    with pytest.raises(KilnError, match="group_size"):
        gptq(model, batches, config=GPTQConfig(group_size=-1))
    with pytest.raises(KilnError, match="unknown format"):
        gptq(model, batches, fmt="int99")
    with pytest.raises(KilnError, match="alpha"):
        smooth(model, batches, alpha=1.5)


def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)).eval()


def test_model_gptq_is_sequential_over_blocks():
    model, batches = tiny_gpt(), [torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(i))
                                  for i in range(3)]
    # oracle: the same procedure spelled out with the public pieces, block by block
    expected = tiny_gpt()
    forward = lambda m, b: m(b)  # noqa: E731
    for blk in ("blocks.0", "blocks.1"):
        names = [f"{blk}.{n}" for n in ("attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
        hs = collect_hessians(expected, names, batches, forward)
        for n in names:
            lin = expected.get_submodule(n)
            lin.weight.data = gptq_linear(lin.weight, hs[n], "int4", 16).weight
    report = gptq(model, batches, forward, "int4", GPTQConfig(group_size=16))
    assert [layer["stage"] for layer in report["layers"]] == ["blocks.0"] * 4 + ["blocks.1"] * 4
    assert report["skipped"] == {"lm_head": "weight tied to wte.weight"}
    for name, p in expected.named_parameters():
        assert torch.equal(p, model.get_parameter(name)), name
    assert all(layer["error"] < layer["rtn_error"] for layer in report["layers"])
    with pytest.raises(KilnError, match="shares its weight"):
        gptq(tiny_gpt(), batches, forward, modules=["lm_head"])


def test_quant_config_gptq_keeps_its_weights_on_the_quantizer_grid():
    from kiln.quant.modules import QuantOp
    from kiln.quant.run import prepare

    model, reference = tiny_gpt(), tiny_gpt()
    batches = [torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    weight = {"format": "int", "bits": 4, "granularity": "group", "group_size": 16}
    done = prepare(model, parse_config({"weight": weight, "gptq": {}}), batches)
    gptq(reference, batches, fmt="int4", config=GPTQConfig(group_size=16))
    ops = {n: m for n, m in model.named_modules() if isinstance(m, QuantOp) and n != "lm_head"}
    assert len(done["gptq"]["layers"]) == 8 and len(ops) == 8
    assert done["gptq"]["skipped"] == {"lm_head": "weight tied to wte.weight"}
    for name, op in ops.items():   # re-quantizing GPTQ's weights on its own scales changes nothing
        assert torch.allclose(op.quantized_weight(), reference.get_submodule(name).weight, atol=1e-6), name
    with pytest.raises(KilnError, match="group_size comes from the weight quantizer"):
        parse_config({"weight": "int4", "gptq": {"group_size": 16}})


def test_model_rtn_matches_rtn_linear():
    model, ref = tiny_gpt(), tiny_gpt()
    rtn(model, "int4", 16)
    w = ref.blocks[1].mlp[2].weight
    assert torch.equal(model.blocks[1].mlp[2].weight, rtn_linear(w, "int4", 16).weight)
    assert torch.equal(model.wte.weight, ref.wte.weight)   # the tied head (and embedding) untouched


# ---------------------------------------------------------------------------------------------
# SmoothQuant


class Blocks(nn.Module):
    """Two pre-LN blocks with outlier channels planted in the LayerNorm outputs."""

    def __init__(self, dim: int = 32, outliers: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(Block(dim, 2, causal=True), Block(dim, 2))
        if outliers:
            with torch.no_grad():
                for b in self.blocks:
                    b.ln1.weight[:3] *= 30.0
                    b.ln2.weight[[5, 20]] *= 20.0

    def forward(self, x):
        return self.blocks(x)


def linear_input_absmax(model, names, batches):
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen.__setitem__(n, torch.maximum(seen.get(n, torch.zeros(a[0].shape[-1])),
                                                            (a[0] * getattr(m, "inv_scale", 1.0)).abs()
                                                            .reshape(-1, a[0].shape[-1]).amax(0)))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return seen


def test_smooth_keeps_fp32_outputs_and_evens_channels():
    model = Blocks()
    batches = [torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    x = torch.randn(4, 8, 32)
    with torch.no_grad():
        ref = model(x)
    names = ["blocks.0.attn.qkv", "blocks.0.mlp.0", "blocks.1.attn.qkv", "blocks.1.mlp.0"]
    before = linear_input_absmax(model, names, batches)
    report = smooth(model, batches, lambda m, b: m(b), alpha=0.5)
    assert {(g["norm"], tuple(g["linears"])) for g in report["groups"]} == {
        (f"blocks.{i}.{ln}", (f"blocks.{i}.{lin}",)) for i in (0, 1) for ln, lin in (("ln1", "attn.qkv"), ("ln2", "mlp.0"))}
    assert report["skipped"]["blocks.0.mlp.2"].startswith("input comes from gelu")
    with torch.no_grad():
        assert torch.allclose(model(x), ref, rtol=1e-4, atol=1e-4)
    after = linear_input_absmax(model, names, batches)
    for n in names:
        assert outlier_ratio(after[n]) < 0.5 * outlier_ratio(before[n])


def test_smooth_lowers_w8a8_error_with_outliers():
    batches = [torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    x = torch.randn(8, 8, 32)
    errors = []
    for smoothed in (False, True):
        model = Blocks()
        with torch.no_grad():
            ref = model(x)
            if smoothed:
                smooth(model, batches, lambda m, b: m(b))
            with fake_quant_linears(model):
                errors.append(float((model(x) - ref).pow(2).mean()))
            assert torch.equal(model(x), model(x))   # weights restored after the block
    assert errors[1] < 0.5 * errors[0]


def test_smooth_skips_the_tied_head_of_a_gpt():
    model = tiny_gpt()
    batches = [torch.randint(0, 40, (4, 16))]
    report = smooth(model, batches)
    assert report["skipped"]["lm_head"] == "weight tied to wte.weight"
    assert len(report["groups"]) == 4


def test_smooth_on_post_ln_bert_needs_explicit_scales():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16)
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        bert.encoder.layer[0].output.LayerNorm.weight[[1, 7]] *= 25.0   # outliers into layer 1's Q/K/V

    def forward(m, b):
        return m(**b).last_hidden_state

    g = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 50, (4, 12), generator=g),
                "attention_mask": torch.ones(4, 12, dtype=torch.long)} for _ in range(2)]
    with torch.no_grad():
        ref = forward(bert, batches[0])
    # every BERT LayerNorm also feeds a residual add: folding would change the model
    with pytest.raises(KilnError, match="residual"):
        smooth(bert, batches, forward=forward)
    report = smooth(bert, batches, forward, unfoldable=Unfoldable.SCALE_INPUT)
    qkv = ("encoder.layer.1.attention.self.query", "encoder.layer.1.attention.self.key",
           "encoder.layer.1.attention.self.value")
    group = next(g for g in report["groups"] if tuple(g["linears"]) == qkv)
    assert group["norm"] is None and group["ratio_after"] < 0.5 * group["ratio_before"]
    assert isinstance(bert.get_submodule(qkv[0]), SmoothedLinear)
    with torch.no_grad():
        assert torch.allclose(forward(bert, batches[0]), ref, rtol=1e-4, atol=1e-4)
