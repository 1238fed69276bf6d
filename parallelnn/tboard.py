"""TensorBoard output for ``parallelnn run ... --tensorboard``: the metrics.jsonl events as scalars.

    parallelnn run mnist --tensorboard --out runs/m   # then: tensorboard --logdir runs/m/tensorboard

The sink is one of ``Recorder.sinks``: it receives every event dict that goes to metrics.jsonl and
writes its numbers under the same names (``train/loss``, ``eval/accuracy`` ...) at the event's
``train/global_step``, so TensorBoard, metrics.jsonl and the report's plots agree. Only rank 0 has a
recorder, so only rank 0 writes. The ``tensorboard`` package is optional
(``pip install 'parallelnn[tensorboard]'``); :func:`require` says so before any training starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INSTALL_HINT = "pip install 'parallelnn[tensorboard]'"
SUBDIR = "tensorboard"


def _writer_class():
    # torch.utils.tensorboard imports the tensorboard package and raises ImportError without it.
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter


def require() -> None:
    """Raise a one-line UserError when --tensorboard cannot work here (the package is missing)."""
    from parallelnn.errors import UserError

    try:
        _writer_class()
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL_HINT}")


class TensorBoardSink:
    """Writes each event's numeric values as scalars under their metrics.jsonl names."""

    def __init__(self, run_dir: str | Path):
        self.log_dir = Path(run_dir) / SUBDIR
        self.writer = _writer_class()(log_dir=str(self.log_dir))
        self.seen_step_loss = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        step = event.get("train/global_step")
        for name, value in event.items():
            if name in ("event", "train/global_step") or isinstance(value, bool) \
                    or not isinstance(value, (int, float)):
                continue
            if kind == "epoch":
                # An epoch event repeats the eval event just written at the same step; writing those
                # again would put two identical points there.
                if name.startswith("eval/"):
                    continue
                # Its train/loss is the epoch's mean: keep train/loss for the step losses when the run
                # logs them (--log-every), as Hugging Face does, and name the mean apart.
                if name == "train/loss" and self.seen_step_loss:
                    name = "train/epoch_loss"
            self.writer.add_scalar(name, value, global_step=step)
        if kind == "step" and "train/loss" in event:
            self.seen_step_loss = True
        if kind in ("eval", "epoch"):
            self.writer.flush()  # a few times per run: TensorBoard shows progress while it trains

    def close(self) -> None:
        self.writer.close()
