"""The report of a `kiln optimize` run (kiln.report: report.html, report.md, report.json), read
only from the run's records (optimize.json), so it can be written again from them at any time."""
from __future__ import annotations

from pathlib import Path

from kiln.optimize.config import OptimizeConfig
from kiln.report import Report
from kiln.search.pareto import front_indices


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def command(cfg: OptimizeConfig, out: Path) -> str:
    return (f"kiln optimize {cfg.src} --target {cfg.target} --max-drop {cfg.max_drop:g} --drop-type "
            f"{cfg.drop_type.value} --objective {cfg.objective.value} --budget {cfg.budget_min:g} "
            f"--batch {cfg.batch} --out {out}")


def write_report(out: Path, cfg: OptimizeConfig, state: dict) -> Path:
    base, result = state["baseline"], state.get("result", {})
    rep = Report(f"kiln optimize {cfg.src} on {cfg.target}", summary={
        "src": cfg.src, "target": cfg.target, "objective": cfg.objective.value, "cost": cfg.cost_objective,
        "max_drop": cfg.max_drop, "drop_type": cfg.drop_type.value, "met": result.get("met"),
        "chosen_trial": (result.get("chosen") or {}).get("number"),
        "speedup": result.get("deploy", {}).get("side_by_side", {}).get("speedup"),
        "eager_speedup": eager_speedup(base, result.get("deploy", {}).get("side_by_side", {}))})
    _before_after(rep, cfg, base, result)
    _roofline(rep, cfg, base, result)
    _pareto(rep, cfg, base, result)
    _layers(rep, state.get("sensitivity", []), result)
    _deployment(rep, result)
    _commands(rep, cfg, out, result)
    return rep.write(out)


def _before_after(rep: Report, cfg, base: dict, result: dict) -> None:
    sec = rep.section("Before and after", f"{base['metric']} on the validation ({base['val_size']}) and test "
                                          f"({base['test_size']}) splits; latency at batch {cfg.batch}.")
    if not result.get("met"):
        closest = result.get("closest")
        sec.note("no candidate met the constraint" + (
            f": the closest, trial {closest['number']}, scored {closest['metric']:.4f} on validation against the limit "
            f"{result['constraint']['limit']:.4f}" if closest else ": no trial finished"))
        sec.table(["figure", "before"], [[f"{base['metric']} (val)", base["val"]], [f"{base['metric']} (test)", base["test"]],
                                         ["latency (ms)", base.get("latency_ms")], ["FLOPs", base["flops"]],
                                         ["size (bytes)", base["model_bytes"]]])
        return
    conf, after, dep = result["confirm"], result["after"], result["deploy"]
    side = dep.get("side_by_side", {})
    lat_b, lat_a = side.get("baseline_ms"), side.get("result_ms")

    def thr(ms):
        return cfg.batch / (ms / 1e3) if ms else None

    rows = [[f"{base['metric']} (val)", base["val"], conf["val"]], [f"{base['metric']} (test)", base["test"], conf["test"]],
            ["backend", base["backend"], dep["chosen_backend"]],
            ["latency (ms, side by side)", lat_b, lat_a], ["throughput (samples/s)", thr(lat_b), thr(lat_a)],
            ["size (bytes)", base["model_bytes"], after["model_bytes"]], ["FLOPs", base["flops"], after["flops"]],
            [f"roofline latency on {cfg.target} (ms)", base["roofline_ms"], after["roofline_ms"]],
            ["energy, systolic-array model (uJ)", base.get("energy_uj"), after.get("energy_uj")]]
    sec.table(["figure", "before", "after"], rows)
    if side:
        sec.note(f"speedup {side['speedup']:.2f}x over the fastest fp32 backend ({base['backend']}): medians of "
                 f"{side['rounds']} interleaved rounds on {side['threads']} threads (kiln.timing)"
                 f"{'; contended' if side['contended'] else ''}")
        eager = eager_speedup(base, side)
        if eager:
            sec.note(f"speedup {eager:.3g}x over fp32 eager: phase 1's eager / {base['backend']} ratio times the "
                     f"speedup above, each measured side by side")
    sec.note(f"drop on validation {conf['drop_val']:+.4f}, on test {conf['drop_test']:+.4f} "
             f"(limit {result['constraint']['limit']:.4f} on validation)")


def eager_speedup(base: dict, side: dict) -> float | None:
    """The result against fp32 eager: two ratios each timed side by side, multiplied."""
    cands = {c["backend"]: c for c in base.get("backends", {}).get("candidates", [])}
    eager, best = cands.get("eager", {}).get("latency_s"), cands.get(base["backend"], {}).get("latency_s")
    return eager / best * side["speedup"] if eager and best and side.get("speedup") else None


def _roofline(rep: Report, cfg, base: dict, result: dict) -> None:
    plt = _plt()
    profile = base["profile"]        # as phase 1 read it: the report needs no profile file
    sec = rep.section("Roofline", f"{profile['name']}: the model's FLOPs per byte moved against the attainable FLOP/s, "
                                  "before and after (as it runs: quantized layers at their formats).")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    points = [("before", base["roofline"])]
    if result.get("met"):
        points.append(("after", result["after"]["roofline"]))
    intensities = [p["flops"] / max(p["bytes"], 1) for _, p in points]
    lo, hi = min(intensities + [0.1]) / 4, max(intensities + [100.0]) * 4
    xs = [lo * (hi / lo) ** (i / 50) for i in range(51)]
    for key, peak in sorted(profile["peak_flops"].items()):
        ax.plot(xs, [min(peak, profile["memory_bandwidth"] * x) for x in xs], label=f"{key} roof", lw=1)
    # before: a large hollow circle, after: a cross, so a point that did not move shows both
    styles = {"before": {"s": 140, "facecolors": "none", "edgecolors": "#1f77b4", "linewidths": 2},
              "after": {"s": 90, "marker": "x", "c": "#d62728", "linewidths": 2}}
    for (name, p), x in zip(points, intensities):
        ax.scatter([x], [p["flops"] / p["latency_s"]], zorder=3, label=f"{name} ({p['bound']}-bound)", **styles[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("attainable FLOP/s")
    ax.legend(fontsize=8)
    sec.figure("roofline", fig, "the model before and after on the target's roofline")
    sec.table(["model", "FLOPs", "bytes", "roofline (ms)", "bound"],
              [[n, p["flops"], p["bytes"], 1e3 * p["latency_s"], p["bound"]] for n, p in points])


def _pareto(rep: Report, cfg, base: dict, result: dict) -> None:
    rows = result.get("trials", [])
    sec = rep.section("Search", f"{len(rows)} trials: {base['metric']} on the validation subset against "
                                f"{result.get('cost_objective', cfg.cost_objective)}. Searched per layer (Linear and "
                                f"Conv): weight bits {list(cfg.bits)} (int8 candidates), sparsity "
                                f"{list(cfg.sparsity)}, low-rank budget {list(cfg.budgets)} (Linear and Conv2d); per "
                                f"candidate: fp32 or int8 and the backend. Other layers (norms, pooling) stay float.")
    if not rows:
        sec.note("no trial finished")
        return
    plt = _plt()
    up = result["constraint"]["higher_is_better"]
    points = [(r["metric"], r["cost"]) for r in rows]
    front = sorted(front_indices(points, ["max" if up else "min", "min"]), key=lambda i: rows[i]["cost"])
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.scatter([r["cost"] for r in rows], [r["metric"] for r in rows], s=14, c="#999", label="trials")
    ax.plot([rows[i]["cost"] for i in front], [rows[i]["metric"] for i in front], "o-", c="#1f77b4", label="Pareto front")
    ax.axhline(result["constraint"]["limit"], ls="--", c="#d62728", lw=1, label="limit")
    chosen = result.get("chosen")
    if chosen:
        ax.scatter([chosen["cost"]], [chosen["metric"]], marker="*", s=220, c="#ff7f0e", zorder=4, label="chosen")
    ax.set_xlabel(result.get("cost_objective", cfg.cost_objective))
    ax.set_ylabel(f"{base['metric']} (validation subset)")
    ax.legend(fontsize=8)
    sec.figure("pareto", fig, "every finished trial, the front, the limit and the chosen point")
    sec.table(["trial", "precision", base["metric"], result.get("cost_objective", cfg.cost_objective), "FLOPs", "bytes"],
              [[rows[i]["number"], rows[i]["params"].get("precision"), rows[i]["metric"], rows[i]["cost"],
                rows[i]["flops"], rows[i]["model_bytes"]] for i in front], caption="the Pareto front")


def _layers(rep: Report, sensitivity: list[dict], result: dict) -> None:
    sec = rep.section("Per-layer decisions and sensitivities",
                      "Sensitivity: the validation metric's change with one layer alone changed, every other float.")
    if result.get("decisions"):
        sec.table(["layer", "type", "precision", "weight bits", "sparsity", "low-rank budget"],
                  [[", ".join(d["layers"]), ", ".join(sorted(set(d.get("types", [])))), d["precision"], d["bits"],
                    d["sparsity"], d["budget"]]
                   for d in result["decisions"]], caption="the chosen point")
    if sensitivity:
        sec.table(["layer", "change", "value", "metric", "change in metric"],
                  [[r["group"], r["change"], r["value"], r["metric"], r["delta"]] for r in sensitivity])


def _deployment(rep: Report, result: dict) -> None:
    dep = result.get("deploy")
    if not dep:
        return
    sec = rep.section("Deployment", "kiln compile --backend auto of the deployable, then MLPerf LoadGen on the "
                                    "compiled model with the test split's real samples.")
    sec.table(["backend", "status", "latency (ms)", "rel. error", "reason"],
              [[c["backend"] + (" *" if c["backend"] == dep["chosen_backend"] else ""), c["status"],
                None if c["latency_s"] is None else 1e3 * c["latency_s"], c["error"], c["reason"]]
               for c in dep["compile"]["candidates"]], caption="backends (* chosen)")
    lg = dep.get("loadgen", {})
    if "error" in lg:
        sec.note(f"LoadGen did not run: {lg['error']}")
        return
    keys = [("result_samples_per_second", "samples/s"), ("result_qps_with_loadgen_overhead", "queries/s"),
            ("result_mean_latency_ns", "mean latency (ns)"), ("result_90.00_percentile_latency_ns", "p90 latency (ns)"),
            ("result_query_count", "queries")]
    sec.table(["LoadGen " + str(lg.get("scenario")), "value"],
              [[label, lg[k]] for k, label in keys if k in lg] + [["valid", lg.get("valid")]])


def _commands(rep: Report, cfg, out: Path, result: dict) -> None:
    sec = rep.section("Reproduce", "Each step as a command; the configs are in steps/.")
    sec.note(command(cfg, out))
    for s in result.get("steps", []):
        sec.note(s["command"])
    if result.get("met"):
        model = out / "model"
        sec.note(f"kiln eval {model}")
        sec.note(f"kiln compile {model} --backend auto --batch {cfg.batch} --out {out / 'compiled'}")
        sec.note(f"kiln bench {out / 'compiled'} --scenario {'SingleStream' if cfg.batch == 1 else 'Offline'} "
                 f"--min-duration {cfg.loadgen_s:g}")
