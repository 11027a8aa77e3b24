"""`kiln analyze SPEC --train`: the training step's cost per phase and its memory by kind."""
from __future__ import annotations

from rich.table import Table

from kiln.cli.common import console, seconds, si


def run(loaded, hw, optimizer: str, checkpoint: bool, precision: str):
    """Analyse one training step of `loaded` (its example inputs as the batch) on `hw`."""
    from kiln.analysis.train_step import analyze_step

    return analyze_step(loaded.model, loaded.example_inputs, loaded.example_kwargs, optimizer=optimizer,
                        checkpoint=checkpoint, precision=precision, hardware=hw, name=loaded.spec)


def print_step(spec: str, a) -> None:
    console.print(f"[bold]{spec}[/bold]  training step: {a.optimizer}, {a.precision}"
                  + (f", {len(a.checkpointed)} modules checkpointed" if a.checkpointed else ""))
    t = Table(title=f"cost per phase (roofline on {a.hardware})")
    for c in ("phase", "FLOPs", "bytes", "roofline"):
        t.add_column(c, justify="left" if c == "phase" else "right")
    rows = [("forward (with loss)", a.forward), ("backward", a.backward)]
    if a.recompute.flops:
        rows.append(("  of which recompute", a.recompute))
    rows.append(("optimizer", a.optimizer_update))
    for name, p in rows:
        t.add_row(name, si(p.flops, "FLOP"), si(p.bytes, "B"), seconds(p.roofline_s) if p.roofline_s is not None else "-")
    console.print(t)
    mem = a.memory
    m = Table(title=f"memory by kind (peak {si(mem.peak_bytes, 'B')} in the {mem.peak_phase}, at {mem.peak_node})")
    for c in ("kind", "at peak", "max over the step"):
        m.add_column(c, justify="left" if c == "kind" else "right")
    for kind, v in mem.at_peak.as_dict().items():
        m.add_row(kind.replace("_", " "), si(v, "B"), si(getattr(mem.max_by_kind, kind), "B"))
    console.print(m)
    b = a.bytes_per_param()
    console.print(f"model states per parameter: {b['weights']:g} + {b['gradients']:g} + {b['optimizer_states']:g} "
                  f"= {sum(b.values()):g} bytes (weights + gradients + optimizer states, as ZeRO counts them; "
                  f"mixed-precision Adam: 2 + 2 + 12 = 16)")
    if a.uncounted_ops:
        console.print(f"[yellow]ops without a FLOP count (counted as 0): {', '.join(a.uncounted_ops)}[/yellow]")
