"""Speedup against a baseline: one rule, used by ``run --baseline`` and by ``report``.

A run's baseline is a single-process record (strategy ``single``, one process) with a throughput and
the same workload, dataset, device, batch size and epochs: a throughput ratio is only meaningful for
the same work on the same kind of device. Among several, the one agreeing with the run on the most of
loader, workers, precision, training samples, lr and seed (then the run itself: a single-process run
is its own baseline, speedup 1). Speedup is samples/s over the baseline's; efficiency is speedup per
process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MATCH_KEYS = ("workload", "dataset", "device", "batch_size", "epochs")
PREFER_KEYS = ("loader", "workers", "precision", "train_samples", "lr", "seed")
RULE = ("Speedup is a run's samples/s divided by that of its baseline: the single-process record "
        "(strategy single, one process) of the same workload, dataset, device, batch size and epochs — "
        "among several, the one sharing the most of loader, workers, precision, training samples, lr "
        "and seed, a single-process run being its own — and efficiency is speedup / nproc. A record "
        "made with --baseline keeps its own figures (baseline marked 'own').")


def mismatch(base: dict[str, Any], run: dict[str, Any]) -> str | None:
    """Why ``base`` cannot be the baseline of ``run`` (a record, or the part of one known before
    training), or None when it can."""
    if base.get("strategy") != "single" or (base.get("world_size") or 1) != 1:
        return f"it is a {base.get('strategy')} x{base.get('world_size')} run, not a single-process one"
    if not base.get("samples_per_second"):
        return "it has no throughput"
    for key in MATCH_KEYS:
        if base.get(key) != run.get(key):
            return f"its {key} is {base.get(key)!r}, this run's {run.get(key)!r}"
    return None


def choose(run: dict[str, Any], candidates: Sequence[dict[str, Any]]) -> int | None:
    """Index of ``run``'s baseline among ``candidates`` (records), or None."""
    fitting = [i for i, c in enumerate(candidates) if mismatch(c, run) is None]
    if not fitting:
        return None
    return max(fitting, key=lambda i: (sum(candidates[i].get(k) == run.get(k) for k in PREFER_KEYS),
                                       candidates[i] is run, -i))


def speedup(run: dict[str, Any], base: dict[str, Any]) -> dict[str, float]:
    """{speedup, efficiency} of ``run`` over ``base``."""
    ratio = (run.get("samples_per_second") or 0.0) / base["samples_per_second"]
    return {"speedup": ratio, "efficiency": ratio / max(run.get("world_size") or 1, 1)}
