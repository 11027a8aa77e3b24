"""What the planner needs of a model, per layer: parameters, forward FLOPs and bytes per sample
(op by op, for the roofline), activation bytes saved for backward, and the bytes that cross a
layer boundary (a pipeline's point-to-point message, tensor parallelism's all-reduce).

Two sources fill it:
- `from_graph`: kiln's inference analysis of the captured model (kiln.analysis.cost; built on
  the meta device, without weights, where `kiln analyze` would: kiln.models.meta), rolled up
  per layer (a module path up to its first list index, e.g. `blocks.3`), divided by the example
  batch; the activations saved for backward come from the training step's analysis
  (kiln.analysis.train_step's joint graph, `with_saved_activations`), or, where the step cannot
  be captured, every op output of the layer (an upper bound).
- `transformer`: closed-form formulas for a GPT-style decoder from its config, so huge models
  (GPT-3 175B) are planned without building them: parameters 12h^2 + 13h per layer (Megatron-LM,
  arXiv 2104.04473, sec. 5.1), forward FLOPs per token 24h^2 + 4sh per layer plus 2hV for the
  logits (same section's 96Bslh^2(1 + s/6h + V/16lh) is 3x these with recomputation), saved
  activations s*h*(34 + 5as/h) bytes per sequence per layer in 16-bit (Korthikanti et al.,
  arXiv 2205.05198, eq. 1).
Backward is 2x forward FLOPs (the 6*N*tokens rule: Kaplan et al., arXiv 2001.08361, sec. 2.1),
until kiln/analysis/train_step.py counts it from the joint graph.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, replace

from kiln.analysis.cost import AnnotateCost
from kiln.analysis.train_step import analyze_step
from kiln.errors import KilnError
from kiln.graph.capture import capture
from kiln.graph.graph import Graph
from kiln.graph.node import NodeKind
from kiln.graph.passes import PassManager
# the config a recipe type would be built from (kiln's CPU sizes, the query applied), no model
from kiln.models import hf_config as hc
from kiln.models.inputs import with_input_shapes
from kiln.models.meta import load_for_analysis, with_meta_input_shapes
from kiln.models.spec import parse_query

BACKWARD_PER_FORWARD = 2.0   # Kaplan et al. 2020, sec. 2.1: backward ~ twice the forward


@dataclass(frozen=True)
class OpCost:
    """One op per sample: FLOPs and activation bytes scale with the batch, weight bytes don't.
    `replicated`: tensor parallelism leaves the op whole on every rank (norms, residual adds,
    embeddings and heads in kiln's TP plans) instead of splitting it by the TP degree."""

    flops: float
    bytes: float
    weight_bytes: float = 0.0
    replicated: bool = False


@dataclass(frozen=True)
class LayerCost:
    name: str
    params: int
    ops: tuple[OpCost, ...]
    activation_bytes: float      # saved for backward, per sample
    boundary_bytes: float        # the layer's output, per sample
    tp_collectives: int = 0      # all-reduces per forward under tensor parallelism (Megatron: 2 per block)
    tensors: tuple[int, ...] = ()   # elements of each parameter tensor (ZeRO-1 broadcasts them one by one)

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops)

    @property
    def param_tensors(self) -> tuple[int, ...]:
        """Each parameter tensor's elements (one tensor of `params` where they are not known)."""
        return self.tensors or ((self.params,) if self.params else ())


@dataclass(frozen=True)
class Workload:
    """A model as the planner sees it, at `seq` tokens per sample (1 for non-sequence models)."""

    name: str
    layers: tuple[LayerCost, ...]
    seq: int
    hidden: int | None = None
    heads: int | None = None
    weight_bytes: int = 4        # bytes per parameter element as analysed
    source: str = ""

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def flops_per_sample(self) -> float:
        """Forward FLOPs of one sample (sequence)."""
        return sum(layer.flops for layer in self.layers)

    @property
    def largest_layer_params(self) -> int:
        return max(layer.params for layer in self.layers)

    def tp_error(self, t: int) -> str:
        """'' when tensor parallelism of degree t can split this model, else why not."""
        if t == 1:
            return ""
        if not self.heads or not self.hidden:
            return f"tensor parallelism needs attention heads and a hidden size; {self.name} has none known"
        for what, size in (("heads", self.heads), ("hidden size", self.hidden)):
            if size % t:
                return f"TP degree {t} does not divide the {what} {size}"
        return ""


def train_flops(workload: Workload, samples: float, recompute: bool = False) -> float:
    """FLOPs of training on `samples` samples: forward + backward (+ a second forward when
    activations are recomputed)."""
    return workload.flops_per_sample * samples * (1 + BACKWARD_PER_FORWARD + (1 if recompute else 0))


def six_n_tokens(params: float, tokens: float) -> float:
    """Training compute by the 6*N*D rule (Kaplan et al. 2020, sec. 2.1; GPT-3 Table D.1)."""
    return 6.0 * params * tokens


# -- the closed form of a GPT-style decoder ---------------------------------------------------


@dataclass(frozen=True)
class TransformerShape:
    layers: int
    hidden: int
    heads: int
    vocab: int
    seq: int
    ffn: int = 0                 # 0: 4 * hidden
    positions: int = 0           # learned position table rows (0: none, e.g. rotary)
    tied: bool = True            # output head tied to the token embedding
    gated: bool = False          # a gated MLP (Llama's SwiGLU): three h x f matrices, not two
    kv_heads: int = 0            # grouped-query attention's key/value heads (0: as many as heads)
    bias: bool = True            # linear biases and LayerNorm (False: none, and RMSNorm's h per norm)
    head: bool = True            # the LM head and its loss (hf-config's AutoModel has none)
    bytes_per_element: int = 2   # 16-bit activations and weights (Korthikanti's convention)

    def __post_init__(self):
        if min(self.layers, self.hidden, self.heads, self.vocab, self.seq) < 1:
            raise KilnError(f"transformer shape needs positive sizes, got {self}")


def transformer(shape: TransformerShape, name: str) -> Workload:
    """The per-layer costs of a GPT-style decoder from its shape (formulas in the module doc)."""
    h, s, a, v = shape.hidden, shape.seq, shape.heads, shape.vocab
    f = shape.ffn or 4 * h
    e = shape.bytes_per_element
    kv = (shape.kv_heads or a) * (h // a)
    mlp = (3 if shape.gated else 2) * h * f
    attn = 2 * h * h + 2 * h * kv                                     # q, o and the k, v projections
    biases = (h + 2 * kv + h + f + h) if shape.bias else 0           # q, k, v, o, fc1, fc2
    norm = 2 * h if shape.bias else h                                  # LayerNorm (w, b) or RMSNorm (w)
    block_params = attn + mlp + biases + 2 * norm
    block_tensors = ((h * h, h * kv, h * kv, h * h) + (h * f,) * (3 if shape.gated else 2)
                     + ((h, kv, kv, h, f, h) if shape.bias else ()) + ((h, h) if shape.bias else (h,)) * 2)
    matmul_flops = 2 * (attn + mlp) * s                               # per sequence
    attention_flops = 4 * s * s * h                                   # QK^T and PV, per sequence
    saved = s * h * (34 + 5 * a * s / h) * e / 2                      # Korthikanti eq. 1 at 2 bytes
    # elementwise traffic: every saved byte written once and read once (an estimate)
    block_ops = (OpCost(matmul_flops, 2 * 4 * s * h * e, block_params * e), OpCost(attention_flops, 3 * s * h * e),
                 OpCost(0.0, 2 * saved))
    embed_params = v * h + shape.positions * h
    layers = [LayerCost("embed", embed_params, (OpCost(0.0, 2 * s * h * e),), s * h * e, s * h * e,
                        tensors=(v * h,) + ((shape.positions * h,) if shape.positions else ()))]
    layers += [LayerCost(f"layers.{i}", block_params, block_ops, saved, s * h * e, tp_collectives=2,
                         tensors=block_tensors) for i in range(shape.layers)]
    layers.append(LayerCost("final_norm", norm, (OpCost(0.0, 2 * s * h * e),), s * h * e, s * h * e,
                            tensors=(h, h) if shape.bias else (h,)))
    if shape.head:
        logits = OpCost(2 * h * v * s, s * (h + v) * e, v * h * e)
        # fp32 logits and their softmax for the loss: 4 bytes per vocabulary entry per token (Korthikanti sec. 4.3)
        layers.append(LayerCost("head", 0 if shape.tied else v * h, (logits,), s * v * 4, s * v * 4, tp_collectives=1))
    return Workload(name, tuple(layers), s, h, a, e, source="formula: GPT-style decoder (Megatron-LM, Korthikanti et al.)")


# -- from kiln's analysis of the captured model ----------------------------------------------

_LIST_INDEX = re.compile(r"^(.*?\.\d+)(\.|$)")


def layer_key(module: str) -> str:
    """`blocks.3.attn.qkv` -> `blocks.3`; `lm_head` -> `lm_head`; '' -> '(root)'."""
    if not module:
        return "(root)"
    m = _LIST_INDEX.match(module)
    return m.group(1) if m else module.split(".")[0]


_NORM = re.compile(r"(^|_)(ln|norm|layernorm|layer_norm|rmsnorm)(_?\d*|f)$", re.IGNORECASE)


def tp_replicated(layer: str, module: str) -> bool:
    """Whether kiln's tensor-parallel plans (kiln.train.parallel.tp) leave an op whole on every
    rank: anything outside a block (embeddings, final norm, head: `layer` is not a list item),
    and inside a block its norms and the block's own ops (the residual adds), which run on the
    full activations between the row-wise output's all-reduce and the next column-wise input.
    The projections, the attention between them and the MLP's activation are split."""
    if not layer.rsplit(".", 1)[-1].isdigit():
        return True
    inner = module[len(layer):].lstrip(".")
    return not inner or any(_NORM.search(part) for part in inner.split("."))


def from_graph(graph: Graph, model, batch: int, seq: int, name: str) -> Workload:
    """Per-layer costs from an analysed Graph (the cost pass run) of `model` at `batch` samples."""
    ops: dict[str, list[OpCost]] = defaultdict(list)
    saved: dict[str, float] = defaultdict(float)
    last_out: dict[str, float] = {}
    for n in graph.ops:
        key = layer_key(n.module)
        weights = sum(graph[i].out_bytes for i in n.inputs if graph[i].kind in (NodeKind.PARAM, NodeKind.BUFFER))
        ops[key].append(OpCost(n.cost.flops / batch, max(n.cost.bytes - weights, 0) / batch, weights,
                               replicated=tp_replicated(key, n.module)))
        if not n.is_view:
            saved[key] += n.out_bytes / batch
            last_out[key] = n.out_bytes / batch
    tensors: dict[str, list[int]] = defaultdict(list)
    for pname, p in model.named_parameters(remove_duplicate=True):
        tensors[layer_key(pname.rpartition(".")[0])].append(p.numel())
    keys = list(ops) + [k for k in tensors if k not in ops]
    layers = tuple(LayerCost(k, sum(tensors.get(k, ())), tuple(ops.get(k, ())), saved.get(k, 0.0), last_out.get(k, 0.0),
                             tp_collectives=2 if k.rsplit(".", 1)[-1].isdigit() else 0, tensors=tuple(tensors.get(k, ())))
                   for k in keys)
    hidden, heads = _attention_shape(model)
    width = next((p.element_size() for p in model.parameters()), 4)
    return Workload(name, layers, seq, hidden, heads, width, source="kiln analysis of the captured forward graph")


def _attention_shape(model) -> tuple[int | None, int | None]:
    cfg = getattr(model, "config", None)
    hidden = next((getattr(cfg, k) for k in ("hidden_size", "n_embd", "d_model") if isinstance(getattr(cfg, k, None), int)), None)
    heads = next((getattr(cfg, k) for k in ("num_attention_heads", "n_head") if isinstance(getattr(cfg, k, None), int)), None)
    return hidden, heads


# -- a model spec to a workload ----------------------------------------------------------------

# hf-config models above this many parameters are planned from their config's closed form (the
# form the published figures are checked in). Capture on the meta device needs no weights but
# takes time per layer: Llama 3 70B's 80 layers, forward and training step, took 118 s on this
# machine's shared cores (0.8 GB of memory); presets are captured that way
CAPTURE_LIMIT = 300_000_000


def load_workload(spec: str, seq: int | None = None, from_config: bool = False, head: bool = True,
                  step_memory: bool = True, meta: bool | None = None) -> Workload:
    """The workload of a model spec: an `hf-config:` transformer above CAPTURE_LIMIT parameters
    (or with `from_config`) from its config's closed form, with an LM head unless `head` is
    False (training a language model needs one; hf-config's captured AutoModel has none);
    anything else captured and analysed, its saved activations from the training step's
    analysis unless `step_memory` is False (then every forward output: no joint graph built);
    built without weights where `kiln analyze` would be (`meta`: None decides, as there)."""
    if spec.startswith("hf-config:"):
        shape = _hf_shape(spec, seq, head)
        if shape is not None:
            formula = transformer(shape, spec)
            if from_config or formula.params > CAPTURE_LIMIT:
                return formula
    elif from_config:
        raise KilnError(f"--from-config needs an hf-config: transformer spec, got {spec}")
    return _captured(spec, seq, step_memory, meta)


def _captured(spec: str, seq: int | None, step_memory: bool = True, meta: bool | None = None) -> Workload:
    """Capture and analyse `spec` as `kiln analyze` does (kiln.models.meta.load_for_analysis):
    a model built from a config (`preset:`, `hf-config:`) whose weights would not fit (or any,
    with `meta`) is built and captured on the meta device, so no weight is ever allocated;
    every figure the planner reads depends on shapes and dtypes only."""
    loaded, no_weights = load_for_analysis(spec, meta)
    first = next(iter([*loaded.example_inputs, *loaded.example_kwargs.values()]), None)
    if seq is not None:
        if first is None or first.dim() != 2:
            raise KilnError(f"--seq applies to models whose first input is (batch, tokens); {spec}'s is not")
        reshape = with_meta_input_shapes if no_weights else with_input_shapes
        loaded = reshape(loaded, [f"{first.shape[0]}x{seq}"])   # inputs of the same shape follow
        first = next(iter([*loaded.example_inputs, *loaded.example_kwargs.values()]))
    graph = capture(loaded)
    PassManager([AnnotateCost()]).run(graph)
    batch = int(first.shape[0]) if first is not None and first.dim() else 1
    tokens = int(first.shape[1]) if first is not None and first.dim() == 2 and not first.is_floating_point() else 1
    w = from_graph(graph, loaded.model, batch, tokens, spec)
    if no_weights:
        w = replace(w, source=f"{w.source} on the meta device (no weights: {no_weights})")
    return with_saved_activations(w, loaded, batch) if step_memory else w


def with_saved_activations(w: Workload, loaded, batch: int) -> Workload:
    """The workload with each layer's activations saved for backward as the training step's
    analysis counts them (kiln.analysis.train_step: the joint graph's forward outputs that the
    backward reads, per module) instead of every forward output; unchanged, and saying so,
    where the step cannot be captured."""
    try:
        step = analyze_step(loaded.model, tuple(loaded.example_inputs), dict(loaded.example_kwargs) or None)
    except Exception as exc:   # any capture failure: the forward graph's upper bound stands
        return replace(w, source=f"{w.source}; activations: every forward output (the training step was not "
                                 f"captured: {type(exc).__name__})")
    saved: dict[str, float] = defaultdict(float)
    for m in step.modules:
        saved[layer_key(m.module)] += m.saved_bytes / batch
    layers = tuple(replace(layer, activation_bytes=saved.pop(layer.name, 0.0)) for layer in w.layers)
    if saved:   # saved by a module no forward op belongs to: counted on the first layer
        layers = (replace(layers[0], activation_bytes=layers[0].activation_bytes + sum(saved.values())),) + layers[1:]
    return replace(w, layers=layers, source=f"{w.source}; activations saved for backward from the training step's analysis")


def _hf_shape(spec: str, seq: int | None, head: bool = True) -> TransformerShape | None:
    """The decoder shape of an hf-config spec from its config object alone (no weights built);
    None for architectures that are not a plain decoder or encoder stack."""
    model_type, _, query = spec.removeprefix("hf-config:").partition("?")
    config = hc.recipe_config(model_type, parse_query(spec, query), spec)
    if config is None:
        return None
    get = lambda *names: next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)
    layers, hidden, heads = get("num_hidden_layers", "n_layer"), get("hidden_size", "n_embd"), get("num_attention_heads", "n_head")
    vocab = get("vocab_size")
    if None in (layers, hidden, heads, vocab):
        return None
    ffn = get("intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    positions = get("max_position_embeddings", "n_positions") or 0
    rotary = getattr(config, "rope_theta", None) is not None or "rope" in str(getattr(config, "rope_parameters", ""))
    gated = getattr(config, "hidden_act", "") in ("silu", "swiglu") and model_type not in ("gpt2", "opt", "bert")
    return TransformerShape(layers, hidden, heads, vocab, seq or hc.SEQ, ffn,
                            0 if rotary else positions, bool(getattr(config, "tie_word_embeddings", True)),
                            gated=gated, kv_heads=get("num_key_value_heads") or 0,
                            bias=getattr(config, "attention_bias", True) is not False, head=head)
