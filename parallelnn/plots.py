"""PNG plots of run records for ``parallelnn report`` (matplotlib's Agg canvas; no display, no pyplot state).

    parallelnn report runs/bench-seed-20250101-120000 --out report   # -> report/plots/*.png

Each function takes the report's groups of runs (one group per workload and dataset; each run has
``record``, ``events`` from metrics.jsonl, ``label``, ``series`` and ``color``), draws one figure,
writes it, and returns one sentence saying what the figure compares, or None when it has nothing to
draw. :func:`parallelnn.report.make_report` calls them in order.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Hugging Face Trainer names, and the metrics.jsonl event that carries each.
HF_METRICS = (
    ("train/loss", "step"), ("train/learning_rate", "step"), ("train/grad_norm", "step"),
    ("eval/loss", "eval"), ("eval/runtime", "eval"), ("eval/samples_per_second", "eval"),
    ("eval/steps_per_second", "eval"),
)
MARKERS_UP_TO = 30  # points per line drawn with markers (a 1-epoch run is then still visible)
MARKERS = "osD^v<>ph"
LINESTYLES = ("-", "--", "-.", ":")


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    # A Figure with its own Agg canvas: nothing global (pyplot, the backend) changes in the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)  # a reader never sees half a PNG


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def throughput_key(runs: Sequence[Any]) -> tuple[str, str]:
    """(unit, record key): tokens for language models (their records have tokens_per_second), else samples."""
    if all(r.record.get("tokens_per_second") is not None for r in runs):
        return "tokens", "tokens_per_second"
    return "samples", "samples_per_second"


def _short(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _hbars(ax, values: list[float | None], colors: list[str], text) -> None:
    y = list(range(len(values)))
    shown = [v if v is not None else 0.0 for v in values]
    ax.barh(y, shown, color=colors, height=0.7)
    top = max(shown) if any(shown) else 1.0
    for yi, v in zip(y, values):
        ax.text((v or 0.0) + top * 0.01, yi, text(v) if v is not None else "n/a", va="center", fontsize=8)
    ax.set_xlim(0, top * 1.22)  # room for the value labels
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def time_throughput(groups: Sequence[tuple[str, list]], path: Path) -> str | None:
    """Horizontal bars per run: train seconds (left) and samples/s or tokens/s (right), a row per group."""
    groups = [(t, runs) for t, runs in groups if any(_finite(r.record.get("train_seconds")) for r in runs)]
    if not groups:
        return None
    heights = [1.1 + 0.42 * len(runs) for _, runs in groups]
    from matplotlib.ticker import FuncFormatter

    fig = _figure(12, sum(heights) + 0.4)
    axes = fig.subplots(len(groups), 2, squeeze=False, gridspec_kw={"height_ratios": heights})
    parts = []
    for (title, runs), (ax_t, ax_r) in zip(groups, axes):
        unit, key = throughput_key(runs)
        colors = [r.color for r in runs]
        seconds = [_finite(r.record.get("train_seconds")) for r in runs]
        rates = [_finite(r.record.get(key)) for r in runs]
        _hbars(ax_t, seconds, colors, lambda v: f"{v:.3g} s")
        _hbars(ax_r, rates, colors, _short)
        for ax in (ax_t, ax_r):
            ax.set_yticks(range(len(runs)), [r.label for r in runs] if ax is ax_t else [])
            ax.set_ylim(len(runs) - 0.5, -0.5)  # first run on top, as in the table
        ax_t.set_title(f"{title}: train time", loc="left", fontsize=10)
        ax_t.set_xlabel("seconds in the training loops (lower is better)")
        ax_r.set_title("throughput", loc="left", fontsize=10)
        ax_r.set_xlabel(f"{unit}/s (higher is better)")
        # Compact tick labels (25k, not 25000): six-digit rates otherwise run into each other.
        ax_r.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _short(v) if v else "0"))
        best = max((r for r, v in zip(runs, rates) if v), key=lambda r: r.record[key], default=None)
        if best is not None:
            parts.append(f"{title}: {len(runs)} run{'s' * (len(runs) != 1)}, the highest throughput "
                         f"{best.record[key]:,.0f} {unit}/s ({best.label})")
    _save(fig, path)
    return ("Train time (the training loops only) and throughput of each run, side by side for each "
            "workload and dataset — " + "; ".join(parts) + ".")


def scaling(groups: Sequence[tuple[str, list]], path: Path) -> str | None:
    """Speedup and efficiency against the number of processes, a line per strategy, with the ideal line."""
    rows = []
    for title, runs in groups:
        measured = [r for r in runs if _finite(r.row.get("speedup")) is not None and r.record.get("world_size")]
        if len({r.record["world_size"] for r in measured}) > 1:
            rows.append((title, measured))
    if not rows:
        return None
    fig = _figure(12, 3.8 * len(rows))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    compared = []
    for (title, runs), (ax_s, ax_e) in zip(rows, axes):
        sizes = sorted({r.record["world_size"] for r in runs})
        ax_s.plot(sizes, sizes, "--", color="0.55", label="ideal (speedup = nproc)")
        ax_e.axhline(1.0, ls="--", color="0.55", label="ideal (efficiency 1)")
        series: dict[str, list] = {}
        for r in runs:
            series.setdefault(r.series, []).append(r)
        top_eff = 1.0
        for i, (name, members) in enumerate(series.items()):
            members.sort(key=lambda r: r.record["world_size"])
            xs = [r.record["world_size"] for r in members]
            for ax, key in ((ax_s, "speedup"), (ax_e, "efficiency")):
                _line(ax, list(zip(xs, [r.row[key] for r in members])), members[0], name, i, len(series))
            top_eff = max(top_eff, *(r.row["efficiency"] for r in members))
        compared.append(f"{title}: {', '.join(series)} at {', '.join(map(str, sizes))} processes")
        for ax in (ax_s, ax_e):
            ax.set_xticks(sizes)
            ax.set_xlabel("processes (nproc)")
            ax.grid(alpha=0.3)
            ax.margins(x=0.1)
        # From (just below) zero, so a strategy that slows training down shows how far, unclipped.
        top_speedup = max(max(sizes), *(r.row["speedup"] for r in runs))
        ax_s.set_ylim(-0.04 * top_speedup, top_speedup * 1.08)
        ax_e.set_ylim(-0.04 * top_eff, top_eff * 1.15)
        ax_s.set_ylabel("speedup vs single process")
        ax_e.set_ylabel("efficiency (speedup / nproc)")
        ax_s.set_title(f"{title}: speedup", loc="left", fontsize=10)
        ax_e.set_title("efficiency", loc="left", fontsize=10)
        ax_e.legend(fontsize=8, loc="best")
    _save(fig, path)
    return (f"Speedup and efficiency against the number of processes, each run against its matching "
            f"single-process record, the dashed grey line being perfect scaling — {'; '.join(compared)}.")


def _loss_points(run) -> list[tuple[float, float]]:
    curve = run.record.get("loss_curve") or []
    points = [(i + 1.0, _finite(v)) for i, v in enumerate(curve)]
    if not curve:  # an older or partial record: the epoch events of metrics.jsonl
        points = [(e.get("train/epoch"), _finite(e.get("train/loss"))) for e in run.events if e.get("event") == "epoch"]
    return [(x, y) for x, y in points if x is not None and y is not None]


def _eval_points(run, metric: str) -> list[tuple[float, float]]:
    """(epoch, metric) for each evaluation; mid-epoch evaluations (--eval-every) fall between epochs."""
    rec = run.record
    per_epoch = rec["steps"] / rec["epochs"] if rec.get("steps") and rec.get("epochs") else None
    points = []
    for entry in rec.get("eval_curve") or []:
        x = entry["global_step"] / per_epoch if per_epoch and entry.get("global_step") else entry.get("epoch")
        points.append((x, _finite(entry.get(f"test_{metric}"))))
    if not points:
        points = [(e.get("train/epoch"), _finite(e.get(f"eval/{metric}"))) for e in run.events
                  if e.get("event") == "eval"]
    return [(x, y) for x, y in points if x is not None and y is not None]


def _line(ax, points, run, label: str | None = None, index: int = 0, count: int = 1) -> None:
    """One run's line. Runs with equal numbers (same seed and data, another loader) would hide each
    other, so the i-th of ``count`` lines gets its own marker and dash, and earlier markers are drawn
    larger: overlapping points show as nested markers rather than one."""
    xs, ys = zip(*points)
    few = len(points) <= MARKERS_UP_TO
    ax.plot(xs, ys, color=run.color, label=label or run.label, linestyle=LINESTYLES[index % len(LINESTYLES)],
            marker=MARKERS[index % len(MARKERS)] if few else None,
            markersize=4 + (count - 1 - index) * min(2.5, 7 / max(count - 1, 1)),  # 11 at most
            linewidth=1.5)


def _epoch_axis(ax, last: float) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if last <= 3:  # a 1- or 2-epoch run: whole epochs, not 0.96 ... 1.04
        ax.set_xlim(0.5, last + 0.5)


def curves(groups: Sequence[tuple[str, list]], path: Path) -> str | None:
    """Training loss (left) and test accuracy, or eval loss without one (right), per epoch; a row per group."""
    rows = []
    for title, runs in groups:
        metric = "accuracy" if any(_eval_points(r, "accuracy") for r in runs) else "loss"
        drawn = [(r, _loss_points(r), _eval_points(r, metric)) for r in runs]
        drawn = [d for d in drawn if d[1] or d[2]]
        if drawn:
            rows.append((title, metric, drawn))
    if not rows:
        return None
    fig = _figure(12, 3.8 * len(rows))
    axes = fig.subplots(len(rows), 2, squeeze=False)
    metrics = set()
    for (title, metric, drawn), (ax_l, ax_m) in zip(rows, axes):
        metrics.add(metric)
        for i, (run, loss, evals) in enumerate(drawn):
            if loss:
                _line(ax_l, loss, run, index=i, count=len(drawn))
            if evals:
                _line(ax_m, evals, run, index=i, count=len(drawn))
        last = max(x for _, loss, evals in drawn for x, _ in loss + evals)
        ax_l.set_title(f"{title}: training loss", loc="left", fontsize=10)
        ax_l.set_ylabel("mean training loss of the epoch")
        shown_as = "test accuracy" if metric == "accuracy" else "eval loss"
        ax_m.set_title(shown_as, loc="left", fontsize=10)
        ax_m.set_ylabel(f"{shown_as} after the epoch")
        for ax in (ax_l, ax_m):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            _epoch_axis(ax, last)
        ax_m.legend(fontsize=8, loc="best")
    _save(fig, path)
    n = sum(len(d) for _, _, d in rows)
    shown = "test accuracy" if metrics == {"accuracy"} else "test accuracy (eval loss where there is none)" \
        if "accuracy" in metrics else "eval loss"
    one_point = all(len(loss) <= 1 and len(evals) <= 1 for _, _, d in rows for _, loss, evals in d)
    return (f"Mean training loss and {shown} after each epoch, all {n} runs of a workload on one axis "
            f"({'; '.join(t for t, _, _ in rows)})"
            + ("; every run trained one epoch, so each is one point, and equal points show as nested markers."
               if one_point else "."))


def hf_metrics(runs: Sequence[Any], path: Path) -> str | None:
    """The gpt2 runs' Hugging Face metrics against global step, one panel each, from metrics.jsonl."""
    if not runs:
        return None
    from matplotlib.ticker import MaxNLocator

    several_groups = len({r.group for r in runs}) > 1
    fig = _figure(16, 7.5)
    axes = list(fig.subplots(2, 4).flatten())
    handles: dict[str, Any] = {}
    for ax, (name, kind) in zip(axes, HF_METRICS):
        drawn = False
        for i, run in enumerate(runs):
            points = [(e["train/global_step"], _finite(e.get(name))) for e in run.events
                      if e.get("event") == kind and e.get("train/global_step") is not None]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                label = f"{run.group[1]}: {run.label}" if several_groups else run.label
                _line(ax, points, run, label, i, len(runs))
                handles.setdefault(label, ax.get_lines()[-1])
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("global step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # whole steps, even one point
        ax.grid(alpha=0.3)
    legend_ax = axes[len(HF_METRICS)]
    legend_ax.axis("off")
    if handles:
        legend_ax.legend(list(handles.values()), list(handles), loc="center", fontsize=9, title="gpt2 runs")
    _save(fig, path)
    return (f"The Hugging Face-style metrics of the {len(runs)} gpt2 run{'s' * (len(runs) != 1)} against global "
            f"step, one panel each: train loss, learning rate and gradient norm from the step events, and eval "
            f"loss, runtime, samples/s and steps/s from the evaluations.")
