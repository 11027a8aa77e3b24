"""LoRA and QLoRA against full fine-tuning, through `kiln train` itself (one process per run,
sequentially): test metric, trainable parameters, peak training-step memory, and time per
epoch (the trainer's own clock).

  python benchmarks/lora.py --json benchmarks/results/lora.json              # MiniLM on Rotten Tomatoes
  python benchmarks/lora.py --model gpt --json benchmarks/results/lora.json  # the zoo GPT on the reviews

MiniLM starts from its real pretrained weights; the zoo GPT has none, so it is first trained in
full (`--base-epochs`), and every variant then fine-tunes that run (`--init`) for the same epochs.
Peak memory is the training step's own: kiln.analysis.train_step.analyze_step on the trained
run's model (its adapters trainable, its base frozen, as `kiln train` left them) at the run's
batch size with AdamW, the peak of weights, gradients, optimizer states and activations live
at once. The process's ru_maxrss is kept beside it (`peak_rss_mb`) but not compared: evaluation,
data, Python and torch dominate it, and it barely moves between rows. Time per epoch needs a
quiet machine: say how many processes shared the cores.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import merge_result  # noqa: E402

# runs `kiln train` in this process, then prints the process's peak RSS (KiB on Linux)
WRAP = ("import resource, sys; from kiln.cli.main import main; sys.argv = ['kiln', *sys.argv[1:]]\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)")

# name -> (rank, NF4 base); alpha = 2r throughout (scaling 2), None: full fine-tuning
VARIANTS = {"full": None, "lora r=4": (4, False), "lora r=8": (8, False), "lora r=16": (16, False),
            "qlora r=8": (8, True)}
MODELS = {
    # the attention and MLP projections of BERT; the new classification head trains in full
    "minilm": {"spec": "zoo:minilm_cls", "targets": "query+key+value+dense", "head": "head", "lr": {"full": 5e-5, "lora": 1e-3}},
    # the zoo GPT's blocks; its (tied) output layer stays frozen
    "gpt": {"spec": "zoo:gpt", "targets": "qkv+proj+0+2", "head": "", "lr": {"full": 1e-3, "lora": 3e-3}},
}


def train(args: list[str], workdir: Path) -> dict:
    out = workdir / f"run{len(list(workdir.iterdir()))}"
    proc = subprocess.run([sys.executable, "-c", WRAP, "train", *args, "--out", str(out), "--json", str(out) + ".json"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"kiln train {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB"))
    metrics = json.loads(Path(str(out) + ".json").read_text())
    return metrics | {"peak_rss_mb": peak / 1024, "run": str(out)}


def step_memory(run: str) -> dict:
    """The peak memory of one training step of the run's model at the batch size it trained
    with (kiln.analysis.train_step), or why it could not be captured."""
    import tomllib

    from kiln.analysis.train_step import analyze_step
    from kiln.compile.auto import at_batch
    from kiln.errors import KilnError, first_line
    from kiln.runs.artifact import load_source

    source = load_source(run)
    batch = int(tomllib.loads((Path(run) / "config.toml").read_text()).get("batch_size", 64))
    loaded = at_batch(source.loaded, batch)
    try:
        a = analyze_step(source.model.train(), loaded.example_inputs, loaded.example_kwargs, optimizer="adamw")
    except KilnError as exc:
        return {"step_peak_mb": None, "step_note": first_line(exc)}
    m = a.memory
    return {"step_peak_mb": round(m.peak_bytes / 2**20, 1), "step_peak_phase": m.peak_phase, "batch": batch,
            "step_at_peak_mb": {k: round(v / 2**20, 1) for k, v in m.at_peak.as_dict().items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="minilm")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--base-epochs", type=int, default=3, help="gpt: full training before the variants")
    ap.add_argument("--max-steps", type=int, default=0, help="cap each run (a quick check of the script)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--processes-sharing-cores", type=int, default=1)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    spec = MODELS[a.model]
    common = ["--epochs", str(a.epochs), "--seed", "0"] + (["--max-steps", str(a.max_steps)] if a.max_steps else [])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        init = []
        if a.model == "gpt":
            base = train([spec["spec"], "--epochs", str(a.base_epochs), "--lr", "1e-3"]
                         + (["--max-steps", str(a.max_steps)] if a.max_steps else []), work)
            init = ["--init", base["run"]]
            rows["base (before fine-tuning)"] = {"metric": base["metric"], "test": base["after"]}
        for name in a.variants.split(","):
            flags = []
            if VARIANTS[name] is not None:
                r, nf4 = VARIANTS[name]
                text = f"r={r},alpha={2 * r},targets={spec['targets']}" + (f",train={spec['head']}" if spec["head"] else "")
                flags = ["--lora", text, *(["--qlora"] if nf4 else [])]
            lr = spec["lr"]["full" if name == "full" else "lora"]
            m = train([spec["spec"], *init, *flags, "--lr", str(lr), *common], work)
            mem = step_memory(m["run"])
            rows[name] = {"metric": m["metric"], "test": m["after"], "trainable_params": m["trainable_params"],
                          "params": m["params"], **mem, "peak_rss_mb": round(m["peak_rss_mb"], 1),
                          "time_per_epoch_s": round(m["train_time_s"] / max(m["epochs"], 1), 1), "lr": lr}
            print(f"{name:12s} {m['metric']} {m['after']:.4f}  trainable {m['trainable_params']:,}  "
                  f"step peak {mem['step_peak_mb']} MB  {rows[name]['time_per_epoch_s']} s/epoch", flush=True)
    entry = {"date": str(date.today()), "model": spec["spec"], "epochs": a.epochs, "max_steps": a.max_steps,
             "processes_sharing_cores": a.processes_sharing_cores, "rows": rows}
    if a.json:
        merge_result(a.json, a.model, entry)


if __name__ == "__main__":
    main()
