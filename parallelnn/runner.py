"""One run, as each rank executes it, in four stages: set up -> train -> save weights -> record.

* :func:`set_up`: the rank's context, the workload (with its defaults and ``--limit``), the strategy
  and its layout, the engine and loaders, the FLOP count and the device peak;
* :func:`train`: the recorder, progress, checkpointer and watchdog around ``Trainer.fit`` (resuming
  first when asked);
* :func:`save_weights`: the full weights, gathered from every rank, written by rank 0; then the
  workload's evaluations of the saved model (gpt2's pass@k);
* :func:`build_record`: ``record.json``, assembled from the typed pieces of the stages before.

Nothing here depends on which workload or strategy was chosen. Spawning and joining ranks is below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from parallelnn import baseline, launch, measure, parallel, workloads
from parallelnn.checkpoint import Checkpointer, resume_hint
from parallelnn.config import RunConfig, config_to_argv, validate
from parallelnn.data.loaders import DataLoaderLoader, MemoryLoader, make_loader, steps_per_epoch
from parallelnn.errors import UserError, warn
from parallelnn.parallel.engine import Engine, checkpoint_blocks
from parallelnn.parallel.engine import blocks_of as engine_blocks
from parallelnn.progress import Progress
from parallelnn.record import (Recorder, hardware, lock_out_dir, prepare_out_dir, read_record, unlock_out_dirs,
                               versions, write_or_explain)
from parallelnn.trainer import PROGRESS_FILE, Hooks, LoopState, Trainer, final_eval
from parallelnn.watchdog import Watchdog
from parallelnn.workload import GENERAL_DEFAULTS, Workload

EVAL_TIMING = ("runtime", "samples_per_second", "steps_per_second")
TIMING_NOTE = ("train_seconds: the training loops only (slowest rank), after a device sync; excludes data "
               "download and preparation, model building, evaluation, checkpoint saving and process start-up")


def check(cfg: RunConfig, launching: bool = True, skip_workload: bool = False) -> RunConfig:
    """Every check of ``cfg`` that needs no model or data: the fields, the workload's name (or file), then the
    strategy and its layout."""
    if not skip_workload:  # the Python API's workload objects have no name to check
        workloads.check_name(cfg.workload)
        workloads.check_options(cfg)
    validate(cfg, launching)
    parallel.resolve(cfg)
    if launching:
        refuse_finished_run(cfg)
    return cfg


def refuse_finished_run(cfg: RunConfig) -> None:
    """``--resume auto`` on a finished run with no checkpoint would train it again from the start and
    rewrite its record: refused, unless ``--overwrite`` says so."""
    if cfg.resume != "auto" or cfg.overwrite or not cfg.out or not (Path(cfg.out) / "record.json").is_file():
        return
    checkpoints = Path(cfg.checkpoint_dir or Path(cfg.out) / "checkpoints")
    if not any(checkpoints.glob("step-*")):
        raise UserError(f"--resume auto: {cfg.out} holds a finished run and no checkpoint to resume from; nothing "
                        "was changed (add --overwrite to train it again from the start)")


def with_defaults(cfg: RunConfig, workload: Workload) -> RunConfig:
    """A copy of ``cfg`` with the workload's defaults filled into the fields left None."""
    defaults = {**GENERAL_DEFAULTS, **workload.defaults()}
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def build_workload(cfg: RunConfig, device: torch.device, log: Callable[[str], None], announce: bool = True,
                   build: Callable[[RunConfig], Workload] | None = None) -> tuple[RunConfig, Workload]:
    """The workload ``cfg`` names, and ``cfg`` completed with its defaults; ``--limit`` applied (``announce``:
    this process warns when it exceeds the data)."""
    workload = workloads.build(cfg.workload, cfg, device, log, fn=build)
    cfg = with_defaults(cfg, workload)
    if cfg.grad_accum > cfg.batch_size:  # the workload's default batch meets the user's --grad-accum
        raise UserError(f"--grad-accum {cfg.grad_accum} is larger than --batch-size {cfg.batch_size}")
    if cfg.limit:
        if cfg.limit > len(workload.train):
            if announce:
                    warn(f"--limit {cfg.limit} is more than the {len(workload.train)} training samples; using all of "
                     "them")
        else:
            workload.train = workload.train.head(cfg.limit)
    return cfg, workload


def default_out(cfg: RunConfig) -> str:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{stamp}-{cfg.workload}-{cfg.strategy}")


def _devices(ctx: launch.Context) -> int:
    """The devices whose peak the run can use: every GPU, or every machine's CPU."""
    return ctx.world_size if ctx.device.type != "cpu" else ctx.nnodes


def _peak(ctx: launch.Context, dtype: str = "fp32") -> float:
    """The device peak of ``dtype`` (see ``measure.compute_dtype``) from the per-machine cache; with several local
    ranks only one of them probes."""
    if ctx.multi_rank:
        if ctx.local_rank == 0:
            measure.peak_flops_of(ctx.device, dtype)
        dist.barrier()
    return measure.peak_flops_of(ctx.device, dtype) * _devices(ctx)


def set_matmul_precision(cfg: RunConfig, device: torch.device) -> None:
    """``--tf32``: CUDA matrix multiplies and cuDNN convolutions may use TF32; without it both stay true fp32
    (cuDNN's own default allows TF32 convolutions: here fp32 means fp32, and MFU's denominator says which)."""
    if cfg.tf32 and device.type != "cuda":
        raise UserError(f"--tf32 is a CUDA matrix-multiply mode; this run is on {device.type}")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32


def prepare_model(cfg: RunConfig, workload: Workload) -> int:
    """What the model needs before a strategy wraps it: ``--activation-checkpointing`` per block (after the
    FLOPs were counted, so that MFU counts the model's work, not the recomputation); returns the blocks."""
    if not cfg.activation_checkpointing:
        return 0
    blocks = engine_blocks(workload.model, workload)
    if not blocks:
        raise UserError("--activation-checkpointing needs a model with blocks: give the Workload blocks=..., layers=..."
                        " or an nn.ModuleList of layers")
    return checkpoint_blocks(blocks)


def _baseline(cfg: RunConfig, workload: Workload, device: torch.device) -> dict[str, Any] | None:
    """The ``--baseline`` record, refused now (not after training) when it cannot be this run's."""
    if not cfg.baseline:
        return None
    base = read_record(cfg.baseline)
    known = {"workload": cfg.workload, "dataset": workload.dataset, "device": device.type,
             "batch_size": cfg.batch_size, "epochs": cfg.epochs}
    problem = baseline.mismatch(base, known)
    if problem:
        raise UserError(f"--baseline {cfg.baseline} cannot be this run's baseline: {problem}")
    return base


@dataclass
class Setup:
    """Everything a rank has before its first step."""

    cfg: RunConfig  # with the workload's defaults
    ctx: launch.Context
    out: Path
    workload: Workload
    strategy: parallel.Strategy
    layout: parallel.Layout
    engine: Engine
    train_loader: MemoryLoader | DataLoaderLoader
    test_loader: MemoryLoader | DataLoaderLoader
    threads: int
    flops_per_sample: float
    peak_flops: float
    baseline: dict[str, Any] | None
    log: Callable[[str], None]
    peak_dtype: str = "fp32"  # the dtype whose measured peak MFU divides by


def set_up(cfg: RunConfig, ctx: launch.Context, build: Callable[[RunConfig], Workload] | None = None) -> Setup:
    """Stage 1: the workload, the strategy applied to its model, the loaders and what MFU needs."""
    if cfg.tensorboard:  # before any data or model work: a missing package is a one-line error
        from parallelnn import tboard

        tboard.require()
    threads = launch.set_threads(cfg.threads, ctx.local_world_size)
    if cfg.bind_cores and ctx.device.type == "cpu":
        launch.bind_cores(ctx.local_rank, ctx.local_world_size)
    set_matmul_precision(cfg, ctx.device)
    out = Path(launch.agree(cfg.out or default_out(cfg), ctx))
    if ctx.is_main and ctx.restart_count == 0 and not cfg.resume:
        prepare_out_dir(out, cfg.overwrite)
    log = (lambda msg: print(msg, flush=True)) if ctx.is_main and not cfg.quiet else (lambda msg: None)
    cfg, workload = build_workload(cfg, ctx.device, log, announce=ctx.is_main, build=build)
    strategy, layout = parallel.resolve(cfg, ctx.world_size)
    strategy.check(cfg, workload, layout)
    base = _baseline(cfg, workload, ctx.device)
    sample = workload.train.head(min(8, len(workload.train)))
    flops = measure.flops_per_sample(workload.model, workload.loss, sample.prepare(sample.inputs), sample.targets)
    total_steps = steps_per_epoch(len(workload.train), cfg.batch_size, layout.dp) * cfg.epochs
    checkpointed = prepare_model(cfg, workload)
    engine = strategy.apply(workload.model, workload, cfg, ctx, layout, total_steps)
    if checkpointed:
        engine.describe["checkpointed_blocks"] = checkpointed
    train_loader, test_loader = (
        make_loader(cfg.loader, split, cfg.batch_size, ctx.device, shuffle=shuffle, seed=cfg.seed,
                    dp_rank=engine.dp_rank, dp_size=layout.dp, workers=cfg.workers)
        for split, shuffle in ((workload.train, True), (workload.test, False)))
    if len(train_loader) == 0:
        raise UserError(f"no training batch: {len(workload.train)} samples cannot be split over "
                        f"{layout.dp} data-parallel ranks")
    if ctx.is_main:
        log(f"{cfg.workload} on {workload.dataset}: {cfg.strategy} x{ctx.world_size} on {ctx.device.type}, "
            f"loader {cfg.loader}, {cfg.epochs} epochs, batch {cfg.batch_size}")
    dtype = measure.compute_dtype(cfg.precision, cfg.tf32, ctx.device)
    peak = _peak(ctx, dtype)
    measure.reset_peak_memory(ctx.device)  # the probe's matrices (when this machine's peak was not yet cached)
    return Setup(cfg, ctx, out, workload, strategy, layout, engine, train_loader, test_loader, threads, flops,
                 peak, base, log, dtype)


@dataclass
class Trained:
    """What training left: the loop's final state, the trainer's own measurements, the recorder."""

    state: LoopState
    trainer: Trainer
    recorder: Recorder
    checkpointer: Checkpointer
    resumed_from: Path | None
    started_at: float


def train(setup: Setup, hooks: Hooks | None) -> Trained:
    """Stage 2: resume when asked, then the training loop, under signal handling and hang detection."""
    cfg, ctx, out = setup.cfg, setup.ctx, setup.out
    if ctx.is_main and (not os.environ.get(launch.SPAWNED_ENV) or ctx.nnodes > 1):  # before writing; a job this
        lock_out_dir(out, announce_takeover=ctx.restart_count == 0)  # command spawned: its parent holds the lock
    recorder = Recorder(out, enabled=ctx.is_main, append=bool(cfg.resume) or ctx.restart_count > 0)
    if cfg.tensorboard and ctx.is_main:
        from parallelnn import tboard

        recorder.sinks.append(tboard.TensorBoardSink(out))
    unit = "tokens" if setup.workload.tokens_per_sample else "samples"
    progress = Progress(ctx.is_main and not cfg.quiet, len(setup.train_loader) * cfg.epochs, cfg.epochs, unit=unit)
    checkpointer = Checkpointer(cfg, ctx, setup.engine, setup.workload, Path(cfg.checkpoint_dir or out / "checkpoints"),
                                out, recorder)
    if cfg.checkpoint_every:
        checkpointer.check_writable()
    watchdog = (Watchdog(ctx.rank, ctx.world_size, cfg.timeout, ctx.restart_count)
                if ctx.multi_rank and "MASTER_ADDR" in os.environ else None)
    trainer = Trainer(setup.engine, setup.workload, cfg, ctx, setup.train_loader, setup.test_loader, recorder,
                      progress, hooks=hooks, checkpointer=checkpointer, flops_per_sample=setup.flops_per_sample,
                      peak_flops=setup.peak_flops, watchdog=watchdog)
    started = time.time()
    try:
        resumed_from = resume(cfg, ctx, checkpointer, trainer, recorder, setup.log)
        progress.done = trainer.state.global_step  # a resumed run's bar starts where it stands
        with stop_on_signals(trainer):
            state = trainer.fit()
    finally:
        if watchdog is not None:
            watchdog.close()
        progress.close()
        setup.train_loader.close()
        setup.test_loader.close()
    if state.stop_requested:
        raise Stopped(state.stop_signal, state.global_step, trainer.last_checkpoint)
    return Trained(state, trainer, recorder, checkpointer, resumed_from, started)


def save_weights(setup: Setup, trained: Trained) -> dict[str, Any]:
    """Stage 3: the full weights gathered from every rank (a collective) and written by rank 0, then the
    workload's evaluations of the saved model; returns what those add to the record. Weights that cannot
    be written end the run with one line naming the last good checkpoint."""
    state_dict = setup.engine.full_state_dict()  # collective: every rank takes part
    if not setup.ctx.is_main:
        return {}
    workload, last_good = setup.workload, trained.checkpointer.last_good()
    if workload.save is not None:
        saved = setup.out / "model"
        write_or_explain(saved, lambda: workload.save(state_dict, setup.out), last_good)
    else:
        saved = setup.out / "model.safetensors"
        write_or_explain(saved, lambda: write_safetensors(state_dict, saved), last_good)
    return workload.evaluate_saved(saved) if workload.evaluate_saved is not None else {}


def per_rank_figures(setup: Setup, trained: Trained) -> list[dict[str, Any]]:
    """Every rank's own measurements (a collective), in rank order."""
    ctx, trainer = setup.ctx, trained.trainer
    return launch.gather({"rank": ctx.rank, "host": os.uname().nodename, "step_seconds": trainer.step_seconds,
                          "first_step_seconds": trainer.first_step_seconds,
                          "peak_memory_bytes": measure.peak_memory_bytes(ctx.device),
                          "cores": launch.cores(),
                          "tensor_bytes": trainer.tensor_bytes.result or None,
                          **(trainer.comm_probe.result if trainer.comm_probe else {}),
                          **setup.engine.describe.get("per_rank", {})}, ctx)


def execute(cfg: RunConfig, hooks: Hooks | None = None,
            build: Callable[[RunConfig], Workload] | None = None) -> dict[str, Any] | None:
    """Run ``cfg`` in this process (one rank of the job); return the record on rank 0. ``build``: the
    workload's build function itself (the Python API), instead of the one ``cfg.workload`` names."""
    ctx = launch.init(cfg, cfg.device, needs_group=parallel.get(cfg.strategy).needs_process_group)
    try:
        setup = set_up(cfg, ctx, build)
        trained = train(setup, hooks)
        per_rank = per_rank_figures(setup, trained)
        evaluated = save_weights(setup, trained)
        record = build_record(setup, trained, per_rank, evaluated) if ctx.is_main else None
        if record is not None:
            trained.recorder.finish(record, trained.checkpointer.last_good())
        trained.recorder.close()
    except BaseException:
        unlock_out_dirs()
        if not ctx.multi_rank:
            launch.teardown()
        # A failing rank leaves its peers mid-collective: tearing the group down now can crash or
        # hang, which would hide this rank's own error. The process is about to end anyway.
        raise
    unlock_out_dirs()
    launch.finish(setup, trained)
    return record


# -- stage 4: the record ---------------------------------------------------------------------------------

def _what_ran(setup: Setup) -> dict[str, Any]:
    cfg, ctx, workload = setup.cfg, setup.ctx, setup.workload
    return {"workload": cfg.workload, "dataset": workload.dataset, "strategy": cfg.strategy,
            "device": ctx.device.type, "device_name": measure.device_label(ctx.device),
            "world_size": ctx.world_size, "nnodes": ctx.nnodes, "nproc": ctx.local_world_size,
            "mesh": setup.engine.describe.get("mesh"), "loader": cfg.loader, "workers": cfg.workers,
            "threads": setup.threads, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "seed": cfg.seed, "precision": cfg.precision, "train_samples": len(workload.train),
            "test_samples": len(workload.test)}


def _results(state: LoopState) -> dict[str, Any]:
    evaluation = final_eval(state)
    results = {"steps": state.global_step, "samples": state.samples, "train_seconds": state.train_seconds,
               "samples_per_second": state.samples / state.train_seconds if state.train_seconds else 0.0,
               "test_accuracy": evaluation.get("test_accuracy"), "test_loss": evaluation.get("test_loss"),
               "final_train_loss": state.loss_curve[-1] if state.loss_curve else None,
               "loss_curve": state.loss_curve, "eval_curve": state.eval_curve}
    # Whatever else the workload's summary measured (e.g. perplexity) goes in too.
    results.update({k: v for k, v in evaluation.items()
                    if k not in results and k not in EVAL_TIMING and k not in ("epoch", "global_step")})
    if results["test_loss"] is not None:
        results["eval_loss"] = results["test_loss"]
    return results


def _measurements(setup: Setup, trained: Trained, per_rank: list[dict[str, Any]], rate: float) -> dict[str, Any]:
    trainer, engine, state = trained.trainer, setup.engine, trained.state
    devices = _devices(setup.ctx)  # a run faster than the cached peak has it probed again (it was busy then)
    peak, dtype, measured_at = setup.peak_flops, measure.COMPUTE_DTYPES.get(setup.peak_dtype), None
    if isinstance(dtype, torch.dtype):  # (the TF32 probe is a mode of fp32, not a dtype of its own)
        peak = measure.check_peak(setup.ctx.device, setup.flops_per_sample * rate / devices, dtype) * devices
        measured_at = measure.peak_measured_at(setup.ctx.device, dtype)
    return {"flops_per_sample": setup.flops_per_sample, "peak_flops": peak, "peak_dtype": setup.peak_dtype,
            "peak_measured_at": measured_at,
            "mfu": measure.mfu(setup.flops_per_sample, rate, peak),
            "peak_memory_bytes": max(r["peak_memory_bytes"] for r in per_rank),
            "tensor_bytes": max((r["tensor_bytes"]["total"] for r in per_rank if r["tensor_bytes"]), default=None),
            "first_step_seconds": trainer.first_step_seconds, "startup_seconds": trainer.startup_seconds,
            "timing": TIMING_NOTE, "strategy_detail": {k: v for k, v in engine.describe.items() if k != "per_rank"},
            "per_rank": per_rank, "restarts": setup.ctx.restart_count, "resumes": state.resumes,
            "lost_steps": state.lost_steps,
            "resumed_from": str(trained.resumed_from) if trained.resumed_from else None,
            "last_checkpoint": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
            "run_id": trained.checkpointer.run_id, "resume_changes": trained.checkpointer.changes or None}


def _provenance(setup: Setup, started: float) -> dict[str, Any]:
    cfg = setup.cfg
    return {"hardware": hardware(setup.ctx.device), "versions": versions(),
            "command": cfg.command or "parallelnn run " + " ".join(config_to_argv(cfg)),
            "config": used_config(cfg, setup.strategy), "started_at": started, "finished_at": time.time(), "out": str(setup.out)}


def used_config(cfg: RunConfig, strategy: parallel.Strategy) -> dict[str, Any]:
    """The config as trained: options of other strategies and other workloads, which nothing read, left out."""
    unused = (parallel.strategy_options() - set(strategy.options)) | workloads.foreign_options(cfg.workload)
    return {k: v for k, v in cfg.to_dict().items() if k not in unused}


def build_record(setup: Setup, trained: Trained, per_rank: list[dict[str, Any]],
                 evaluated: dict[str, Any]) -> dict[str, Any]:
    """Stage 4 (rank 0): record.json from what ran, its results, its measurements and its provenance."""
    results = _results(trained.state)
    rate = results["samples_per_second"]
    record = {**_what_ran(setup), **results, **_measurements(setup, trained, per_rank, rate),
              **_provenance(setup, trained.started_at), **setup.workload.facts, **evaluated}
    tokens = setup.workload.tokens_per_sample
    if tokens:
        record.update(tokens_per_sample=tokens, tokens_seen=trained.state.samples * tokens,
                      tokens_per_second=rate * tokens)
    if setup.baseline is not None:
        base = setup.baseline
        record["baseline"] = {"out": base.get("out"), "strategy": base.get("strategy"),
                              "world_size": base.get("world_size"), "samples_per_second": base["samples_per_second"]}
        record.update(baseline.speedup(record, base))
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


def write_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Final weights as safetensors (cloned: tied weights must not share storage), atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.contiguous().clone() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


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
    launch.end_process(code)


def preflight(cfg: RunConfig) -> RunConfig:
    """Before any process is spawned: every check that needs the data and model but no process group."""
    if cfg.tensorboard:
        from parallelnn import tboard

        tboard.require()
    device = launch.resolve_device(cfg.device)
    set_matmul_precision(cfg, device)
    strategy, layout = parallel.resolve(cfg)
    if strategy.needs_process_group:
        launch.check_backend(cfg.backend, device)
    cfg = dataclasses.replace(cfg, out=cfg.out or default_out(cfg))
    if not cfg.resume:
        prepare_out_dir(cfg.out, cfg.overwrite)
    quiet = lambda msg: None  # noqa: E731 - the ranks will say it all again
    cfg, workload = build_workload(cfg, torch.device("cpu"), quiet, announce=False)
    strategy.check(cfg, workload, layout)
    _baseline(cfg, workload, device)
    # Probe now, once, rather than in competing ranks.
    measure.peak_flops_of(device, measure.compute_dtype(cfg.precision, cfg.tf32, device))
    return cfg


def run_job(cfg: RunConfig) -> dict[str, Any] | None:
    """Join a running job, spawn one, or run here; the record (None on ranks other than 0). Raises
    ``launch.LaunchFailed`` or ``Stopped`` when the job did not finish."""
    job = launch.job_env()
    if job is not None:  # one rank of a job torchrun or srun started
        cfg = dataclasses.replace(cfg, nproc=job["local_world_size"],
                                  nnodes=max(1, job["world_size"] // job["local_world_size"]))
        check(cfg, launching=False)
        return execute_rank(cfg)
    if cfg.world_size > 1 or cfg.max_restarts > 0:  # torchrun's agent also restarts a lone process
        cfg = preflight(cfg)
        if cfg.nnodes == 1:  # with several machines, only the one running global rank 0 writes --out
            lock_out_dir(cfg.out)
        try:
            launch.spawn(cfg, ["run", *config_to_argv(cfg)])
        except launch.LaunchFailed as err:
            if err.stopped:
                err.args = (f"{err}{resume_hint(cfg)}",)
            raise
        finally:
            unlock_out_dirs()
        record_path = Path(cfg.out) / "record.json"
        return read_record(record_path) if record_path.is_file() else None
    return execute(cfg)


def run_command(cfg: RunConfig) -> int:
    """``parallelnn run``: the job, then the summary line (or the one line saying why it stopped)."""
    try:
        record = run_job(cfg)
    except launch.LaunchFailed as err:
        print(f"parallelnn: {'' if err.stopped else 'error: '}{err}", flush=True, file=sys.stderr)
        return err.exit_code
    except Stopped as stop:
        print(f"parallelnn: {stop}", file=sys.stderr, flush=True)
        return stop.exit_code
    if launch.job_env() is not None and os.environ.get(launch.SPAWNED_ENV):
        return 0  # a spawned rank: the parent that spawned it prints the summary
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
