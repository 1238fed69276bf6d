"""The advice: candidates ranked (measured first, then predicted), the recommendation in one sentence with
its reason in numbers, ``OUT/advice.json`` (what ``--json`` prints), a plot, and ``--predict``'s curves."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from parallelnn.advise.costs import ModelStats
from parallelnn.advise.trials import median_uncertainty
from parallelnn.record import atomic_write_json

ADVICE = "advice.json"
FORMAT_VERSION = 1


def _mesh(layout) -> dict[str, int]:
    return layout.mesh()


def candidate_json(row) -> dict[str, Any]:
    c, p, t = row.candidate, row.prediction, row.trial
    return {
        "strategy": c.strategy, "nproc": c.layout.world_size, "mesh": _mesh(c.layout), "microbatches": c.microbatches,
        "schedule": c.schedule, "label": c.label(), "feasible": row.feasible, "reason": row.reason or "",
        "memory_bytes_per_rank": p.memory_bytes_per_rank if p else None,
        "memory_breakdown": p.memory_breakdown if p else None,
        "memory_per_rank": p.memory_per_rank if p else None,  # pipeline stages: each rank's; else null (alike)
        "predicted_step_seconds": p.step_seconds if p else None,
        "predicted_samples_per_second": p.samples_per_second if p else None,
        "predicted_compute_seconds": p.compute_seconds if p else None,
        "predicted_exposed_comm_seconds": p.exposed_comm_seconds if p else None,
        "predicted_bubble_seconds": p.bubble_seconds if p else None,
        "measured_step_seconds": t.step_seconds if t else None,
        "measured_samples_per_second": t.samples_per_second if t else None,
        "measured_steps": t.steps if t else None,
        "measured_step_iqr": t.step_iqr if t else None,
        "measured_tensor_bytes": t.tensor_bytes if t else None,
        "measured_peak_memory_bytes": t.peak_memory_bytes if t else None,
        "trial": None if t is None else {"command": t.command, "reason": t.reason, "wall_seconds": t.wall_seconds},
    }


def ranked(rows) -> list:
    """Measured candidates by measured step time, then the others by predicted step time, infeasible last."""
    def key(r):
        if r.trial and r.trial.step_seconds:
            return (0, r.trial.step_seconds)
        if r.feasible and r.prediction:
            return (1, r.prediction.step_seconds)
        return (2, 0.0)
    return sorted(rows, key=key)


def reason_sentence(best, rows, batch: int) -> str:
    """Why ``best`` wins, in numbers: against the runner-up of another strategy, what that one pays."""
    measured = [r for r in rows if r.trial and r.trial.step_seconds]
    others = [r for r in measured if r.candidate.strategy != best.candidate.strategy]
    rate = best.trial.samples_per_second
    head = f"{best.candidate.label()}: {rate:,.0f} samples/s measured"
    if not others:
        return head + " (no other strategy could be measured)"
    rival = min(others, key=lambda r: r.trial.step_seconds)
    p, cost = rival.prediction, ""
    if p is not None and p.step_seconds > 0:
        seconds, what = _overhead(p)
        if seconds > 0.01 * p.step_seconds:
            cost = (f"; its compute alone takes {p.compute_seconds * 1e3:.1f} ms a step, and {what} add "
                    f"{seconds * 1e3:.1f} ms, {seconds / p.step_seconds:.0%} of its predicted step")
        elif best.prediction is not None:  # the rival pays nothing besides compute (one process): say the winner's
            mine, what = _overhead(best.prediction)
            cost = (f"; each of its ranks computes {best.prediction.compute_seconds * 1e3:.1f} ms a step against "
                    f"{p.compute_seconds * 1e3:.1f} ms for {rival.candidate.label()}"
                    + (f", and {what} add {mine * 1e3:.1f} ms" if mine > 0 else ""))
    ratio = rate / rival.trial.samples_per_second
    noise = 2 * math.hypot(median_uncertainty(best.trial.step_iqr, best.trial.steps),
                           median_uncertainty(rival.trial.step_iqr, rival.trial.steps))
    close = (f" (within the trials' noise: ±{noise:.0%} on the ratio of their medians, two standard errors; a "
             "longer run would tell them apart)" if ratio - 1 < noise else "")
    return (f"{head}, {ratio:.2f}x the next best strategy, {rival.candidate.label()} "
            f"({rival.trial.samples_per_second:,.0f} samples/s){close}{cost}")


def _overhead(p) -> tuple[float, str]:
    """A prediction's largest cost besides compute: (seconds, what it is)."""
    return max([(p.exposed_comm_seconds + p.fixed_seconds, "communication and per-step framework work (collective "
                 "calls, hooks)"), (p.bubble_seconds, "pipeline bubble")])


def advice_json(rows, cfg, stats: ModelStats, machine) -> dict[str, Any]:
    order = ranked(rows)
    best = next((r for r in order if r.trial and r.trial.step_seconds), None)
    rec = None
    if best is not None:
        c = best.candidate
        rec = {"strategy": c.strategy, "nproc": c.layout.world_size, "mesh": _mesh(c.layout),
               "microbatches": c.microbatches, "schedule": c.schedule, "label": c.label(),
               "predicted_samples_per_second": best.prediction.samples_per_second if best.prediction else None,
               "measured_samples_per_second": best.trial.samples_per_second,
               "sentence": reason_sentence(best, rows, cfg.batch_size)}
    return {"format_version": FORMAT_VERSION, "workload": cfg.workload, "batch_size": cfg.batch_size,
            "device": machine.device.type, "recommendation": rec, "candidates": [candidate_json(r) for r in order],
            "model": vars(stats), "calibration": {"rates": {f"{n} processes, batch {b}": r for (n, b), r in
                                                            machine.rates.items()},
                                                  "collectives": {str(n): {k: {"latency": v["latency"],
                                                                               "bandwidth": v["bandwidth"]}
                                                                           for k, v in fit.items()}
                                                                  for n, fit in machine.links.items()},
                                                  "problems": list(machine.problems)},
            "memory_note": MEMORY_NOTE[machine.device.type == "cuda"]}


MEMORY_NOTE = (
    "memory_bytes_per_rank (predicted) and measured_tensor_bytes: parameters + gradients + optimizer state + "
    "activations saved for backward on the largest rank, counted by tensor storage; the prediction adds 'buffers' "
    "(FSDP's gathered blocks, a pipeline's receive buffers), which that count cannot see (pipeline stages differ: "
    "memory_per_rank has each rank's, and the largest without buffers may be another rank); the allocator's and "
    "framework's own memory and temporaries are in neither (measured_peak_memory_bytes, the resident-set peak on "
    "CPU, includes them)",
    "memory_bytes_per_rank (predicted): parameters + gradients + optimizer state + saved activations + buffers as "
    "each strategy divides them, plus 'runtime' (one process's step, its peak measured by the CUDA allocator here, "
    "less the parts counted for it) and 'data' (the splits the memory loader keeps on each GPU); "
    "measured_peak_memory_bytes: torch.cuda.max_memory_allocated of the largest rank over the trial")


def step_iqr_text(candidate: dict[str, Any]) -> str | None:
    """A measured candidate's step IQR as a percentage (None if it was not measured)."""
    iqr = candidate.get("measured_step_iqr")
    return f"{iqr:.0%}" if candidate.get("measured_step_seconds") and iqr is not None else None


def table(advice: dict[str, Any]) -> str:
    lines = [f"{'candidate':38} {'predicted':>10} {'measured':>10} {'IQR':>5} {'error':>7} {'memory/rank':>12}  note"]
    for c in advice["candidates"]:
        pred, meas = c["predicted_step_seconds"], c["measured_step_seconds"]
        err = f"{(pred - meas) / meas:+.0%}" if pred and meas else ""
        iqr = step_iqr_text(c) or ""
        mem = f"{c['memory_bytes_per_rank'] / 1e6:,.1f} MB" if c["memory_bytes_per_rank"] else ""
        note = c["reason"] or ((c["trial"] or {}).get("reason") or "")
        lines.append(f"{c['label'][:38]:38} {_ms(pred):>10} {_ms(meas):>10} {iqr:>5} {err:>7} {mem:>12}  {note[:70]}")
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds else ""


def plot(advice: dict[str, Any], path: Path) -> Path | None:
    """Predicted and measured samples/s of every tried candidate, side by side."""
    tried = [c for c in advice["candidates"] if c["measured_samples_per_second"]]
    if not tried:
        return None
    from parallelnn.plots import _figure

    fig = _figure(max(6.0, 0.9 * len(tried) + 2), 4.2)
    ax = fig.subplots()
    xs = range(len(tried))
    ax.bar([x - 0.2 for x in xs], [c["predicted_samples_per_second"] or 0 for c in tried], 0.4, label="predicted")
    measured = [c["measured_samples_per_second"] for c in tried]
    errors = [2 * median_uncertainty(c.get("measured_step_iqr"), c.get("measured_steps")) * m
              for c, m in zip(tried, measured)]  # two standard errors of each trial's median
    ax.bar([x + 0.2 for x in xs], measured, 0.4, yerr=errors, capsize=3,
           label="measured (±2 standard errors)")
    ax.set_xticks(list(xs), [c["label"] for c in tried], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("samples/s")
    ax.set_title(f"advise {advice['workload']}:\npredicted vs measured throughput of the trials", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path)
    return path


def write_answer(rows, cfg, stats, machine, out: Path, hardware, as_json: bool, log) -> int:
    advice = advice_json(rows, cfg, stats, machine)
    out.mkdir(parents=True, exist_ok=True)
    if hardware is not None:
        advice["predict"] = predicted(stats, hardware, cfg, out, log)
    figure = plot(advice, out / "advice.png")
    advice["plot"] = str(figure) if figure else None
    atomic_write_json(out / ADVICE, advice)
    if as_json:
        json.dump(advice, sys.stdout, indent=2, default=str)
        print()
        return 0
    log(table(advice))
    rec = advice["recommendation"]
    log(f"recommendation: {rec['sentence']}" if rec else "recommendation: none — no trial could be measured")
    log(f"advice: {out / ADVICE}" + (f", {figure}" if figure else ""))
    return 0


def predict_only(stats: ModelStats, cfg, out: Path, hardware, as_json: bool, log) -> int:
    """``--trials 0 --predict HW``: the predictions alone (the model was never built for real)."""
    batch = cfg.batch_size or 64
    cfg = type(cfg)(**{**cfg.to_dict(), "batch_size": batch})
    advice = {"format_version": FORMAT_VERSION, "workload": cfg.workload, "batch_size": batch, "device": "meta",
              "recommendation": None, "candidates": [], "model": vars(stats)}
    out.mkdir(parents=True, exist_ok=True)
    advice["predict"] = predicted(stats, hardware, cfg, out, (lambda m: None) if as_json else log)
    best = max((r for r in advice["predict"]["rows"] if r["feasible"]), key=lambda r: r["samples_per_second"], default=None)
    if best:
        advice["recommendation"] = {"strategy": best["strategy"], "nproc": best["devices"], "label": best["label"],
                                    "mesh": None, "microbatches": best.get("microbatches"),
                                    "predicted_samples_per_second": best["samples_per_second"],
                                    "measured_samples_per_second": None,
                                    "sentence": f"predicted on {hardware.name}: {best['label']} on {best['devices']} "
                                                f"devices, {best['samples_per_second']:,.1f} samples/s (not measured)"}
    atomic_write_json(out / ADVICE, advice)
    if as_json:
        json.dump(advice, sys.stdout, indent=2, default=str)
        print()
    else:
        log(f"recommendation: {advice['recommendation']['sentence']}" if best else "no layout fits this hardware")
        log(f"advice: {out / ADVICE}, {advice['predict']['plot']}")
    return 0


def predicted(stats: ModelStats, hardware, cfg, out: Path, log) -> dict[str, Any]:
    """``--predict HW``: every strategy and degree on that hardware against the number of devices."""
    from parallelnn.advise.predict import plot_curves, predict_curves

    dtype = "bf16" if cfg.precision == "fp32" and hardware.device_type == "cuda" else cfg.precision
    dtype = dtype if dtype in hardware.peak_flops else next(iter(hardware.peak_flops))
    curves = predict_curves(stats, hardware, cfg.batch_size, dtype)
    path = plot_curves(curves, out / f"predicted-{hardware.name}.png")
    best = curves.best()
    log(f"predicted on {hardware.name} ({dtype}, global batch {cfg.batch_size}) — PREDICTIONS, not measurements:")
    for (strategy, devices), row in sorted(best.items(), key=lambda kv: (kv[0][1], -kv[1]["samples_per_second"])):
        log(f"  {devices:>4} devices  {row['label']:34} {row['samples_per_second']:>12,.1f} samples/s  "
            f"speedup {row['speedup'] or 0:6.2f}  {row['memory_gb']:7.2f} GB/rank")
    for line in curves.assumptions:
        log(f"  assumes: {line}")
    return {"hardware": hardware.name, "dtype": dtype, "plot": str(path), "rows": curves.rows,
            "assumptions": curves.assumptions}
