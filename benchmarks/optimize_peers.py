"""The peers of `kiln optimize` on one model, in their own environment (`make peers-venv`:
neural-compressor, nncf, openvino beside kiln's own pins), for benchmarks/optimize.py.

    .venv-peers/bin/python benchmarks/optimize_peers.py SRC --max-drop 0.01 --json PATH

SRC is a kiln spec or run directory; kiln loads the model, its dataset and splits (the same
validation split every method tunes on, the same test split every drop is measured on). Rows:
- INC autotune: neural_compressor.torch.quantization.autotune over its static int8 tuning set
  (INT8StaticQuantConfig.get_config_set_for_tuning: symmetric or not, KL or min-max
  activations) on the model exported for PT2E (neural_compressor.torch.export, dynamic batch:
  without IPEX, INC's static int8 is PT2E), tolerable_loss = the drop as a fraction of the fp32
  validation metric (INC's tolerance is relative), stopping at its first passing config, as
  INC does; the result runs under torch.compile (inductor lowers PT2E's quantize/dequantize
  pairs into int8 kernels), as INC's PT2E docs run it. (INC's whole config set, get_all_config_set,
  starts with weight-only int4 for LLMs: on a CNN that is one Linear, and nothing runs faster.);
- NNCF accuracy control: the model exported to ONNX, converted to OpenVINO, then
  nncf.quantize_with_accuracy_control(max_drop, DropType.ABSOLUTE) on the validation split;
- OpenVINO fp32 and OpenVINO int8 (nncf.quantize, 300 calibration samples).
Each is timed beside fp32 eager (kiln.timing, interleaved rounds) at batch 1 and its drop is
measured on the test split (and `met`: whether it is within --max-drop there). A method that
fails is a row with its reason. --methods runs some of them (a comma-separated list of the
row names' first words: inc, nncf, openvino-fp32, openvino-int8).
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from kiln.compile.auto import call
from kiln.runs.artifact import load_source
from kiln.timing import TimingConfig, measure
from kiln.train.evaluation import evaluate_model, source_splits


def _inputs(ds, n: int):
    return [ds[i][0].unsqueeze(0) for i in range(min(n, len(ds)))]


def _accuracy(predict, ds, n: int = 10_000) -> float:
    hits = 0
    total = min(n, len(ds))
    for i in range(total):
        x, y = ds[i]
        hits += int(np.argmax(predict(x.unsqueeze(0))) == int(y))
    return hits / total


def _time(model, fn, example) -> float:
    m = measure({"eager": lambda: call(model, example), "peer": lambda: fn(example)}, TimingConfig(rounds=20, warmup=3))
    return m.timings["eager"].median / m.timings["peer"].median


class _Example:
    def __init__(self, x):
        self.example_inputs, self.example_kwargs = (x,), {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("--max-drop", type=float, default=0.01)
    ap.add_argument("--json", required=True)
    ap.add_argument("--methods", default="inc,nncf,openvino-fp32,openvino-int8")
    a = ap.parse_args()
    methods = set(a.methods.split(","))
    source = load_source(a.src)
    splits = source_splits(source)
    model = source.model.eval()
    x0 = _inputs(splits.test, 1)[0]
    fp32_val = evaluate_model(model, splits, "val")[1]
    fp32_test = evaluate_model(model, splits, "test")[1]
    rows = []

    def row(method, fn):
        t0 = time.perf_counter()
        try:
            predict, extra = fn()
            wall = time.perf_counter() - t0
            acc = _accuracy(predict, splits.test)
            rows.append({"method": method, "wall_s": wall, "test": acc, "drop_test": fp32_test - acc,
                         "met": fp32_test - acc <= a.max_drop + 1e-9,
                         "eager_speedup": _time(model, lambda ex: predict(ex.example_inputs[0]), _Example(x0))} | extra)
        except Exception as exc:
            rows.append({"method": method, "error": f"{type(exc).__name__}: {exc}"[:300],
                         "trace": traceback.format_exc()[-600:]})

    def openvino(int8: bool):
        import nncf
        import openvino as ov

        ovm = ov.convert_model(model, example_input=x0)
        if int8:
            ovm = nncf.quantize(ovm, nncf.Dataset(_inputs(splits.train, 300), lambda x: x.numpy()))
        compiled = ov.compile_model(ovm, "CPU")
        return (lambda x: compiled(x.numpy())[0]), {}

    def nncf_accuracy_control():
        import nncf
        import openvino as ov

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            torch.onnx.export(model, (x0,), str(path), dynamo=False)
            ovm = ov.convert_model(str(path))
        val = [(splits.val[i][0].unsqueeze(0).numpy(), int(splits.val[i][1])) for i in range(len(splits.val))]

        def validate(compiled, data) -> float:
            return float(np.mean([np.argmax(compiled(x)[0]) == y for x, y in data]))

        q = nncf.quantize_with_accuracy_control(
            ovm, calibration_dataset=nncf.Dataset(val, lambda d: d[0]), validation_dataset=nncf.Dataset(val),
            validation_fn=validate, max_drop=a.max_drop, drop_type=nncf.DropType.ABSOLUTE)
        compiled = ov.compile_model(q, "CPU")
        return (lambda x: compiled(x.numpy())[0]), {}

    def inc_autotune():
        from neural_compressor.torch.export import export
        from neural_compressor.torch.quantization import INT8StaticQuantConfig, TuningConfig, autotune

        trials = []

        def eval_fn(m) -> float:
            from torchao.quantization.pt2e import allow_exported_model_train_eval

            if isinstance(m, torch.fx.GraphModule):      # PT2E's model refuses .eval() unless told
                allow_exported_model_train_eval(m)
            trials.append(evaluate_model(m, splits, "val")[1])
            return trials[-1]

        def run_fn(m):
            for x in _inputs(splits.train, 100):
                m(x)

        # an example of batch 2: torch.export specialises a dimension of size 1 to the constant 1
        batch = torch.export.Dim("batch", min=1, max=4096)
        exported = export(copy.deepcopy(model), example_inputs=(torch.cat([x0, x0]),), dynamic_shapes=({0: batch},))
        q = autotune(model=exported, tune_config=TuningConfig(config_set=[INT8StaticQuantConfig.get_config_set_for_tuning()],
                                                              tolerable_loss=a.max_drop / max(fp32_val, 1e-9)),
                     eval_fn=eval_fn, run_fn=run_fn, example_inputs=(x0,))
        compiled = torch.compile(q)
        with torch.no_grad():
            compiled(x0)
        return (lambda x: compiled(x).detach().numpy()), {"trials": len(trials), "val_per_trial": trials}

    runs = {"inc": ("INC autotune", inc_autotune),
            "nncf": ("NNCF accuracy control + OpenVINO", nncf_accuracy_control),
            "openvino-fp32": ("OpenVINO fp32", lambda: openvino(False)),
            "openvino-int8": ("OpenVINO int8", lambda: openvino(True))}
    for key, (method, fn) in runs.items():
        if key in methods:
            row(method, fn)
    Path(a.json).write_text(json.dumps({"src": a.src, "fp32_val": fp32_val, "fp32_test": fp32_test,
                                        "max_drop": a.max_drop, "rows": rows},
                                       indent=2))


if __name__ == "__main__":
    main()
