"""The training loop: written once, never branching on a strategy's name.

Timing is honest by construction: ``train_seconds`` is the sum of the epochs' training loops,
measured after a device synchronisation, excluding evaluation (and checkpoint saving), data
download and preparation, model building and process start-up — each of those is recorded apart.

Losses: each step's summed loss stays on the device; at each flush point (end of epoch, before an
evaluation) the pending steps' sums are added over ranks in one collective and divided by the global
batch sizes, giving exactly the loss a single process would report for the same batches.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from parallelnn.launch import T0_ENV, Context
from parallelnn.measure import CommProbe, now
from parallelnn.progress import Progress
from parallelnn.record import Recorder


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.distributed and ctx.world_size > 1:
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
    interval: tuple[float, int] | None = None  # at log steps: (seconds, samples) since the previous one


def eval_name(key: str) -> str:
    """Summary key -> metric name: test_accuracy -> eval/accuracy, test_loss -> eval/loss, x -> eval/x."""
    return "eval/" + key.removeprefix("test_")


@dataclass
class Hooks:
    """Optional callbacks at step boundaries (checkpointing, fault injection in tests)."""

    after_step: list = field(default_factory=list)  # fn(state) -> None


FAULT_ENV = "PARALLELNN_FAULT"


def injected_fault(ctx: Context):
    """A test hook from ``PARALLELNN_FAULT=RANK:STEP:KIND`` (KIND: raise, kill, hang), or None.

    For testing what users meet in production: a rank that raises, dies (SIGKILL) or stops
    responding after global step STEP. It fires only in the first attempt of a job (not after a
    torchrun restart), so a restarted job can finish.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or ctx.restart_count > 0:
        return None
    rank, step, kind = spec.split(":")
    if int(rank) != ctx.rank:
        return None

    def hook(trainer) -> None:
        if trainer.state.global_step != int(step):
            return
        if kind == "raise":
            raise RuntimeError(f"injected fault: rank {ctx.rank} raised after step {step}")
        if kind == "kill":
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            while True:
                time.sleep(3600)

    return hook


@dataclass
class LoopState:
    epoch: int = 0
    global_step: int = 0
    step_in_epoch: int = 0
    samples: int = 0
    train_seconds: float = 0.0
    loss_curve: list[float] = field(default_factory=list)
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    stop_requested: bool = False


class Trainer:
    def __init__(self, engine, built, cfg, ctx: Context, train_loader, test_loader, recorder: Recorder,
                 progress: Progress, hooks: Hooks | None = None, state: LoopState | None = None):
        self.engine, self.built, self.cfg, self.ctx = engine, built, cfg, ctx
        self.train_loader, self.test_loader = train_loader, test_loader
        self.recorder, self.progress = recorder, progress
        self.hooks = hooks or Hooks()
        fault = injected_fault(ctx)
        if fault is not None:
            self.hooks.after_step.append(fault)
        self.state = state or LoopState()
        self.eval_keys = tuple(built.extra.get("eval_keys", ("loss_sum", "correct", "count")))
        self.pending: list[StepLog] = []
        self.flops_per_sample = 0.0  # set by the runner, for the MFU of step events
        self.peak_flops = 0.0
        self._interval_start: tuple[float, int] | None = None
        # Multi-rank runs profile a few early steps to see how much time collectives take.
        self.comm_probe = CommProbe(ctx.device) if ctx.distributed and ctx.world_size > 1 else None
        self.first_step_seconds: float | None = None
        self.startup_seconds: float | None = None
        self.step_seconds: list[float] = []
        self.last_loss: float | None = None
        self.tokens_per_sample = built.tokens_per_sample

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
            seconds, samples = p.interval
            if seconds > 0:
                values["train/samples_per_second"] = samples / seconds
                if self.tokens_per_sample:
                    values["train/tokens_per_second"] = samples * self.tokens_per_sample / seconds
                if self.peak_flops:
                    values["mfu"] = samples * self.flops_per_sample / seconds / self.peak_flops
            self.recorder.log("step", **values)
        self.pending.clear()
        self.last_loss = losses[-1]
        return losses

    def _log_point(self, step: int) -> tuple[float, int] | None:
        """At every --log-every-th step: (seconds, samples) since the last log point, after a device sync."""
        log_every = self.cfg.log_every or 0
        if not log_every or step % log_every:
            return None
        t, samples = now(self.ctx.device), self.state.samples
        start_t, start_samples = self._interval_start
        self._interval_start = (t, samples)
        return t - start_t, samples - start_samples

    # -- evaluation --------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        engine, built = self.engine, self.built
        engine.train(False)
        t0 = now(self.ctx.device)
        sums = torch.zeros(len(self.eval_keys), dtype=torch.float64, device=self.ctx.device)
        steps = samples = 0
        for x, y, n in self.test_loader:
            out = engine.eval_step(x, y)
            steps += 1
            samples += n
            if out is not None and engine.counts_outputs:
                batch = built.eval_sums(out, y)
                sums += torch.stack([batch[k].to(torch.float64) for k in self.eval_keys])
        all_reduce_sum(sums, self.ctx)
        runtime = now(self.ctx.device) - t0
        engine.train(True)
        metrics = built.summarize(dict(zip(self.eval_keys, sums.tolist())))
        metrics.update({"runtime": runtime, "samples_per_second": samples / runtime if runtime else 0.0,
                        "steps_per_second": steps / runtime if runtime else 0.0})
        return metrics

    def _log_eval(self, metrics: dict[str, float]) -> None:
        s = self.state
        values = {eval_name(k): v for k, v in metrics.items()}
        self.recorder.log("eval", **values, **{"train/epoch": round(s.global_step / max(len(self.train_loader), 1), 4),
                                               "train/global_step": s.global_step})
        s.eval_curve.append({"epoch": s.epoch + 1, "global_step": s.global_step, **metrics})

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> LoopState:
        cfg, ctx, engine, s = self.cfg, self.ctx, self.engine, self.state
        steps_per_epoch = len(self.train_loader)
        if ctx.distributed and ctx.world_size > 1:
            dist.barrier()
        engine.train(True)
        while s.epoch < cfg.epochs and not s.stop_requested:
            self.train_loader.set_epoch(s.epoch)
            epoch_losses: list[float] = []
            epoch_counts: list[int] = []
            t_epoch = now(ctx.device)
            self._interval_start = (t_epoch, s.samples)
            t_paused = 0.0
            for x, y, n in self._skip_done(self.train_loader):
                t_step = time.perf_counter()
                if self.startup_seconds is None and T0_ENV in os.environ:
                    self.startup_seconds = time.time() - float(os.environ[T0_ENV])
                if self.comm_probe:
                    self.comm_probe.before_step(s.global_step + 1)
                loss_sum, grad_norm = engine.train_step(x, y, engine.dp_size / n)
                if self.comm_probe:
                    self.comm_probe.after_step(s.global_step + 1)
                if self.first_step_seconds is None:
                    self.first_step_seconds = now(ctx.device) - t_step
                s.global_step += 1
                s.step_in_epoch += 1
                s.samples += n
                self.pending.append(StepLog(s.global_step, loss_sum if engine.counts_outputs
                                            else torch.zeros_like(loss_sum), n, grad_norm, engine.lr(),
                                            self._log_point(s.global_step)))
                epoch_counts.append(n)
                self.progress.step(s.epoch, n * (self.tokens_per_sample or 1),
                                   lambda: (loss_sum.item() / max(n, 1) * engine.dp_size) if engine.counts_outputs
                                   else self.last_loss)
                if cfg.eval_every and s.global_step % cfg.eval_every == 0:
                    t_pause = now(ctx.device)
                    progress_paused = self.progress.pause()
                    epoch_losses += self.flush()
                    self._log_eval(self.evaluate())
                    t_paused += self._paused_since(t_pause)
                    self.progress.resume(progress_paused)
                t_pause = time.perf_counter()
                if self._run_hooks():
                    t_paused += self._paused_since(t_pause)
                if s.stop_requested:
                    break
            epoch_losses += self.flush()
            t_train = now(ctx.device) - t_epoch - t_paused
            if ctx.distributed and ctx.world_size > 1:
                # An epoch ends when its slowest rank ends: agree on the time.
                t = torch.tensor([t_train], dtype=torch.float64, device=ctx.device)
                dist.all_reduce(t, op=dist.ReduceOp.MAX)
                t_train = float(t.item())
            s.train_seconds += t_train
            if s.stop_requested and s.step_in_epoch < steps_per_epoch:
                break
            self.step_seconds.append(t_train / max(len(epoch_counts), 1))
            mean_loss = (sum(l * c for l, c in zip(epoch_losses, epoch_counts)) / max(sum(epoch_counts), 1)
                         if epoch_losses else float("nan"))
            s.loss_curve.append(mean_loss)
            progress_paused = self.progress.pause()
            metrics = self.evaluate()
            self.progress.resume(progress_paused)
            self._log_eval(metrics)
            self.recorder.log("epoch", **{"train/epoch": s.epoch + 1, "train/loss": mean_loss,
                                          "train/global_step": s.global_step, "train/seconds": t_train,
                                          "train/samples_per_second": sum(epoch_counts) / t_train if t_train else 0.0,
                                          "train/learning_rate": engine.lr()},
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
        self.progress.close()
        return s

    def _skip_done(self, loader):
        """When resuming mid-epoch, skip the batches already trained (same order: same seed and epoch)."""
        skip = self.state.step_in_epoch
        for i, batch in enumerate(loader):
            if i < skip:
                continue
            yield batch

    def _paused_since(self, t_pause: float) -> float:
        """Seconds since ``t_pause`` (after a sync), also left out of the current logging interval."""
        paused = now(self.ctx.device) - t_pause
        t, samples = self._interval_start
        self._interval_start = (t + paused, samples)
        return paused

    def _run_hooks(self) -> bool:
        for hook in self.hooks.after_step:
            hook(self)
        return bool(self.hooks.after_step)


def final_eval(state: LoopState) -> dict[str, float]:
    return state.eval_curve[-1] if state.eval_curve else {}


def finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
