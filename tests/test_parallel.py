"""Parallel training (kiln.train.parallel): every mode against one process.

Default tier: the pieces that need no second process (the pipeline's cuts and units, the
balanced partition, the fused-QKV layout, tensor-parallel checks, global batch norm in a
1-process group). Distributed tier (gloo, torchrun): N processes end where 1 process does,
within 1e-5, with the same loss; per-rank bytes equal the sharding's arithmetic; a run saved
by N processes resumes in 1 and the other way; two launchers as two nodes; a dying rank.
"""
from __future__ import annotations

import itertools
import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from kiln.errors import KilnError
from kiln.models.zoo.cnn import MnistCNN
from kiln.models.zoo.gpt import GPT, GPTConfig
from kiln.models.zoo.vit import ViT
from kiln.train.parallel.chain import balance, chain
from kiln.train.parallel.checkpoint import load_sharded
from kiln.train.parallel.config import Mode, ParallelConfig, PipeSchedule
from kiln.train.parallel.pp import check_pipeline, stage_starts
from kiln.train.parallel.tp import check_tensor_parallel, deinterleave, interleave

FACTORIES = textwrap.dedent('''
    import torch
    from kiln.models.zoo.cnn import MnistCNN
    from kiln.models.zoo.gpt import GPT, GPTConfig

    # the zoo's architectures without dropout: ranks draw their own dropout masks
    def gpt():
        torch.manual_seed(0)
        return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=16, dropout=0.0)), \\
            (torch.randint(0, 256, (1, 16)),)

    def cnn():
        torch.manual_seed(0)
        return MnistCNN(widths=(8, 16), dropout=0.0), (torch.randn(1, 1, 28, 28),)

    class Dies(MnistCNN):
        """Rank 1 exits hard once the run has saved a checkpoint (KILN_TEST_DIE_AFTER names it)."""
        def forward(self, x):
            import os
            flag = os.environ.get("KILN_TEST_DIE_AFTER")
            if flag and os.environ.get("RANK") == "1" and self.training and os.path.exists(flag):
                os._exit(3)
            return super().forward(x)

    def dies():
        torch.manual_seed(0)
        return Dies(widths=(8, 16), dropout=0.0), (torch.randn(1, 1, 28, 28),)

    def llama():
        """transformers' Llama decoder with a causal-LM head, grouped-query attention (4 heads, 2 kv)."""
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
        return LlamaForCausalLM(cfg), (torch.randint(0, 256, (1, 16)),)
''')


def small_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**({"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 16, "dropout": 0.0} | kw)))


# ---------------------------------------------------------------------------- default tier

@pytest.mark.parametrize("model, x", [
    (small_gpt(), torch.randint(0, 256, (2, 16))),
    (ViT(depth=2), torch.randn(2, 1, 28, 28)),
    (MnistCNN(widths=(4, 8), dropout=0.0), torch.randn(2, 1, 28, 28)),
])
def test_the_chain_of_units_is_the_model(model, x):
    model.eval()
    y = x
    for unit in chain(model):
        y = unit(y)
    assert torch.equal(y, model(x))
    shared = {id(p) for u in chain(model) for p in u.parameters()}
    assert shared == {id(p) for p in model.parameters()}     # the units hold the model's own tensors


def small_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, use_cache=False))


def test_a_llama_decoder_cuts_into_embedding_layers_and_head():
    model = small_llama().eval()
    units = chain(model)
    assert [u.unit_name for u in units] == ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2",
                                            "model.norm"]
    x = torch.randint(0, 64, (2, 12))
    y = x
    for unit in units:   # the rotary embeddings and the causal mask rebuilt in each layer's unit
        y = unit(y)
    assert torch.equal(y, model(x).logits)
    assert {id(p) for u in units for p in u.parameters()} == {id(p) for p in model.parameters()}
    plan = ParallelConfig(modes=(Mode.PP,), split=("model.layers.2",))
    assert stage_starts(units, plan, 2) == [3]


def test_balance_minimises_the_slowest_stage_exactly():
    gen = torch.Generator().manual_seed(0)
    for n, parts in [(5, 2), (7, 3), (8, 4), (6, 6)]:
        costs = torch.randint(1, 50, (n,), generator=gen).tolist()
        starts = balance(costs, parts)
        bounds = [0, *starts, n]
        got = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = min(max(sum(costs[a:b]) for a, b in zip((0, *cut), (*cut, n)))
                   for cut in itertools.combinations(range(1, n), parts - 1))   # brute force
        assert got == best and all(b > a for a, b in zip(bounds, bounds[1:]))


def test_pipeline_split_names_must_exist_and_leave_no_stage_empty():
    units = chain(small_gpt())
    plan = lambda *split: ParallelConfig(modes=(Mode.PP,), split=split)   # noqa: E731
    assert stage_starts(units, plan("blocks.1"), 2) == [2]
    with pytest.raises(KilnError, match="'blocks.9': no such module; a stage may begin at blocks.0"):
        stage_starts(units, plan("blocks.9"), 2)
    with pytest.raises(KilnError, match="leaves a stage empty"):
        stage_starts(units, plan("wte"), 2)
    with pytest.raises(KilnError, match="leaves a stage empty"):
        stage_starts(units, plan("blocks.1", "blocks.1", "ln_f"), 4)
    with pytest.raises(KilnError, match="does not split into 4 equal micro-batches"):
        check_pipeline(small_gpt(), ParallelConfig(modes=(Mode.PP,), microbatches=4), 2, 6)


def test_flop_balanced_split_puts_half_the_blocks_on_each_stage():
    x = torch.randint(0, 256, (2, 16))
    split = check_pipeline(small_gpt(n_layer=4), ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.GPIPE), 2, 8, x)
    # the head's 32x256 matmul weighs about one block here: a 4-block model cuts at block 2 or 3
    assert split in (("blocks.2",), ("blocks.3",))


def test_fused_qkv_interleaving_gives_each_rank_its_heads_q_k_v():
    d, n = 8, 2
    w = torch.arange(3 * d * 3, dtype=torch.float32).reshape(3 * d, 3)
    trained = interleave(w, n)
    for r in range(n):
        rows = trained[r * 3 * d // n:(r + 1) * 3 * d // n]
        want = torch.cat([w[part * d + r * d // n: part * d + (r + 1) * d // n] for part in range(3)])
        assert torch.equal(rows, want)
    assert torch.equal(deinterleave(trained, n), w)


def test_tensor_parallel_degree_must_divide_heads_and_widths():
    check_tensor_parallel(small_gpt(), 2)
    check_tensor_parallel(small_gpt(), 4)
    with pytest.raises(KilnError, match="degree 3 does not divide the attention heads \\(4\\) of blocks.0"):
        check_tensor_parallel(small_gpt(), 3)
    with pytest.raises(KilnError, match="no block kiln can split"):
        check_tensor_parallel(MnistCNN(), 2)


def test_parallel_config_refuses_unknown_pairs_and_wrong_meshes():
    with pytest.raises(KilnError, match="not a supported pair"):
        ParallelConfig(modes=(Mode.TP, Mode.PP))
    with pytest.raises(KilnError, match="needs 2"):
        ParallelConfig(modes=(Mode.FSDP, Mode.TP), mesh=(4,))
    with pytest.raises(KilnError, match="is 4 processes but the job has 2"):
        ParallelConfig(modes=(Mode.FSDP, Mode.TP), mesh=(2, 2)).sizes(2)
    with pytest.raises(KilnError, match="is 6 processes but the job has 4"):
        ParallelConfig(modes=(Mode.DDP, Mode.TP), mesh=(3, 2)).sizes(4)
    assert ParallelConfig(modes=(Mode.DDP, Mode.TP), mesh=(2, 2)).data_parallel(4) == 2
    assert ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.INTERLEAVED).stages_per_rank == 2
    assert ParallelConfig(modes=(Mode.DDP, Mode.PP), mesh=(2, 2)).data_parallel(4) == 2


def test_sharded_workers_get_a_fixed_mmap_threshold_unless_told_otherwise():
    """glibc's mmap threshold for the workers (allocator_env): fixed at 128 kB for FSDP/HSDP,
    whose freed gathers would otherwise stay in the heap; nothing for the other modes; the
    config's own value (0: glibc's defaults) or the caller's environment wins."""
    from kiln.train.parallel.config import SHARDED_MMAP_THRESHOLD, allocator_env

    fixed = {"MALLOC_MMAP_THRESHOLD_": str(SHARDED_MMAP_THRESHOLD)}
    assert SHARDED_MMAP_THRESHOLD == 128 * 1024
    assert allocator_env(ParallelConfig(modes=(Mode.FSDP,)), {}) == fixed
    assert allocator_env(ParallelConfig(modes=(Mode.HSDP,), mesh=(2, 2)), {}) == fixed
    assert allocator_env(ParallelConfig(modes=(Mode.FSDP, Mode.TP), mesh=(2, 2)), {}) == fixed
    assert allocator_env(ParallelConfig(), {}) == {} and allocator_env(ParallelConfig(modes=(Mode.ZERO1,)), {}) == {}
    assert allocator_env(ParallelConfig(modes=(Mode.FSDP,), mmap_threshold=0), {}) == {}
    assert allocator_env(ParallelConfig(mmap_threshold=65536), {}) == {"MALLOC_MMAP_THRESHOLD_": "65536"}
    assert allocator_env(ParallelConfig(modes=(Mode.FSDP,)), {"MALLOC_MMAP_THRESHOLD_": "1048576"}) == {}
    with pytest.raises(KilnError):
        ParallelConfig(mmap_threshold=-1)


def test_global_batch_norm_alone_is_batch_norm(tmp_path):
    import torch.distributed as dist

    from kiln.train.parallel.syncbn import convert

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        ref = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
        ours = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
        ours.load_state_dict(ref.state_dict())
        assert convert(ours) == 1
        x = torch.randn(4, 2, 6, 6)
        a, b = ref(x), ours(x)
        a.square().sum().backward()
        b.square().sum().backward()
        assert torch.allclose(a, b, atol=1e-5)
        assert torch.allclose(ref[0].weight.grad, ours[0].weight.grad, atol=1e-4)
        assert torch.allclose(ref[1].running_var, ours[1].running_var, atol=1e-6)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- distributed tier

@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    path = tmp_path_factory.mktemp("factories") / "zoo_nodropout.py"
    path.write_text(FACTORIES)
    return {"gpt": (f"py:{path}:gpt", "rt-lm?block=16"), "cnn": (f"py:{path}:cnn", "mnist"),
            "dies": (f"py:{path}:dies", "mnist"), "llama": (f"py:{path}:llama", "rt-lm?block=16")}


def config(specs, which, out, **kw):
    from kiln.train.config import TrainConfig

    spec, dataset = specs[which]
    base = dict(model=spec, dataset=dataset, out=str(out), epochs=1, max_steps=3, batch_size=8, threads=1, seed=0)
    return TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def one(specs, tmp_path_factory):
    """One process's run of each model: the oracle."""
    from kiln.train.trainer import fit

    root = tmp_path_factory.mktemp("one")
    return {w: (root / w, fit(config(specs, w, root / w), progress=False)) for w in ("gpt", "cnn")}


def max_diff(a_dir, b_dir) -> float:
    a, b = load_file(a_dir / "last.safetensors"), load_file(b_dir / "last.safetensors")
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


PLANS = {
    "ddp": ParallelConfig(),
    "zero1": ParallelConfig(modes=(Mode.ZERO1,)),
    "fsdp": ParallelConfig(modes=(Mode.FSDP,)),
    "fsdp-zero2": ParallelConfig(modes=(Mode.FSDP,), reshard_after_forward=False, checkpoint_activations=True),
    "tp": ParallelConfig(modes=(Mode.TP,)),
    "tp-sp": ParallelConfig(modes=(Mode.TP,), sequence_parallel=True),
    "pp-gpipe": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.GPIPE),
    "pp-1f1b": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.ONE_F_ONE_B, checkpoint_activations=True),
    "pp-interleaved": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.INTERLEAVED, microbatches=4),
    "pp-zero-bubble": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.ZERO_BUBBLE, microbatches=4),
    # batch norm normalises each micro-batch by its own statistics, so a pipeline matches one
    # process on the CNN with one micro-batch (more would change the model's maths, not kiln's)
    "pp-1mb": ParallelConfig(modes=(Mode.PP,), schedule=PipeSchedule.GPIPE, microbatches=1),
}
CASES = [("gpt", p) for p in PLANS if p != "pp-1mb"] + [("cnn", p) for p in ("ddp", "zero1", "fsdp", "fsdp-zero2", "pp-1mb")]


@pytest.mark.distributed
@pytest.mark.parametrize("which, plan", CASES)
def test_two_processes_end_where_one_does(specs, one, tmp_path, which, plan):
    from kiln.train.distributed import launch

    launch(config(specs, which, tmp_path / "two"), nproc=2, parallel=PLANS[plan])
    assert max_diff(one[which][0], tmp_path / "two") < 1e-5
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    ref = one[which][1]
    assert two["history"][0]["train_loss"] == pytest.approx(ref["history"][0]["train_loss"], abs=1e-5)
    assert two["after"] == pytest.approx(ref["after"], abs=1e-4)
    val = next(k for k in ref["history"][0] if k.startswith("val_"))   # fsdp: evaluated on the shards
    assert two["history"][0][val] == pytest.approx(ref["history"][0][val], rel=1e-5)
    ranks = two["parallel"]["ranks"]
    assert len(ranks) == 2 and all(r["params_bytes"] > 0 for r in ranks)


@pytest.mark.distributed
@pytest.mark.parametrize("plan", ["pp-gpipe", "pp-1f1b"])
def test_a_llama_decoder_pipelined_on_two_processes_ends_where_one_does(specs, tmp_path, plan):
    """transformers' LlamaForCausalLM cut by FLOPs (embedding + 2 layers | 2 layers + head)."""
    from kiln.train.distributed import launch
    from kiln.train.trainer import fit

    ref = fit(config(specs, "llama", tmp_path / "one"), progress=False)
    launch(config(specs, "llama", tmp_path / "two"), nproc=2, parallel=PLANS[plan])
    assert max_diff(tmp_path / "one", tmp_path / "two") < 1e-5
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["history"][0]["train_loss"] == pytest.approx(ref["history"][0]["train_loss"], abs=1e-5)
    assert [r["units"] for r in two["parallel"]["ranks"]] == [
        ["model.embed_tokens", "model.layers.0", "model.layers.1"], ["model.layers.2", "model.layers.3", "model.norm"]]


def chunk_rows(n: int, parts: int, r: int) -> int:
    """torch.chunk's row count for rank r (what DTensor's Shard and FSDP2 give a rank)."""
    size = -(-n // parts)
    return max(0, min(size, n - r * size))


@pytest.mark.distributed
def test_per_rank_bytes_are_the_shardings_arithmetic(specs, tmp_path):
    """AdamW keeps exp_avg and exp_avg_sq (2 x 4 bytes per parameter) and a 4-byte step per tensor."""
    from kiln.train.distributed import launch

    model = small_gpt()
    params = list(model.parameters())   # the tied head counted once
    for plan in ("ddp", "fsdp", "zero1", "pp-gpipe", "tp"):
        out = tmp_path / plan
        launch(config(specs, "gpt", out), nproc=2, parallel=PLANS[plan])
        ranks = json.loads((out / "metrics.json").read_text())["parallel"]["ranks"]
        for r, got in enumerate(ranks):
            want = expected_numel(plan, model, params, r)
            assert got["params_bytes"] == 4 * want["params"], (plan, r)
            assert got["grads_bytes"] == 4 * want["params"], (plan, r)
            assert got["optimizer_bytes"] == 8 * want["opt"] + 4 * want["tensors"], (plan, r)


def expected_numel(plan: str, model, params, r: int) -> dict:
    total = sum(p.numel() for p in params)
    if plan == "ddp":
        return {"params": total, "opt": total, "tensors": len(params)}
    if plan == "fsdp":
        shard = sum(chunk_rows(p.shape[0], 2, r) * (p.numel() // p.shape[0]) for p in params)
        return {"params": shard, "opt": shard, "tensors": len(params)}
    if plan == "zero1":
        # ZeroRedundancyOptimizer's partition: tensors in decreasing size, each to the rank with the least so far
        sizes = [0, 0]
        mine = []
        for p in sorted(params, key=lambda p: -p.numel()):
            k = sizes.index(min(sizes))
            sizes[k] += p.numel()
            if k == r:
                mine.append(p)
        return {"params": total, "opt": sum(p.numel() for p in mine), "tensors": len(mine)}
    if plan == "pp-gpipe":
        # 2 blocks + embedding + head: balanced cut at blocks.1; the tied embedding is on both ranks
        units = chain(model)
        stage = units[:2] if r == 0 else units[2:]
        held = {id(p): p for u in stage for p in u.parameters()}.values()
        return {"params": sum(p.numel() for p in held), "opt": sum(p.numel() for p in held), "tensors": len(held)}
    # tp: column-wise weights and biases split by rows, row-wise weights by columns, the rest whole
    n = 0
    for name, p in model.named_parameters():
        split = any(k in name for k in ("attn.qkv", "mlp.0")) or (name.endswith("weight") and
                                                                 any(k in name for k in ("attn.proj", "mlp.2")))
        n += p.numel() // 2 if split else p.numel()
    return {"params": n, "opt": n, "tensors": len(params)}


@pytest.mark.distributed
@pytest.mark.parametrize("plan", ["fsdp", "tp", "pp-gpipe"])
def test_a_run_saved_by_two_processes_resumes_in_one_and_back(specs, tmp_path, plan):
    from kiln.train.distributed import launch
    from kiln.train.trainer import fit

    first, second = dict(epochs=1, max_steps=2), dict(epochs=2, max_steps=4)
    fit(config(specs, "gpt", tmp_path / "one", **first), progress=False)
    fit(config(specs, "gpt", tmp_path / "one", **second), resume=True, progress=False)
    launch(config(specs, "gpt", tmp_path / "n_to_1", **first), nproc=2, parallel=PLANS[plan])
    plain = small_gpt()            # the sharded (DCP) checkpoint, read by one process
    load_sharded(tmp_path / "n_to_1", plain)
    saved = load_file(tmp_path / "n_to_1" / "last.safetensors")
    assert all(torch.equal(saved[k], t) for k, t in plain.state_dict().items() if k in saved)
    fit(config(specs, "gpt", tmp_path / "n_to_1", **second), resume=True, progress=False)
    fit(config(specs, "gpt", tmp_path / "1_to_n", **first), progress=False)
    launch(config(specs, "gpt", tmp_path / "1_to_n", **second), nproc=2, resume=True, parallel=PLANS[plan])
    assert max_diff(tmp_path / "one", tmp_path / "n_to_1") < 1e-5
    assert max_diff(tmp_path / "one", tmp_path / "1_to_n") < 1e-5


@pytest.mark.distributed
@pytest.mark.parametrize("plan, mesh", [((Mode.FSDP, Mode.TP), (2, 2)), ((Mode.DDP, Mode.TP), (2, 2)), ((Mode.HSDP,), (2, 2)),
                                        ((Mode.DDP, Mode.PP), (2, 2))])
def test_four_processes_on_a_2d_mesh_end_where_one_does(specs, one, tmp_path, plan, mesh):
    from kiln.train.distributed import launch

    launch(config(specs, "gpt", tmp_path / "four"), nproc=4,
           parallel=ParallelConfig(modes=plan, mesh=mesh, schedule=PipeSchedule.GPIPE))
    assert max_diff(one["gpt"][0], tmp_path / "four") < 1e-5


@pytest.mark.distributed
def test_two_launchers_as_two_nodes_match_one_process(specs, one, tmp_path):
    import subprocess
    import sys

    spec, dataset = specs["gpt"]
    cmd = [sys.executable, "-m", "kiln.cli.main", "train", spec, "--dataset", dataset,
           "--epochs", "1", "--max-steps", "3", "--batch-size", "8", "--threads", "1", "--seed", "0",
           "--parallel", "fsdp", "--nproc", "1", "--nnodes", "2", "--rdzv-endpoint", "127.0.0.1:29611"]
    # each node names its own run directory, as on two machines; global rank 0 (node 0) writes
    nodes = [subprocess.Popen(cmd + ["--node-rank", str(k), "--out", str(tmp_path / f"node{k}")],
                              stderr=subprocess.PIPE, text=True) for k in (0, 1)]
    errors = [n.communicate(timeout=600)[1] for n in nodes]
    assert [n.returncode for n in nodes] == [0, 0], errors
    assert max_diff(one["gpt"][0], tmp_path / "node0") < 1e-5
    assert not (tmp_path / "node1").exists()


@pytest.mark.distributed
def test_a_rank_that_dies_stops_the_job_in_one_line_and_the_checkpoint_stays_loadable(specs, tmp_path, monkeypatch):
    from kiln.train.checkpoint import load_state
    from kiln.train.distributed import launch
    from kiln.train.evaluation import evaluate_run

    run = tmp_path / "run"
    monkeypatch.setenv("KILN_TEST_DIE_AFTER", str(run / "state.pt"))
    with pytest.raises(KilnError, match=r"^rank 1 failed .* keeps the last completed epoch$"):
        launch(config(specs, "dies", run, epochs=3, max_steps=0, batch_size=512), nproc=2,
               parallel=PLANS["fsdp"])
    assert load_state(run / "state.pt")["epoch"] == 1   # epoch 1's checkpoint, whole
    assert 0.1 < evaluate_run(run)["value"] <= 1.0       # and kiln eval measures it (no metrics.json yet)


@pytest.mark.parametrize("spec, kind", [("hf-config:llama", "llama"), ("hf-config:bert", "bert")])
def test_tensor_parallel_plans_cover_transformers_decoders_and_encoders(spec, kind):
    from kiln.models.spec import load
    from kiln.train.parallel.tp import tp_blocks

    model = load(spec).model
    blocks = tp_blocks(model)
    cfg = model.config
    assert len(blocks) == cfg.num_hidden_layers and {b[2][0] for b in blocks} == {kind}
    kv = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    check_tensor_parallel(model, kv)
    with pytest.raises(KilnError, match="does not divide"):
        check_tensor_parallel(model, 2 * cfg.num_attention_heads)
