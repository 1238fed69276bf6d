"""Reports from run records only — a comparison table, PNG plots, an index page; nothing here trains.

    parallelnn report runs/bench-seed-20250101-120000                 # every run below a directory
    parallelnn report runs/a runs/b 'runs/*-mnist-*' --out report --format md,csv,html

Writes into ``--out``: ``index.md`` (the table, then each plot with one sentence saying what it
compares), ``table.md`` / ``table.csv``, ``plots/*.png`` and, with ``html``, a self-contained
``index.html`` (images inline). :func:`make_report` is the single entry point: ``parallelnn
report``, ``bench seed`` and ``bench scaling`` all call it, so their reports look alike.
``write_table`` / ``print_table`` write and print the plain tables the bench verbs show.

Speedup and efficiency come from the records alone; :func:`baseline_for` states the matching rule.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import glob
import html
import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallelnn import baseline, parallel
from parallelnn.errors import UserError, warn
from parallelnn.record import METRICS, RECORD, atomic_write_text, read_metrics, read_record

LABELS = {
    "train_seconds": "train s", "test_accuracy": "accuracy", "samples_per_second": "samples/s",
    "tokens_per_second": "tokens/s", "mfu": "MFU", "study_seconds": "study s", "study_accuracy": "study acc",
    "world_size": "nproc", "eval_loss": "eval loss", "comm_share": "comm share",
}


def fmt(value: Any, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}" if key.endswith("per_second") else str(value)
    if isinstance(value, float):
        if key.endswith("per_second"):
            return f"{value:,.0f}"
        if key in ("test_accuracy", "study_accuracy", "mfu", "speedup", "efficiency", "comm_share"):
            return f"{value:.4f}" if "accuracy" in key else f"{value:.2f}"
        if key.endswith("seconds"):
            return f"{value:.2f}" if value >= 1 else f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def markdown(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "| " + " | ".join(LABELS.get(c, c.replace("_", " ")) for c in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c), c).replace("|", "/") for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body]) + "\n"


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
    return buf.getvalue()


def write_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], base: Path) -> list[Path]:
    """Write ``base.md`` and ``base.csv`` (atomically); return their paths."""
    base.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, text in ((".md", markdown(rows, columns)), (".csv", csv_text(rows, columns))):
        path = base.with_suffix(suffix)
        atomic_write_text(path, text)
        paths.append(path)
    return paths


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    print(markdown(rows, columns), end="", flush=True)


# --- the report ------------------------------------------------------------------------------------

FORMATS = ("md", "csv", "html")
COLUMNS = ("run", "workload", "dataset", "strategy", "device", "world_size", "loader", "train_seconds",
           "samples_per_second", "tokens_per_second", "speedup", "efficiency", "baseline", "mfu",
           "test_accuracy", "eval_loss")
OPTIONAL_COLUMNS = ("tokens_per_second", "test_accuracy", "eval_loss")  # left out when no run has them
# Fields that tell runs of one workload apart in plot labels, when they differ within the group.
LABEL_FIELDS = (("device", str), ("loader", str), ("workers", lambda v: f"{v} workers"), ("precision", str),
                ("batch_size", lambda v: f"batch {v}"), ("epochs", lambda v: f"{v} epoch{'s' * (v != 1)}"),
                ("mesh", lambda v: _mesh(v)), ("lr", lambda v: f"lr {v:g}"), ("seed", lambda v: f"seed {v}"))
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")
MATCH_RULE = baseline.RULE


@dataclass
class Run:
    """One record in a report, with what the table and plots add to it."""

    record: dict[str, Any]
    dir: Path | None
    name: str
    label: str = ""
    series: str = ""  # label without the process count: one line in the scaling plot
    color: str = PALETTE[0]
    row: dict[str, Any] = field(default_factory=dict)
    _events: list[dict[str, Any]] | None = None

    @property
    def group(self) -> tuple[str, str]:
        return str(self.record.get("workload")), str(self.record.get("dataset"))

    @property
    def events(self) -> list[dict[str, Any]]:
        """metrics.jsonl's events, read on first use (only plots need them)."""
        if self._events is None:
            self._events = read_metrics(self.dir) if self.dir is not None else []
        return self._events


@dataclass
class Report:
    runs: list[Run]
    skipped: list[tuple[str, str]]  # (path, why)
    rows: list[dict[str, Any]]
    columns: list[str]
    paths: list[Path] = field(default_factory=list)


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _expand(arg: str) -> tuple[list[Path], list[tuple[str, str]]]:
    """Record files named by one argument (a run directory, a directory of runs, a record.json, a glob),
    and the directories among them holding no record."""
    text = os.path.expanduser(str(arg))
    if _has_magic(text) and not os.path.exists(text):
        matches = sorted(glob.glob(text, recursive=True))
        if not matches:
            raise UserError(f"{arg}: matches no file or directory")
    elif os.path.exists(text):
        matches = [text]
    else:
        raise UserError(f"{arg}: no such file or directory")
    found, empty = [], []
    for match in matches:
        path = Path(match)
        if not path.is_dir():
            if path.name != METRICS:  # a glob like runs/*/* also names each run's event log
                found.append(path)
        elif (path / RECORD).is_file():
            found.append(path / RECORD)
        elif (path / METRICS).is_file():  # a run that has not finished (or is still running)
            empty.append((str(path), f"no {RECORD}: a run that did not finish (only {METRICS})"))
        else:  # a bench directory, or runs/: every record below it
            below = sorted(path.rglob(RECORD))
            found += below
            unfinished = sorted(m.parent for m in path.rglob(METRICS) if not (m.parent / RECORD).is_file())
            empty += [(str(d), f"no {RECORD}: a run that did not finish (only {METRICS})") for d in unfinished]
            if not below and not unfinished:
                empty.append((str(path), f"no {RECORD} in it or below it"))
    return found, empty


def collect(sources: Sequence[Any]) -> tuple[list[Run], list[tuple[str, str]]]:
    """Runs from record dicts (as ``runner.execute`` returns them) and paths or globs; plus what was
    skipped as (path, why). No readable record at all is a UserError naming the first problem."""
    if isinstance(sources, (str, os.PathLike, dict)):
        sources = [sources]
    runs: list[Run] = []
    skipped: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for source in sources:
        if isinstance(source, dict):
            out = source.get("out")
            runs.append(Run(dict(source), Path(out) if out else None, Path(out).name if out else _default_name(source)))
            continue
        found, empty = _expand(source)
        skipped += empty
        for path in found:
            key = path.resolve()
            if key in seen:
                continue
            seen.add(key)
            try:
                record = read_record(path)
            except UserError as err:
                why = str(err)
                skipped.append((str(path), why.removeprefix(f"{path}: ")))
                continue
            run_dir = path.parent
            runs.append(Run(record, run_dir, run_dir.name or str(run_dir)))
    if not runs:
        if not skipped:
            raise UserError("no records given")
        path, why = skipped[0]
        more = f" (and {len(skipped) - 1} more unusable)" if len(skipped) > 1 else ""
        raise UserError(f"no record to report: {path}: {why}{more}")
    return runs, skipped


def _default_name(record: dict[str, Any]) -> str:
    return f"{record.get('workload')}-{record.get('strategy')}-x{record.get('world_size', 1)}"


def baseline_for(run: Run, runs: Sequence[Run]) -> Run | None:
    """The run whose throughput ``run``'s speedup is measured against (the rule: :mod:`parallelnn.baseline`)."""
    index = baseline.choose(run.record, [r.record for r in runs])
    return None if index is None else runs[index]


def _mesh(mesh: Any) -> str:
    """{'dp': 2, 'pp': 2} -> 'dp2×pp2'."""
    if isinstance(mesh, dict):
        return "×".join(f"{k}{v}" for k, v in mesh.items())
    return str(mesh)


def _label_runs(runs: list[Run]) -> None:
    """Give each run of one group a label naming what sets it apart (strategy xN, then differing fields)."""
    varying = [(key, show) for key, show in LABEL_FIELDS if len({repr(r.record.get(key)) for r in runs}) > 1]
    for r in runs:
        # A mesh only says more than "strategy xN" when it has two dimensions (which, how large).
        extras = [show(r.record[key]) for key, show in varying if r.record.get(key) is not None
                  and (key != "mesh" or len(r.record["mesh"]) > 1)]
        r.series = " · ".join([str(r.record.get("strategy")), *extras])
        r.label = " · ".join([f"{r.record.get('strategy')} x{r.record.get('world_size', 1)}", *extras])
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.label] = counts.get(r.label, 0) + 1
    for r in runs:
        if counts[r.label] > 1:  # still alike: the directory name tells them apart
            r.label = f"{r.label} ({r.name})"
            r.series = f"{r.series} ({r.name})"


def _sort_key(run: Run) -> tuple:
    rec = run.record
    strategy = rec.get("strategy")
    return (parallel.order(strategy), rec.get("world_size") or 1,
            str(rec.get("device")), str(rec.get("loader")), rec.get("workers") or 0, run.name)


def arrange(runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """Group runs by workload and dataset (in the order first met), sort each group, label and colour them."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    arranged = []
    for (workload, dataset), members in groups.items():
        members.sort(key=_sort_key)
        _label_runs(members)
        for i, r in enumerate(members):
            r.color = PALETTE[i % len(PALETTE)]
        arranged.append((f"{workload} on {dataset}" if dataset != workload else workload, members))
    return arranged


def comparison_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """The comparison table's rows (also stored on each run as ``run.row``), in ``runs``' order."""
    for r in runs:
        rec = r.record
        row = {k: rec.get(k) for k in COLUMNS if k in rec}
        row["run"] = r.name
        row["world_size"] = rec.get("world_size") or 1
        row["eval_loss"] = rec.get("eval_loss", rec.get("test_loss"))
        if rec.get("speedup") is not None:  # made with --baseline: its own figures win
            own = rec.get("baseline") or {}
            row["speedup"], row["efficiency"] = rec["speedup"], rec.get("efficiency")
            row["baseline"] = (Path(own["out"]).name if own.get("out") else "?") + " (own)"
        else:
            base = baseline_for(r, runs)
            if base is not None:
                row.update(baseline.speedup(rec, base.record))
                row["baseline"] = "itself" if base is r else base.name
        r.row = row
    return [r.row for r in runs]


def report_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [c for c in COLUMNS if c not in OPTIONAL_COLUMNS or any(r.get(c) is not None for r in rows)]


def parse_formats(formats: str | Sequence[str]) -> tuple[str, ...]:
    items = formats.split(",") if isinstance(formats, str) else list(formats)
    chosen = tuple(dict.fromkeys(f.strip().lower() for f in items if f.strip()))
    bad = [f for f in chosen if f not in FORMATS]
    if bad or not chosen:
        raise UserError(f"--format {','.join(items)}: choose among {', '.join(FORMATS)}, comma-separated")
    return chosen


def build_report(sources: Sequence[Any], out_dir: str | os.PathLike, formats: str | Sequence[str] = ("md", "csv"),
                 title: str = "parallelnn report", tables: Sequence[tuple[str, Sequence[dict], Sequence[str]]] = ()
                 ) -> Report:
    """:func:`make_report`, returning the whole :class:`Report` (runs, skipped, rows, paths)."""
    formats = parse_formats(formats)
    runs, skipped = collect(sources)
    for path, why in skipped:
        warn(f"skipped {path}: {why}")
    groups = arrange(runs)
    ordered = [r for _, members in groups for r in members]
    rows = comparison_rows(ordered)
    columns = report_columns(rows)
    out = Path(out_dir)
    try:
        (out / "plots").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {out}: cannot write there ({err.strerror or err})")
    report = Report(ordered, skipped, rows, columns)

    figures = _plots(groups, out)
    sections = [(t, list(r), list(c)) for t, r, c in tables]
    advice_sections, advice_figures = _advice(sources, out)
    sections += advice_sections
    figures = advice_figures + figures
    atomic_write_text(out / "index.md", _index_md(title, report, figures, sections, out))
    report.paths.append(out / "index.md")
    if "html" in formats:
        atomic_write_text(out / "index.html", _index_html(title, report, figures, sections, out))
        report.paths.append(out / "index.html")
    if "md" in formats:
        atomic_write_text(out / "table.md", markdown(rows, columns))
        report.paths.append(out / "table.md")
    if "csv" in formats:
        atomic_write_text(out / "table.csv", csv_text(rows, columns))
        report.paths.append(out / "table.csv")
    report.paths += [out / rel for _, rel, _ in figures]
    return report


def make_report(sources: Sequence[Any], out_dir: str | os.PathLike, formats: str | Sequence[str] = ("md", "csv"),
                title: str = "parallelnn report", tables: Sequence[tuple[str, Sequence[dict], Sequence[str]]] = ()
                ) -> list[Path]:
    """Write the report of ``sources`` (record dicts, run directories, directories of runs, globs) into
    ``out_dir``; return the paths written, index.md first.

    ``formats``: any of md, csv, html (index.md is always written). ``tables``: extra (heading, rows,
    columns) tables shown before the comparison, e.g. bench seed's rows beside the study's figures.
    Unreadable records among readable ones are skipped with a warning and listed in the index.
    """
    return build_report(sources, out_dir, formats, title, tables).paths


def _plots(groups: list[tuple[str, list[Run]]], out: Path) -> list[tuple[str, str, str]]:
    """Draw every plot that has data: (heading, path relative to out, sentence) each."""
    from parallelnn import plots

    if not plots.available():
        warn("no plots: matplotlib is not installed (pip install 'parallelnn[report]')")
        return []
    figures = []
    gpt2 = [r for _, members in groups for r in members if r.record.get("workload") == "gpt2"]
    for heading, name, draw in (
            ("Time and throughput", "time_throughput.png", lambda p: plots.time_throughput(groups, p)),
            ("Scaling", "scaling.png", lambda p: plots.scaling(groups, p)),
            ("Loss and accuracy per epoch", "curves.png", lambda p: plots.curves(groups, p)),
            ("GPT-2 training metrics", "hf_metrics.png", lambda p: plots.hf_metrics(gpt2, p))):
        sentence = draw(out / "plots" / name)
        if sentence:
            figures.append((heading, f"plots/{name}", sentence))
    return figures


ADVICE_COLUMNS = ("candidate", "predicted_ms", "measured_ms", "step_iqr", "error", "memory_mb", "note")


def _advice(sources: Sequence[Any], out: Path) -> tuple[list, list]:
    """For each advise directory among the sources (its ``advice.json``): its ranked candidates as a table,
    and its predicted-vs-measured plot with the recommendation as the sentence."""
    sections, figures = [], []
    found = []
    for source in sources:
        if isinstance(source, (str, os.PathLike)):
            path = Path(os.path.expanduser(str(source)))
            found += [path] if path.name == "advice.json" else sorted(path.rglob("advice.json")) if path.is_dir() else []
    if not found:
        return sections, figures
    from parallelnn.advise.answer import plot, step_iqr_text  # the cost model's modules: only for advice

    for i, path in enumerate(found):
        try:
            advice = json.loads(path.read_text())
            rows = [{"candidate": c["label"], "predicted_ms": _ms(c.get("predicted_step_seconds")),
                     "measured_ms": _ms(c.get("measured_step_seconds")),
                     "step_iqr": step_iqr_text(c),
                     "error": _error(c.get("predicted_step_seconds"), c.get("measured_step_seconds")),
                     "memory_mb": round(c["memory_bytes_per_rank"] / 1e6, 2) if c.get("memory_bytes_per_rank") else None,
                     "note": c.get("reason") or ((c.get("trial") or {}).get("reason") or "")}
                    for c in advice["candidates"]]
        except (OSError, ValueError, KeyError, TypeError) as err:
            warn(f"skipped {path}: not readable advice ({err})")
            continue
        rec = advice.get("recommendation") or {}
        sections.append((f"Advice for {advice.get('workload')}: {rec.get('sentence', 'no trial was measured')}",
                         rows, list(ADVICE_COLUMNS)))
        name = f"advice-{i + 1}.png"
        if plot(advice, out / "plots" / name):
            figures.append((f"Advice for {advice.get('workload')}", f"plots/{name}",
                            "Predicted beside measured samples/s of each trial of parallelnn advise; "
                            + (f"recommended: {rec['sentence']}" if rec else "no trial was measured") + "."))
    return sections, figures


def _ms(seconds: Any) -> float | None:
    return round(seconds * 1e3, 2) if seconds else None


def _error(predicted: Any, measured: Any) -> str:
    return f"{(predicted - measured) / measured:+.0%}" if predicted and measured else ""


def _sources_line(report: Report) -> str:
    n = len(report.runs)
    return (f"Made from {n} run record{'s' * (n != 1)} alone (nothing was re-run) on "
            f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. Train time is the training "
            f"loops only (see each record's `timing`); MFU is against the peak measured on the run's machine "
            f"(`parallelnn info`).")


def _index_md(title: str, report: Report, figures, sections, out: Path) -> str:
    lines = [f"# {title}", "", _sources_line(report), ""]
    for heading, rows, columns in sections:
        lines += [f"## {heading}", "", markdown(rows, columns)]
    lines += ["## Runs", "", markdown(report.rows, report.columns), MATCH_RULE, ""]
    if report.skipped:
        lines += ["Skipped (unusable records):", ""] + [f"- `{p}`: {why}" for p, why in report.skipped] + [""]
    for heading, rel, sentence in figures:
        lines += [f"## {heading}", "", sentence, "", f"![{heading}]({rel})", ""]
    return "\n".join(lines)


def _html_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(LABELS.get(c, c.replace('_', ' ')))}</th>" for c in columns)
    def cell(value: Any, column: str) -> str:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return f"<td{' class=n' if number else ''}>{html.escape(fmt(value, column))}</td>"

    body = "".join("<tr>" + "".join(cell(r.get(c), c) for c in columns) + "</tr>\n" for r in rows)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def _index_html(title: str, report: Report, figures, sections, out: Path) -> str:
    """index.md's content as one self-contained page: the PNGs are inlined (base64), nothing is fetched."""
    import re

    def inline_code(text: str) -> str:
        return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))

    parts = [f"<h1>{html.escape(title)}</h1>", f"<p>{inline_code(_sources_line(report))}</p>"]
    for heading, rows, columns in sections:
        parts += [f"<h2>{html.escape(heading)}</h2>", _html_table(rows, columns)]
    parts += ["<h2>Runs</h2>", _html_table(report.rows, report.columns), f"<p>{inline_code(MATCH_RULE)}</p>"]
    if report.skipped:
        items = "".join(f"<li><code>{html.escape(p)}</code>: {html.escape(why)}</li>" for p, why in report.skipped)
        parts.append(f"<p>Skipped (unusable records):</p><ul>{items}</ul>")
    for heading, rel, sentence in figures:
        data = base64.b64encode((out / rel).read_bytes()).decode("ascii")
        parts += [f"<h2>{html.escape(heading)}</h2>", f"<p>{html.escape(sentence)}</p>",
                  f'<img alt="{html.escape(heading)}" src="data:image/png;base64,{data}">']
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}"
             "table{border-collapse:collapse;font-size:.85em}th,td{border:1px solid #ccc;padding:3px 7px}"
             "td.n{text-align:right}th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee}")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")


# --- the verb ---------------------------------------------------------------------------------------

def add_parser(verbs) -> None:
    p = verbs.add_parser("report", help="tables and plots from run records (never re-runs anything)",
                         description="Compare runs from their records: a table (md, csv), PNG plots and "
                                     "index.md (index.html with --format html) in --out.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_GLOB",
                   help="run directories, record.json files, directories holding runs, or quoted globs")
    p.add_argument("--out", metavar="DIR", help="where the report goes (default runs/report-<UTC time>)")
    p.add_argument("--format", default="md,csv", metavar="md,csv,html",
                   help="table formats, comma-separated; index.md is always written, html adds index.html")
    p.add_argument("--title", default="parallelnn report", help="the index page's heading")
    p.set_defaults(handler=cmd_report)


def cmd_report(ns) -> int:
    parse_formats(ns.format)  # a bad --format is reported before anything is read
    out = ns.out or os.path.join("runs", "report-" + _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S"))
    if Path(out).exists() and not Path(out).is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    report = build_report(ns.runs, out, ns.format, ns.title)
    print_table(report.rows, report.columns)
    print(f"report of {len(report.runs)} run{'s' * (len(report.runs) != 1)}"
          + (f" ({len(report.skipped)} skipped)" if report.skipped else "")
          + f": {', '.join(str(p) for p in report.paths)}", flush=True)
    return 0
