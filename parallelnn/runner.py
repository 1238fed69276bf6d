"""One run, as each rank executes it: build the workload, apply the strategy, train, write the record.

The flow is the one in DESIGN.md: config -> (launch) -> workload.build -> strategy.apply -> Trainer.fit
-> record. Nothing here depends on which workload or strategy was chosen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallelnn import launch, measure, parallel, workloads
from parallelnn.config import RunConfig, config_to_argv
from parallelnn.data.loaders import make_loader, steps_per_epoch
from parallelnn.errors import UserError, warn
from parallelnn.checkpoint import Checkpointer, resume_hint
from parallelnn.progress import Progress
from parallelnn.record import (Recorder, hardware, lock_out_dir, prepare_out_dir, read_record, unlock_out_dirs,
                               versions, write_or_explain)
from parallelnn.trainer import PROGRESS_FILE, Hooks, Trainer, final_eval
from parallelnn.watchdog import Watchdog

EVAL_TIMING = ("runtime", "samples_per_second", "steps_per_second")
TIMING_NOTE = ("train_seconds: the training loops only (slowest rank), after a device sync; excludes data "
               "download and preparation, model building, evaluation, checkpoint saving and process start-up")


def with_defaults(cfg: RunConfig) -> RunConfig:
    """A copy of ``cfg`` with the workload's defaults filled into the fields left None."""
    defaults = workloads.load(cfg.workload).DEFAULTS
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def default_out(cfg: RunConfig) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{cfg.workload}-{cfg.strategy}")


def _peak(ctx: launch.Context) -> float:
    """The device peak from the per-machine cache; with several local ranks only one of them probes."""
    if ctx.multi_rank:
        if ctx.local_rank == 0:
            measure.peak_flops(ctx.device)
        dist.barrier()
    return measure.peak_flops(ctx.device)


def execute(cfg: RunConfig, hooks: Hooks | None = None) -> dict[str, Any] | None:
    """Run ``cfg`` in this process (one rank of the job); return the record on rank 0."""
    cfg = with_defaults(cfg)
    ctx = launch.init(cfg, cfg.device)
    try:
        result = _execute(cfg, ctx, hooks)
    except BaseException:
        unlock_out_dirs()
        if not ctx.multi_rank:
            launch.teardown()
        # A failing rank leaves its peers mid-collective: tearing the group down now can crash or
        # hang, which would hide this rank's own error. The process is about to end anyway.
        raise
    unlock_out_dirs()
    launch.teardown()
    return result


def _execute(cfg: RunConfig, ctx: launch.Context, hooks: Hooks | None) -> dict[str, Any] | None:
    if cfg.tensorboard:  # before any data or model work: a missing package is a one-line error
        from parallelnn import tboard

        tboard.require()
    threads = launch.set_threads(cfg.threads, ctx.local_world_size)
    out = Path(launch.agree(cfg.out or default_out(cfg), ctx))
    if ctx.is_main and ctx.restart_count == 0 and not cfg.resume:
        prepare_out_dir(out, cfg.overwrite)
    log = (lambda msg: print(msg, flush=True)) if ctx.is_main and not cfg.quiet else (lambda msg: None)

    workload = workloads.load(cfg.workload)
    built = workload.build(cfg, ctx.device, log=log)
    if cfg.limit:
        if cfg.limit > len(built.train):
            warn(f"--limit {cfg.limit} is more than the {len(built.train)} training samples; using all of them")
        else:
            built.train = built.train.head(cfg.limit)
    strategy = parallel.load(cfg.strategy)
    if hasattr(strategy, "check"):
        strategy.check(cfg, built, ctx.world_size)
    baseline = read_record(cfg.baseline) if cfg.baseline else None
    if baseline is not None:  # a mismatch is found now, not after training
        check_baseline(baseline, cfg.workload, built.dataset)

    sample = built.train.head(min(8, len(built.train)))
    flops = measure.flops_per_sample(built.model, built.loss_fn, sample.prepare(sample.inputs), sample.targets)
    peak = _peak(ctx) * (ctx.world_size if ctx.device.type != "cpu" else ctx.nnodes)

    # The engine comes first: it knows the data-parallel layout the loaders follow.
    dp = strategy.dp_degree(cfg, ctx.world_size) if hasattr(strategy, "dp_degree") else 1
    total_steps = steps_per_epoch(len(built.train), cfg.batch_size, dp) * cfg.epochs
    engine = strategy.apply(built.model, built, cfg, ctx, total_steps)
    loaders = [make_loader(cfg.loader, split, cfg.batch_size, ctx.device, shuffle=shuffle, seed=cfg.seed,
                           dp_rank=engine.dp_rank, dp_size=engine.dp_size, workers=cfg.workers)
               for split, shuffle in ((built.train, True), (built.test, False))]
    if len(loaders[0]) == 0:
        raise UserError(f"no training batch: {len(built.train)} samples cannot be split over "
                        f"{engine.dp_size} data-parallel ranks")

    if ctx.is_main and (not os.environ.get(launch.SPAWNED_ENV) or cfg.nnodes > 1):  # else the spawning parent has it
        lock_out_dir(out, announce_takeover=ctx.restart_count == 0)
    recorder = Recorder(out, enabled=ctx.is_main, append=bool(cfg.resume) or ctx.restart_count > 0)
    if cfg.tensorboard and ctx.is_main:
        recorder.sinks.append(tboard.TensorBoardSink(out))
    if ctx.is_main:
        log(f"{cfg.workload} on {built.dataset}: {cfg.strategy} x{ctx.world_size} on {ctx.device.type}, "
            f"loader {cfg.loader}, {cfg.epochs} epochs, batch {cfg.batch_size}")
    unit = "tokens" if built.tokens_per_sample else "samples"
    progress = Progress(ctx.is_main and not cfg.quiet, len(loaders[0]) * cfg.epochs, cfg.epochs, unit=unit)
    checkpointer = Checkpointer(cfg, ctx, engine, built, Path(cfg.checkpoint_dir or out / "checkpoints"), out, recorder)
    if cfg.checkpoint_every:
        checkpointer.check_writable()
    trainer = Trainer(engine, built, cfg, ctx, loaders[0], loaders[1], recorder, progress, hooks, checkpointer)
    trainer.flops_per_sample, trainer.peak_flops = flops, peak
    resumed_from = resume(cfg, ctx, checkpointer, trainer, recorder, log)
    progress.done = trainer.state.global_step  # a resumed run's bar starts where it stands
    if ctx.multi_rank and "MASTER_ADDR" in os.environ:
        trainer.watchdog = Watchdog(ctx.rank, ctx.world_size, cfg.timeout, ctx.restart_count)
    started = time.time()
    try:
        with stop_on_signals(trainer):
            state = trainer.fit()
    finally:
        if trainer.watchdog is not None:
            trainer.watchdog.close()
        progress.close()
        for loader in loaders:
            loader.close()
    if state.stop_requested:
        raise Stopped(state.stop_signal, state.global_step, trainer.last_checkpoint)

    per_rank = launch.gather({"rank": ctx.rank, "host": os.uname().nodename,
                        "step_seconds": trainer.step_seconds,
                        "first_step_seconds": trainer.first_step_seconds,
                        "peak_memory_bytes": measure.peak_memory_bytes(ctx.device),
                        **(trainer.comm_probe.result if trainer.comm_probe else {}),
                        **engine.describe.get("per_rank", {})}, ctx)
    state_dict = engine.full_state_dict()  # collective: every rank takes part
    if ctx.is_main:
        if built.save is not None:
            write_or_explain(out / "model", lambda: built.save(state_dict, str(out / "model")),
                             checkpointer.last_good())
        else:
            write_or_explain(out / "model.safetensors", lambda: save_weights(state_dict, out / "model.safetensors"),
                             checkpointer.last_good())
    if not ctx.is_main:
        recorder.close()
        return None

    samples_per_second = state.samples / state.train_seconds if state.train_seconds else 0.0
    evaluation = final_eval(state)
    record: dict[str, Any] = {
        "workload": cfg.workload, "dataset": built.dataset, "strategy": cfg.strategy,
        "device": ctx.device.type, "device_name": measure.device_label(ctx.device),
        "world_size": ctx.world_size, "nnodes": ctx.nnodes, "nproc": ctx.local_world_size,
        "mesh": engine.describe.get("mesh"), "loader": cfg.loader, "workers": cfg.workers, "threads": threads,
        "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
        "precision": cfg.precision, "train_samples": len(built.train), "test_samples": len(built.test),
        "steps": state.global_step, "samples": state.samples,
        "train_seconds": state.train_seconds, "samples_per_second": samples_per_second,
        "test_accuracy": evaluation.get("test_accuracy"), "test_loss": evaluation.get("test_loss"),
        "final_train_loss": state.loss_curve[-1] if state.loss_curve else None,
        "loss_curve": state.loss_curve, "eval_curve": state.eval_curve,
        "flops_per_sample": flops, "peak_flops": peak, "mfu": measure.mfu(flops, samples_per_second, peak),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in per_rank),
        "first_step_seconds": trainer.first_step_seconds, "startup_seconds": trainer.startup_seconds,
        "timing": TIMING_NOTE, "strategy_detail": {k: v for k, v in engine.describe.items() if k != "per_rank"},
        "per_rank": per_rank, "restarts": ctx.restart_count, "resumes": state.resumes,
        "lost_steps": state.lost_steps, "resumed_from": str(resumed_from) if resumed_from else None,
        "last_checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
        "run_id": checkpointer.run_id, "resume_changes": checkpointer.changes or None,
        "hardware": hardware(ctx.device), "versions": versions(),
        "command": cfg.command or "parallelnn run " + " ".join(config_to_argv(cfg)),
        "config": cfg.to_dict(), "started_at": started, "finished_at": time.time(), "out": str(out),
        **built.extra.get("record", {}),
    }
    # Whatever else the workload's summary measured (e.g. perplexity) goes in too.
    record.update({k: v for k, v in evaluation.items() if k not in record and k not in EVAL_TIMING and k not in
                   ("epoch", "global_step")})
    if built.tokens_per_sample:
        record["tokens_per_sample"] = built.tokens_per_sample
        record["tokens_seen"] = state.samples * built.tokens_per_sample
        record["tokens_per_second"] = samples_per_second * built.tokens_per_sample
    if record.get("test_loss") is not None:
        record["eval_loss"] = record["test_loss"]
    if baseline is not None:
        record.update(compare_to_baseline(record, baseline))
    recorder.finish(record, checkpointer.last_good())
    recorder.close()
    return record


class Stopped(Exception):
    """Training stopped early on a signal, after saving a checkpoint."""

    def __init__(self, signum: int, step: int, checkpoint):
        import signal

        self.signum, self.exit_code = signum, 128 + signum
        name = signal.Signals(signum).name
        where = (f"checkpoint {checkpoint}; to continue, run the same command with --resume auto" if checkpoint
                 else "no checkpoint could be saved: a new run starts from the beginning")
        super().__init__(f"stopped by {name} after step {step}; {where}")


@contextlib.contextmanager
def stop_on_signals(trainer):
    """SIGTERM/SIGINT ask the trainer to stop at the next step boundary (with a checkpoint) instead
    of killing the process mid-step. A second signal acts as usual."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        trainer.stop.set(signum)
        for sig, old in previous.items():  # the next one is not caught
            signal.signal(sig, old)

    for sig in (signal.SIGTERM, signal.SIGINT):
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resume(cfg: RunConfig, ctx: launch.Context, checkpointer: Checkpointer, trainer: Trainer, recorder: Recorder,
           log) -> Path | None:
    """Continue from a checkpoint when asked (--resume) or when torchrun restarted this job."""
    if not (cfg.resume or ctx.restart_count > 0):
        return None
    path = checkpointer.resume_path(cfg.resume or "auto")
    if path is None:
        if ctx.is_main:
            warn(f"no complete checkpoint in {checkpointer.directory}; starting from the beginning")
        recorder.log("restart", restart=ctx.restart_count, checkpoint=None, **{"train/global_step": 0})
        return None
    checkpointer.load(path, loop=trainer)
    s = trainer.state
    lost = 0
    if ctx.is_main:
        try:
            last = int((recorder.out / PROGRESS_FILE).read_text().strip() or 0)
            lost = max(0, last - s.global_step)
        except (OSError, ValueError):
            pass
    s.resumes += 1
    s.lost_steps += lost
    recorder.log("restart", restart=ctx.restart_count, checkpoint=str(path), lost_steps=lost,
                 **{"train/global_step": s.global_step, "train/epoch": s.epoch})
    log(f"resumed from {path}: epoch {s.epoch + 1}, step {s.global_step}"
        + (f" ({lost} steps since that checkpoint were lost)" if lost else ""))
    return path


def save_weights(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Final weights as safetensors (cloned: tied weights must not share storage), atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().clone() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


def check_baseline(base: dict[str, Any], workload: str, dataset: str) -> None:
    if base.get("workload") != workload or base.get("dataset") != dataset:
        raise UserError(f"--baseline is a {base.get('workload')} run on {base.get('dataset')}, "
                        f"not {workload} on {dataset}")
    if not base.get("samples_per_second"):
        raise UserError("--baseline record has no throughput")


def compare_to_baseline(record: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """Speedup (throughput ratio) and efficiency (speedup per process) against a single-process record."""
    speedup = record["samples_per_second"] / base["samples_per_second"]
    return {"baseline": {"out": base.get("out"), "strategy": base.get("strategy"),
                         "world_size": base.get("world_size"), "samples_per_second": base["samples_per_second"]},
            "speedup": speedup, "efficiency": speedup / max(record["world_size"], 1)}


def execute_rank(cfg: RunConfig) -> dict[str, Any] | None:
    """``execute`` for one rank of a multi-process job: on failure, say why and end this process at
    once (``os._exit``), so that torchrun sees this rank's exit status and not a crash while the
    interpreter tears down a process group whose peers are gone."""
    import traceback

    from parallelnn.errors import report_user_error

    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    rank = os.environ.get("RANK", "?")
    try:
        return execute(cfg)
    except Stopped as stop:
        if os.environ.get("RANK") == "0":
            print(f"parallelnn: {stop}", file=sys.stderr)
        code = stop.exit_code
    except UserError as err:  # a spawned rank's parent prints it, once
        code = getattr(err, "exit_code", 2) if os.environ.get(launch.SPAWNED_ENV) else report_user_error(err)
        get_error_handler().record_exception(err)  # torchrun's agent reads it: the root cause
    except BaseException as err:  # noqa: BLE001 - anything else: its traceback is the message
        for line in traceback.format_exc().splitlines():
            print(f"[rank{rank}]: {line}", file=sys.stderr)
        get_error_handler().record_exception(err)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def preflight(cfg: RunConfig) -> RunConfig:
    """Before any process is spawned: every check that needs the data and model but no process group."""
    cfg = with_defaults(cfg)
    if cfg.tensorboard:
        from parallelnn import tboard

        tboard.require()
    device = launch.resolve_device(cfg.device)
    if cfg.strategy != "single":
        launch.check_backend(cfg.backend, device)
    cfg = dataclasses.replace(cfg, out=cfg.out or default_out(cfg))
    if not cfg.resume:
        prepare_out_dir(cfg.out, cfg.overwrite)
    quiet = lambda msg: None  # noqa: E731 - the ranks will say it all again
    built = workloads.load(cfg.workload).build(cfg, torch.device("cpu"), log=quiet)
    strategy = parallel.load(cfg.strategy)
    if hasattr(strategy, "check"):
        strategy.check(cfg, built, cfg.world_size)
    measure.peak_flops(device)  # probe now, once, rather than in competing ranks
    return cfg


def run_command(cfg: RunConfig) -> int:
    """``parallelnn run``: join a running job, spawn one, or run here; then print the summary."""
    job = launch.job_env()
    if job is not None:  # one rank of a job torchrun or srun started
        cfg = dataclasses.replace(cfg, nproc=job["local_world_size"],
                                  nnodes=max(1, job["world_size"] // job["local_world_size"]))
        from parallelnn.config import validate

        validate(cfg, launching=False)
        record = execute_rank(cfg)
        if os.environ.get(launch.SPAWNED_ENV):
            return 0  # the parent that spawned this rank prints the summary
    elif cfg.world_size > 1 or cfg.max_restarts > 0:  # torchrun's agent also restarts a lone process
        cfg = preflight(cfg)
        if cfg.nnodes == 1:  # with several machines, only the one running global rank 0 writes --out
            lock_out_dir(cfg.out)
        try:
            launch.spawn(cfg, ["run", *config_to_argv(cfg)])
        except launch.LaunchFailed as err:
            hint = resume_hint(cfg) if err.stopped else ""
            print(f"parallelnn: {'' if err.stopped else 'error: '}{err}{hint}", flush=True, file=sys.stderr)
            return err.exit_code
        finally:
            unlock_out_dirs()
        record_path = Path(cfg.out) / "record.json"
        record = read_record(record_path) if record_path.is_file() else None
    else:
        try:
            record = execute(cfg)
        except Stopped as stop:
            print(f"parallelnn: {stop}", file=sys.stderr, flush=True)
            return stop.exit_code
    if record is not None and not cfg.quiet:
        print(summary_line(record), flush=True)
    return 0


def summary_line(record: dict[str, Any]) -> str:
    parts = [f"{record['workload']} {record['strategy']} x{record['world_size']} on {record['device']}"]
    if record.get("test_accuracy") is not None:
        parts.append(f"test accuracy {record['test_accuracy']:.4f}")
    elif record.get("eval_loss") is not None:
        parts.append(f"eval loss {record['eval_loss']:.4f}")
    parts.append(f"train {record['train_seconds']:.2f}s")
    if record.get("tokens_per_second"):
        parts.append(f"{record['tokens_per_second']:,.0f} tokens/s")
    else:
        parts.append(f"{record['samples_per_second']:,.0f} samples/s")
    parts.append(f"MFU {record['mfu']:.2f}")
    if record.get("speedup") is not None:
        parts.append(f"speedup {record['speedup']:.2f} (efficiency {record['efficiency']:.2f})")
    return ", ".join(parts) + f" -> {record['out']}/record.json"
