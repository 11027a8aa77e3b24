"""LoRA and QLoRA against their oracles: PEFT 0.21 (same seed -> same adapters, trainable
parameters, scaling, outputs after training steps, merged model), QLoRA's published NF4 code
book and torchao's NF4Tensor (codes, scales, dequantized weights)."""
from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from kiln.errors import KilnError  # noqa: E402
from kiln.lowrank import lora  # noqa: E402
from kiln.lowrank.nf4 import NF4Linear, NF4Weight, normal_grid  # noqa: E402

# QLoRA's NF4 code book as published (Dettmers et al. 2023, appendix E; bitsandbytes' table)
QLORA_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
             -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
             0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 6)

    def forward(self, x):
        return self.head(self.body(x))


def adapt_both(base: nn.Module, config: lora.LoraConfig, seed: int = 7):
    """kiln's and PEFT's adapted copies of `base`, each made right after the same seed."""
    targets = "all-linear" if config.targets == (lora.ALL_LINEAR,) else list(config.targets)
    peft_cfg = peft.LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                               target_modules=targets, bias=str(config.bias), use_rslora=config.rslora,
                               modules_to_save=list(config.train) or None)
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_cfg)
    torch.manual_seed(seed)
    ours = copy.deepcopy(base)
    lora.apply(ours, config)
    return ours, theirs


def train_steps(model, batches, loss_fn, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    torch.manual_seed(3)   # the same dropout masks in both
    losses = []
    model.train()
    for x, y in batches[:steps]:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_nf4_grid_is_qlora_published_codebook():
    assert torch.allclose(normal_grid(dtype=torch.float64), torch.tensor(QLORA_NF4, dtype=torch.float64), atol=1e-7)
    assert normal_grid()[7] == 0 and normal_grid().tolist()[0] == -1 and normal_grid().tolist()[-1] == 1


def test_nf4_codes_scales_and_weights_equal_torchao():
    from torchao.quantization import to_nf4

    torch.manual_seed(0)
    w = torch.randn(96, 512)
    theirs = to_nf4(w, 64, 256)
    ours = NF4Weight.from_float(w, 64, 256, grid=theirs.nf4)   # torchao keeps a 4-decimal table
    assert torch.equal(ours.codes, theirs.quantized_data)
    assert torch.equal(ours.scales, theirs.quantized_scalers)
    assert torch.equal(ours(), theirs.get_original_weight())


def test_nf4_bits_per_weight_with_double_quantization():
    nf4 = NF4Weight.from_float(torch.randn(256, 256))
    assert nf4.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / (256 * 256))   # 4.127
    # a layer that is not a whole number of scale groups pads with zeros and still round-trips
    odd = torch.randn(3, 50)
    small = NF4Weight.from_float(odd)
    assert small().shape == odd.shape
    assert (small() - odd).abs().max() <= odd.abs().max() * 0.2


@pytest.mark.parametrize("config", [
    lora.LoraConfig(r=4, alpha=8),
    lora.LoraConfig(r=4, alpha=16, rslora=True, bias=lora.Bias.ALL),
    lora.LoraConfig(r=2, alpha=4, dropout=0.1, bias=lora.Bias.LORA_ONLY, targets=("body.2",), train=("head",)),
], ids=["all-linear", "rslora-bias-all", "dropout-lora-only-modules-to-save"])
def test_lora_equals_peft_after_training_steps(config):
    base = Mlp()
    ours, theirs = adapt_both(base, config)
    assert lora.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    layer = next(m for m in ours.modules() if isinstance(m, lora.LoraLinear))
    assert layer.scaling == (config.alpha / math.sqrt(config.r) if config.rslora else config.alpha / config.r)
    torch.manual_seed(0)
    batches = [(torch.randn(8, 12), torch.randint(0, 3, (8,))) for _ in range(3)]
    x = batches[0][0]
    with torch.no_grad():   # B = 0: the adapted model starts as the base
        assert torch.equal(ours.eval()(x), base(x))
    ce = nn.functional.cross_entropy
    assert train_steps(ours, batches, ce) == pytest.approx(train_steps(theirs, batches, ce), abs=1e-6)
    with torch.no_grad():
        out, ref = ours.eval()(x), theirs.eval()(x)
        assert (out - ref).abs().max() <= 1e-6
        merged = lora.merge(copy.deepcopy(ours))
        assert not any(isinstance(m, lora.LoraLinear) for m in merged.modules())
        assert (merged(x) - theirs.merge_and_unload()(x)).abs().max() <= 1e-5


def test_all_linear_leaves_a_transformers_output_embedding_out_like_peft():
    base = tiny_llama()
    ours, theirs = adapt_both(base, lora.LoraConfig(r=4, alpha=8))
    adapted = sorted(n for n, m in ours.named_modules() if isinstance(m, lora.LoraLinear))
    assert "lm_head" not in adapted and len(adapted) == 2 * 7   # q k v o gate up down per layer
    assert lora.trainable_parameters(ours)[0] == theirs.get_nb_trainable_parameters()[0]
    ids = torch.randint(0, 96, (2, 10))
    batches = [(ids, ids)] * 3
    lm_loss = lambda out, y: nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), y[:, 1:].flatten())  # noqa: E731
    assert train_steps(ours, batches, lm_loss) == pytest.approx(train_steps(theirs, batches, lm_loss), abs=1e-6)
    with torch.no_grad():
        assert (ours.eval()(ids).logits - theirs.eval()(ids).logits).abs().max() <= 1e-6


def test_qlora_base_is_nf4_and_merges_to_dequantized_plus_delta():
    base = Mlp()
    model = copy.deepcopy(base)
    lora.apply(model, lora.LoraConfig(r=2, alpha=4, qlora=True, block=16, scaler_block=4))
    layer = model.body[0]
    assert isinstance(layer.base, NF4Linear) and not any(p.requires_grad for p in layer.base.parameters())
    assert lora.bits_report(model)["nf4_bits_per_weight"] > 4
    with torch.no_grad():
        layer.lora_B.weight.normal_()
        x = torch.randn(4, 12)
        expected = layer.base.weight + layer.lora_B.weight @ layer.lora_A.weight * layer.scaling
        assert torch.allclose(layer.merged().weight, expected)
        assert (lora.merge(copy.deepcopy(model))(x) - model(x)).abs().max() <= 1e-5


def test_a_lora_model_exports_with_torch_export_and_onnx(tmp_path):
    model = copy.deepcopy(Mlp())
    lora.apply(model, lora.LoraConfig(r=2, alpha=4, qlora=True, block=16, scaler_block=4))
    x = torch.randn(2, 12)
    program = torch.export.export(model.eval(), (x,))
    assert torch.allclose(program.module()(x), model(x))
    onnx_path = tmp_path / "lora.onnx"
    torch.onnx.export(model, (x,), str(onnx_path), dynamo=True)
    import onnxruntime as ort

    got = ort.InferenceSession(str(onnx_path)).run(None, {ort.InferenceSession(str(onnx_path)).get_inputs()[0].name: x.numpy()})[0]
    assert abs(got - model(x).detach().numpy()).max() <= 1e-5


@pytest.mark.parametrize("text, message", [
    ("r=0", "r must be >= 1"),
    ("r=8,alpha=-1", "alpha must be > 0"),
    ("rank=8", "unknown key 'rank'"),
    ("r=eight", "is not an integer"),
    ("r8", "is not key=value"),
    ("bias=some", "bias"),
])
def test_bad_lora_options_are_one_line(text, message):
    with pytest.raises(KilnError, match=message):
        lora.parse(text)


def test_bad_targets_and_ranks_name_the_problem():
    with pytest.raises(KilnError, match="'nothere' matches no Linear"):
        lora.apply(Mlp(), lora.LoraConfig(targets=("nothere",)))
    with pytest.raises(KilnError, match="rank 8 exceeds head's size 6x16"):
        lora.apply(Mlp(), lora.LoraConfig(r=8, targets=("head",)))
    with pytest.raises(KilnError, match="no Linear layer to adapt or quantize to NF4"):
        lora.apply(nn.Sequential(nn.Conv2d(1, 2, 3)), lora.LoraConfig(qlora=True))


@pytest.mark.slow
def test_cli_train_lora_eval_merge_and_export(tmp_path):
    kiln = [sys.executable, "-m", "kiln.cli.main"]
    run = lambda *a: subprocess.run([*kiln, *a], capture_output=True, text=True, cwd=tmp_path)  # noqa: E731
    done = run("train", "zoo:gpt", "--lora", "r=4,alpha=8,targets=qkv+proj", "--max-steps", "2", "--epochs", "1",
               "--out", "g", "--json", "m.json")
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert 0 < metrics["trainable_params"] < metrics["params"]
    assert run("eval", "g").returncode == 0
    merged = run("merge", "g", "--out", "gm", "--json", "-")
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert json.loads(merged.stdout)["max_abs_output_change"] <= 1e-5
    assert json.loads((tmp_path / "gm" / "artifact.json").read_text())["transforms"] == []
    assert run("compile", "gm", "--backend", "export").returncode == 0
    bad = run("train", "zoo:gpt", "--lora", "r=4,targets=nothere", "--out", "bad")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and not (tmp_path / "bad").exists()
