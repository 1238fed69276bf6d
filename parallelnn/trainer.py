"""The training loop: written once, never branching on a strategy's name.

Timing is honest by construction: ``train_seconds`` is the sum of the epochs' training loops,
measured after a device synchronisation, excluding evaluation, checkpoint saving, data download and
preparation, model building and process start-up — each of those is recorded apart.

Losses: each step's summed loss stays on the device; at each flush point (end of epoch, before an
evaluation or a checkpoint) the pending steps' sums are added over ranks in one collective and
divided by the global batch sizes, giving exactly the loss a single process would report.

Stopping: a SIGTERM/SIGINT (a scheduler pre-empting the job, Ctrl-C) only sets a flag; ranks agree on
it through a small all-reduce on a CPU (gloo) group, one step late, so all stop after the same step,
save a checkpoint and leave. Everything the loop needs to continue exactly is in :class:`LoopState`.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallelnn import faults
from parallelnn.launch import T0_ENV, Context
from parallelnn.measure import CommProbe, TensorBytes, elapsed, mark, now
from parallelnn.progress import Progress
from parallelnn.record import Recorder
from parallelnn.watchdog import Phase

PROGRESS_FILE = "progress"  # rank 0's last finished step, to count the steps a failure lost


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.multi_rank:
        dist.all_reduce(t)
    return t


@dataclass
class StepLog:
    """One trained step awaiting its global loss (see :meth:`Trainer.flush`)."""

    step: int
    loss_sum: torch.Tensor
    n: int
    grad_norm: torch.Tensor | None
    lr: float
    # At log steps, since the previous one: (start mark, end mark, samples, seconds paused): see measure.mark.
    interval: tuple[Any, Any, int, float] | None = None


def eval_name(key: str) -> str:
    """Summary key -> metric name: test_accuracy -> eval/accuracy, test_loss -> eval/loss, x -> eval/x."""
    return "eval/" + key.removeprefix("test_")


@dataclass
class Hooks:
    """Optional callbacks at step boundaries (fault injection in tests, experiments)."""

    after_step: list = field(default_factory=list)  # fn(trainer) -> None


@dataclass
class LoopState:
    """Where training stands; saved in every checkpoint (JSON), restored on resume."""

    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0  # finished epochs
    epoch_seconds: float = 0.0  # the current epoch, before a resume
    epoch_losses: list[float] = field(default_factory=list)
    epoch_counts: list[int] = field(default_factory=list)
    loss_curve: list[float] = field(default_factory=list)
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    resumes: int = 0
    lost_steps: int = 0
    stop_requested: bool = False
    stop_signal: int | None = None


class StopFlag:
    """A stop request (from a signal) that every rank sees at the same step.

    Each step starts a non-blocking MAX all-reduce of this rank's flag on a gloo group and reads the
    previous step's result, so agreeing costs no waiting on the training's own devices or groups.
    """

    def __init__(self, ctx: Context, backend: str = "gloo"):
        self.local = 0
        self.group = dist.new_group(backend=backend) if ctx.multi_rank else None
        self._work = None
        self._buf = torch.zeros(1, dtype=torch.int32)

    def set(self, signum: int) -> None:
        self.local = signum

    def agreed(self) -> int:
        """The signal to stop for (0: go on), as decided by the previous step's reduction."""
        if self.group is None:
            return self.local
        decided = 0
        if self._work is not None:
            self._work.wait()
            decided = int(self._buf.item())
        self._buf = torch.tensor([self.local], dtype=torch.int32)
        self._work = dist.all_reduce(self._buf, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return decided

    def drain(self) -> None:
        if self._work is not None:
            self._work.wait()
            self._work = None


class Trainer:
    def __init__(self, engine, workload, cfg, ctx: Context, train_loader, test_loader, recorder: Recorder,
                 progress: Progress, *, hooks: Hooks | None = None, checkpointer=None, flops_per_sample: float = 0.0,
                 peak_flops: float = 0.0, watchdog=None):
        """``flops_per_sample`` and ``peak_flops`` give step events their MFU; ``watchdog`` (multi-rank jobs)
        is told where this rank is, for hang detection."""
        self.engine, self.workload, self.cfg, self.ctx = engine, workload, cfg, ctx
        self.train_loader, self.test_loader = train_loader, test_loader
        self.recorder, self.progress = recorder, progress
        self.checkpointer = checkpointer
        self.hooks = hooks or Hooks()
        faults.install(self, ctx)
        self.state = LoopState()
        self.stop = StopFlag(ctx)
        self.metrics = workload.metrics
        self.tokens_per_sample = workload.tokens_per_sample
        self.pending: list[StepLog] = []
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self._interval_start: tuple[Any, int, float] = (0.0, 0, 0.0)  # (mark, samples, paused total)
        self._paused = 0.0  # seconds of the current epoch spent outside training (eval, checkpoints)
        self._paused_total = 0.0  # the same over the whole run (log intervals subtract what they span)
        self._progress_fd: int | None = None
        # Multi-rank runs profile a few early steps to see how much time collectives take.
        self.comm_probe = CommProbe(ctx.device) if ctx.multi_rank else None
        # And one step counts the tensor memory each rank holds (what strategies divide).
        self.tensor_bytes = TensorBytes(step=2, steps=2)
        self.first_step_seconds: float | None = None
        self.startup_seconds: float | None = None
        self.step_seconds: list[float] = []
        self.last_loss: float | None = None
        self.last_checkpoint = None
        self.watchdog = watchdog

    def _at(self, phase: Phase) -> None:
        if self.watchdog is not None:
            self.watchdog.at(self.state.global_step + (phase == Phase.STEP), phase)

    # -- losses ------------------------------------------------------------------------------------
    def flush(self) -> list[float]:
        """Global per-step losses of the pending steps (one collective), written as step events."""
        if not self.pending:
            return []
        sums = torch.stack([p.loss_sum.float() for p in self.pending])
        all_reduce_sum(sums, self.ctx)
        losses = (sums.cpu() / torch.tensor([p.n for p in self.pending], dtype=torch.float32)).tolist()
        for p, loss in zip(self.pending, losses):
            if p.interval is None:
                continue
            values = {"train/loss": loss, "train/learning_rate": p.lr,
                      "train/epoch": round(p.step / max(len(self.train_loader), 1), 4), "train/global_step": p.step}
            if p.grad_norm is not None:
                values["train/grad_norm"] = float(p.grad_norm)
            start, end, samples, paused = p.interval
            seconds = elapsed(start, end) - paused
            if seconds > 0:
                values["train/samples_per_second"] = samples / seconds
                if self.tokens_per_sample:
                    values["train/tokens_per_second"] = samples * self.tokens_per_sample / seconds
                if self.peak_flops:
                    values["mfu"] = samples * self.flops_per_sample / seconds / self.peak_flops
            self.recorder.log("step", **values)
        self.state.epoch_losses += losses
        self.state.epoch_counts += [p.n for p in self.pending]
        self.pending.clear()
        self.last_loss = losses[-1]
        return losses

    def _log_point(self, step: int) -> tuple[Any, Any, int, float] | None:
        """At every --log-every-th step: (start mark, end mark, samples, seconds paused) since the last log point.
        On CUDA a mark is an event on the stream, read at the next flush: a log point does not wait for the
        device (elsewhere it is the time after a device sync)."""
        log_every = self.cfg.log_every or 0
        if not log_every or step % log_every:
            return None
        t, samples = mark(self.ctx.device), self.state.samples
        start_t, start_samples, start_paused = self._interval_start
        self._interval_start = (t, samples, self._paused_total)
        return start_t, t, samples - start_samples, self._paused_total - start_paused

    def _write_progress(self) -> None:
        """Rank 0 notes its last finished step, so that a resume can count the steps a failure lost.

        One fixed-width overwrite of a small open file per step (no fsync): microseconds.
        """
        if not self.recorder.enabled:
            return
        try:
            if self._progress_fd is None:
                self.recorder.out.mkdir(parents=True, exist_ok=True)
                self._progress_fd = os.open(self.recorder.out / PROGRESS_FILE, os.O_WRONLY | os.O_CREAT, 0o644)
            os.pwrite(self._progress_fd, f"{self.state.global_step:>20d}\n".encode(), 0)
        except OSError:
            pass  # only a count in the record depends on it

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        engine, keys = self.engine, self.metrics.keys
        engine.train(False)
        t0 = now(self.ctx.device)
        sums = torch.zeros(len(keys), dtype=torch.float64, device=self.ctx.device)
        steps = samples = 0
        for x, y, n in self.test_loader:
            self._at(Phase.EVAL)  # each batch is progress the watchdog sees: a long evaluation is no hang
            out = engine.eval_step(x, y)
            steps += 1
            samples += n
            if out is not None and engine.counts_outputs:
                batch = self.metrics.sums(out, y)
                sums += torch.stack([batch[k].to(torch.float64) for k in keys])
        all_reduce_sum(sums, self.ctx)
        runtime = now(self.ctx.device) - t0
        engine.train(True)
        metrics = self.metrics.summarize(dict(zip(keys, sums.tolist())))
        metrics.update({"runtime": runtime, "samples_per_second": samples / runtime if runtime else 0.0,
                        "steps_per_second": steps / runtime if runtime else 0.0})
        return metrics

    def _log_eval(self, metrics: dict[str, float]) -> None:
        s = self.state
        values = {eval_name(k): v for k, v in metrics.items()}
        self.recorder.log("eval", **values, **{"train/epoch": round(s.global_step / max(len(self.train_loader), 1), 4),
                                               "train/global_step": s.global_step})
        s.eval_curve.append({"epoch": s.epoch + 1, "global_step": s.global_step, **metrics})

    # -- saving and restoring ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # Stateful: the checkpointer saves it as "loop"
        """The loop's state for a checkpoint taken now (pending losses must have been flushed)."""
        state = dataclasses.asdict(self.state)
        if hasattr(self, "_epoch_start"):  # in an epoch (before fit, e.g. to check a checkpoint's kinds, not)
            state["epoch_seconds"] += now(self.ctx.device) - self._epoch_start - self._paused
        state.pop("stop_requested")
        state.pop("stop_signal")
        return state

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        fields = {f.name for f in dataclasses.fields(LoopState)}
        self.state = LoopState(**{k: v for k, v in saved.items() if k in fields})

    def checkpoint(self) -> None:
        """Save a checkpoint now (all ranks call it at the same step)."""
        if self.checkpointer is None:
            return
        t_pause = now(self.ctx.device)
        paused = self.progress.pause()
        self._at(Phase.CHECKPOINT)
        self.flush()
        self.last_checkpoint = self.checkpointer.save(self.state.global_step, loop=self) or self.last_checkpoint
        self.progress.resume(paused)
        self._pause_since(t_pause)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> LoopState:
        cfg, ctx, s = self.cfg, self.ctx, self.state
        if ctx.multi_rank:
            dist.barrier()
        self.engine.train(True)
        while s.epoch < cfg.epochs and not s.stop_requested:
            self._train_epoch()
            if s.stop_requested:
                break
            self._end_epoch()
        self.stop.drain()
        if self.comm_probe:
            self.comm_probe.close(s.global_step)
        self.progress.close()
        if self._progress_fd is not None:
            os.close(self._progress_fd)
            self._progress_fd = None
        if not s.stop_requested and self.recorder.enabled:  # finished: no internal file left in --out
            (self.recorder.out / PROGRESS_FILE).unlink(missing_ok=True)
        return s

    def _train_epoch(self) -> None:
        cfg, ctx, engine, s = self.cfg, self.ctx, self.engine, self.state
        self.train_loader.set_epoch(s.epoch)
        self.train_loader.plan.start = s.step_in_epoch  # resuming mid-epoch: same order, skip what is done
        if s.step_in_epoch == 0:
            s.epoch_losses, s.epoch_counts, s.epoch_seconds = [], [], 0.0
        self._epoch_start = now(ctx.device)
        self._interval_start = (mark(ctx.device), s.samples, self._paused_total)
        self._paused = 0.0
        for x, y, n in self.train_loader:
            t_step = time.perf_counter()
            if self.startup_seconds is None and T0_ENV in os.environ:
                self.startup_seconds = time.time() - float(os.environ[T0_ENV])
            if self.comm_probe:
                self.comm_probe.before_step(s.global_step + 1)
            self._at(Phase.STEP)
            # Not activations: the parameters and the batch (data).
            self.tensor_bytes.before_step(s.global_step + 1, itertools.chain(engine.parameters(), (x, y)))
            loss_sum, grad_norm = engine.train_step(x, y, engine.dp_size / n)
            self.tensor_bytes.after_step(s.global_step + 1, engine)
            if self.comm_probe:
                self.comm_probe.after_step(s.global_step + 1)
            if self.first_step_seconds is None:
                self.first_step_seconds = now(ctx.device) - t_step
            s.global_step += 1
            s.step_in_epoch += 1
            s.samples += n
            self._at(Phase.FINISHED)
            self.pending.append(StepLog(s.global_step, loss_sum if engine.counts_outputs
                                        else torch.zeros_like(loss_sum), n, grad_norm, engine.lr(),
                                        self._log_point(s.global_step)))
            self.progress.step(s.epoch, n * (self.tokens_per_sample or 1),
                               lambda: (loss_sum.item() / max(n, 1) * engine.dp_size) if engine.counts_outputs
                               else self.last_loss)
            self._write_progress()
            if cfg.eval_every and s.global_step % cfg.eval_every == 0:
                t_pause = now(ctx.device)
                paused = self.progress.pause()
                self._at(Phase.EVAL)
                self.flush()
                self._log_eval(self.evaluate())
                self.progress.resume(paused)
                self._pause_since(t_pause)
            for hook in self.hooks.after_step:
                hook(self)
            if cfg.checkpoint_every and s.global_step % cfg.checkpoint_every == 0:
                self.checkpoint()
            signum = self.stop.agreed()
            if signum:
                s.stop_requested, s.stop_signal = True, signum
                self.checkpoint()
                break
        self.flush()
        t_train = now(ctx.device) - self._epoch_start - self._paused
        if ctx.multi_rank:
            # An epoch ends when its slowest rank ends: agree on the time.
            t = torch.tensor([t_train], dtype=torch.float64, device=ctx.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            t_train = float(t.item())
        s.epoch_seconds += t_train

    def _end_epoch(self) -> None:
        cfg, s = self.cfg, self.state
        t_train = s.epoch_seconds
        s.train_seconds += t_train
        self.step_seconds.append(t_train / max(len(s.epoch_counts), 1))
        mean_loss = (sum(v * c for v, c in zip(s.epoch_losses, s.epoch_counts)) / max(sum(s.epoch_counts), 1)
                     if s.epoch_losses else float("nan"))
        s.loss_curve.append(mean_loss)
        paused = self.progress.pause()
        self._at(Phase.EVAL)
        metrics = self.evaluate()
        self.progress.resume(paused)
        self._log_eval(metrics)
        self.recorder.log("epoch", **{"train/epoch": s.epoch + 1, "train/loss": mean_loss,
                                      "train/global_step": s.global_step, "train/seconds": t_train,
                                      "train/samples_per_second": sum(s.epoch_counts) / t_train if t_train else 0.0,
                                      "train/learning_rate": self.engine.lr()},
                          **{eval_name(k): v for k, v in metrics.items() if k.startswith("test_")})
        acc = metrics.get("test_accuracy")
        every = max(1, cfg.epochs // 10)  # at most ~10 epoch lines, the last always
        if (s.epoch + 1) % every == 0 or s.epoch + 1 == cfg.epochs:
            self.progress.message(
                f"epoch {s.epoch + 1}/{cfg.epochs}: train loss {mean_loss:.4f}"
                + (f", test accuracy {acc:.4f}" if acc is not None else "")
                + (f", eval loss {metrics['test_loss']:.4f}" if "test_loss" in metrics and acc is None else "")
                + f", {t_train:.2f}s")
        s.epoch += 1
        s.step_in_epoch = 0
        s.epoch_losses, s.epoch_counts, s.epoch_seconds = [], [], 0.0

    def _pause_since(self, t_pause: float) -> None:
        """Leave the time since ``t_pause`` out of the epoch's training time and the logging interval."""
        paused = now(self.ctx.device) - t_pause
        self._paused += paused
        self._paused_total += paused


def final_eval(state: LoopState) -> dict[str, float]:
    return state.eval_curve[-1] if state.eval_curve else {}
