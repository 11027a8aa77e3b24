"""Real int8 inference of the pretrained MiniLM sentence encoder on this CPU: kiln's path
(`kiln quantize` with SmoothQuant and W8A8, then `kiln compile --backend torchao`) against fp32
and the int8 peers, side by side.

    TORCHINDUCTOR_COMPILE_THREADS=1 flock /tmp/kiln-cpu.lock \
        .venv/bin/python benchmarks/quant_int8_speed.py [--json PATH] [--repeats 15]

zoo:minilm (all-MiniLM-L6-v2, real weights: BERT, mean pooling, L2 norm). Throughput: one
batch of 32 real Rotten Tomatoes review snippets (test split) padded to 128 tokens,
torch.set_num_threads(2) and 2 ONNX Runtime intra-op threads; every method is warmed up,
then each round times every method once (in a rotating order, so a noisy neighbour hits all
alike) and a method's figure is the median over rounds. Accuracy: cosine similarity of each
method's sentence embeddings to fp32 eager on the first 1,000 test-split reviews.

kiln's path is the CLI's, in one process: kiln.quant's `prepare` with
configs/quant/minilm-w8a8-dynamic-smooth.toml (SmoothQuant alpha 0.5, int8 weights per
channel, int8 activations per token) calibrated on 128 train-split reviews, then the compile
backend `torchao` (kiln.compile.int8), which runs those Linears on oneDNN int8 kernels with
kiln's own integers and scales; "kiln static" is the same with configs/quant/minilm-w8a8-smooth.toml
(activations per tensor, calibrated). "int8 torchao + compile" is backend `torchao` on the
float model (its own scales: weights per channel, activations per token, no SmoothQuant).
The peers as kiln.compile's backends build them: `torch.ao` (quantize_dynamic, its default
qconfig) and `onnxruntime:dtype=int8` (ONNX Runtime's quantize_dynamic with per-channel
weights on the dynamo export, explicit attention, which ONNX Runtime runs faster than
exported SDPA), and `openvino` (fp32: ov.convert_model of the torch.export program on
OpenVINO's CPU plugin) and `openvino:dtype=int8` (NNCF's post-training quantization, transformer
model type, calibrated on the same 128 train-split reviews kiln's quantizers see).
A smoke: `--repeats 2 --sentences 64 --only "fp32 eager,openvino" --json /tmp/q.json` (`--only`:
the methods whose names contain one of the comma-separated words; fp32 eager always runs; the
targets need kiln's method and every peer, else they are left out).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import date

os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")   # compile workers would fight the 2 cores
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from common import report  # noqa: E402

from kiln.data import load_dataset  # noqa: E402
from kiln.models.spec import load  # noqa: E402
from kiln.models.zoo.transformers import tokenize  # noqa: E402
from kiln.data.text import minilm_tokenizer  # noqa: E402
from kiln.compile.backends import build as build_backend, calibrates, parse_backend  # noqa: E402
from kiln.compile.int8 import int8_weights  # noqa: E402
from kiln.compile.openvino import int8_ops  # noqa: E402
from kiln.config import read_toml  # noqa: E402
from kiln.models.loaded import LoadedModel  # noqa: E402
from kiln.quant.config import parse_config  # noqa: E402
from kiln.quant.run import prepare  # noqa: E402
from kiln.timing import TimingConfig, format_timing, measure  # noqa: E402

BATCH, SEQ, THREADS = 32, 128, 2
CALIBRATION = 128          # train-split reviews for the quantizers' and SmoothQuant's statistics
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "quant")
KILN = "int8 kiln quantize + compile torchao (kiln)"
# name -> (kiln quant config or None, compile backend)
METHODS = {
    "fp32 eager": (None, "eager"),
    "fp32 torch.compile": (None, "inductor:freezing=1"),
    KILN: (os.path.join(CONFIGS, "minilm-w8a8-dynamic-smooth.toml"), "torchao"),
    "int8 kiln quantize w8a8-dynamic (no SmoothQuant)": (os.path.join(CONFIGS, "w8a8-dynamic.toml"), "torchao"),
    "int8 kiln static (per-tensor activations)": (os.path.join(CONFIGS, "minilm-w8a8-smooth.toml"), "torchao"),
    "int8 torchao + compile": (None, "torchao"),
    "int8 torch.ao quantize_dynamic": (None, "torch.ao"),
    "fp32 onnxruntime": (None, f"onnxruntime:threads={THREADS}"),
    "int8 onnxruntime quantize_dynamic": (None, f"onnxruntime:dtype=int8,threads={THREADS}"),
    "fp32 openvino": (None, f"openvino:threads={THREADS}"),
    "int8 openvino NNCF": (None, f"openvino:dtype=int8,threads={THREADS}"),
}
PEERS = ("int8 torch.ao quantize_dynamic", "int8 onnxruntime quantize_dynamic", "int8 openvino NNCF")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def batches(texts: list[str]) -> list[dict[str, torch.Tensor]]:
    """Batches of BATCH tokenised texts; the last one is filled up with repeats of its first
    text (each sentence's embedding depends only on its own tokens), to keep one shape."""
    out = []
    for i in range(0, len(texts), BATCH):
        chunk = texts[i:i + BATCH]
        out.append((len(chunk), tokenize(minilm_tokenizer(), chunk + chunk[:1] * (BATCH - len(chunk)), SEQ)))
    return out


def embed(fn, parts) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(**b)[:n] for n, b in parts])


def kiln_quantized(model, config_path: str, calibration) -> torch.nn.Module:
    """What `kiln quantize` makes of the model: SmoothQuant, quantizers, calibrated."""
    import copy

    quantized = copy.deepcopy(model)
    prepare(quantized, parse_config(read_toml(config_path), config_path), calibration, forward=lambda m, b: m(**b))
    return quantized.eval()


def build(model, example, calibration, only: list[str] | None = None) -> dict[str, tuple[torch.nn.Module, float]]:
    built = {}
    for name, (config, backend) in METHODS.items():
        if only and name != "fp32 eager" and not any(w in name for w in only):
            continue
        log(f"building {name} ...")
        t0 = time.perf_counter()
        source = model if config is None else kiln_quantized(model, config, calibration)
        spec = parse_backend(backend)
        # backends that calibrate (OpenVINO int8) see the batches kiln's quantizers see
        m = build_backend(spec, source, LoadedModel("zoo:minilm", source, (), example),
                          tuple(calibration) if calibrates(spec) else ())
        built[name] = (m, time.perf_counter() - t0)
    return built


def time_rounds(built, example, repeats: int) -> dict[str, list[float]]:
    """Every method in kiln.timing's interleaved rounds (warm-up: caches, allocator, oneDNN
    primitive creation); each method's seconds per batch."""
    m = measure({n: (lambda f=f: f(**example)) for n, (f, _) in built.items()}, TimingConfig(rounds=repeats, warmup=2))
    for n in built:
        log(f"{n}: {format_timing(m[n])}")
    if m.note():
        log(f"timing: {m.note()}")
    return {n: list(m[n].samples) for n in built}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "quant_int8_speed.json"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sentences", type=int, default=1000)
    parser.add_argument("--only", default="", help="comma-separated words: only the methods naming one (a smoke)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import onnxruntime
    import openvino
    import torchao

    log("loading zoo:minilm and the rotten-tomatoes test split ...")
    model = load("zoo:minilm").model.eval()
    splits = load_dataset("rotten-tomatoes").info["texts"]
    texts = splits["test"][:args.sentences]
    parts = batches(texts)
    example = parts[0][1]
    calibration = [b for _, b in batches(splits["train"][:CALIBRATION])]
    built = build(model, example, calibration, [w for w in args.only.split(",") if w])
    log(f"embedding {len(texts)} sentences with each method ...")
    ref = embed(built["fp32 eager"][0], parts)
    cos = {n: torch.nn.functional.cosine_similarity(embed(m, parts), ref, dim=1) for n, (m, _) in built.items()}
    times = time_rounds(built, example, args.repeats)

    base = BATCH / statistics.median(times["fp32 eager"])
    methods = {}
    for n, (m, build_s) in built.items():
        med = statistics.median(times[n])
        methods[n] = {
            "sentences_per_s": round(BATCH / med, 2), "ms_per_batch": round(med * 1e3, 1),
            "ratio_vs_fp32_eager": round(BATCH / med / base, 3),
            "cosine_mean": round(cos[n].mean().item(), 5), "cosine_min": round(cos[n].min().item(), 5),
            "int8_weights": len(int8_weights(m)) if isinstance(m, torch.nn.Module) else 0, "build_s": round(build_s, 1),
            **({"openvino_int8_ops": int8_ops(m.ov_model)} if hasattr(m, "ov_model") else {}),
            "runs_ms": [round(t * 1e3, 1) for t in times[n]],
        }
    k = methods.get(KILN)
    peers = PEERS
    complete = k is not None and all(p in methods for p in peers)
    result = {
        "date": date.today().isoformat(), "torch": torch.__version__, "torchao": torchao.__version__,
        "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__, "threads": THREADS, "batch": BATCH,
        "seq_len": SEQ,
        "model": "zoo:minilm (all-MiniLM-L6-v2, real weights)",
        "data": (f"rotten-tomatoes test split: throughput on its first {BATCH}, cosine on its first "
                 f"{len(texts)}; kiln's quantizers and SmoothQuant calibrated on the first {CALIBRATION} of "
                 "the train split"),
        "kiln_config": "configs/quant/minilm-w8a8-dynamic-smooth.toml",
        "repeats": args.repeats, "methods": methods,
        "targets": {
            "kiln_ge_2x_fp32_eager": k["ratio_vs_fp32_eager"] >= 2.0,
            "kiln_faster_than_int8_peers": all(k["sentences_per_s"] > methods[p]["sentences_per_s"] for p in peers),
            "kiln_cosine_above_int8_peers": all(k["cosine_mean"] > methods[p]["cosine_mean"] for p in peers),
            "kiln_cosine_mean_ge_0.99": k["cosine_mean"] >= 0.99,
        } if complete else "not all methods ran (--only)",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    report(result, args.json)
    print(f"\n{'method':44s} {'sent/s':>8s} {'ms/batch':>9s} {'x fp32':>7s} {'cos mean':>9s} {'cos min':>8s} {'int8 W':>6s}")
    for n, m in methods.items():
        print(f"{n:44s} {m['sentences_per_s']:8.1f} {m['ms_per_batch']:9.1f} {m['ratio_vs_fp32_eager']:7.2f} "
              f"{m['cosine_mean']:9.5f} {m['cosine_min']:8.5f} {m['int8_weights']:6d}")


if __name__ == "__main__":
    main()
