"""``parallelnn info``: this machine as parallelnn sees it, and the peaks that MFU is measured against.

    parallelnn info            # CPU, memory, GPUs or MPS, torch build, measured peaks
    parallelnn info --json     # the same as one JSON object, for scripts
    parallelnn info --refresh  # measure the peaks again instead of reading the cache

The peaks are short probes (:mod:`parallelnn.measure`): matrix multiplies for FLOP/s (fp32; on a GPU
also TF32 and bf16) and a large copy for memory bandwidth, on CPU with every core, each the best of
several rounds. They are cached per machine in ``$PARALLELNN_CACHE/peak.json`` with the time they
were measured (``fp32_measured_at``); a record's ``peak_flops`` (the denominator of its ``mfu``) is
this fp32 probe times the devices the run used (``measure.check_peak`` probes again when a run beats it).
"""

from __future__ import annotations

import json
import os
import platform
from typing import Any

import torch


def add_parser(verbs) -> None:
    p = verbs.add_parser("info", help="this machine: CPU, memory, GPUs, torch build and measured peaks",
                         description="Show the hardware, the torch build and the measured peaks (cached per "
                                     "machine) that records' MFU is computed against.")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--refresh", action="store_true", help="measure the peaks again instead of using the cache")
    p.set_defaults(handler=cmd_info)


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where that file does not say."""
    cores, package = set(), None
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "physical id":
                    package = value.strip()
                elif key == "core id":
                    cores.add((package, value.strip()))
    except OSError:
        return None
    return len(cores) or None


def gather(refresh: bool = False) -> dict[str, Any]:
    """Everything ``info`` shows, as plain data (the --json output)."""
    import torch.distributed as dist

    from parallelnn import __version__, measure
    from parallelnn.launch import cores, mps_available
    from parallelnn.record import memory_bytes

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": props.name, "memory_bytes": props.total_memory,
                         "capability": f"{props.major}.{props.minor}",
                         "multiprocessors": props.multi_processor_count})
    dist_ok = dist.is_available()
    build = {
        "version": torch.__version__, "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
        "mps_available": mps_available(), "distributed": dist_ok,
        "gloo": bool(dist_ok and dist.is_gloo_available()), "nccl": bool(dist_ok and dist.is_nccl_available()),
        "default_threads": torch.get_num_threads(),
    }
    cpu = torch.device("cpu")
    peaks: dict[str, dict[str, Any]] = {
        "cpu": {"fp32_flops": measure.peak_flops(cpu, torch.float32, refresh=refresh),
                "fp32_measured_at": measure.peak_measured_at(cpu, torch.float32),
                "memory_bandwidth_bytes_per_second": measure.peak_bandwidth(cpu, refresh=refresh),
                "threads": os.cpu_count()},
    }
    if gpus:  # the first GPU stands for all: a job's peak is this times the GPUs it uses
        gpu = torch.device("cuda", 0)
        peaks["cuda"] = {"device": gpus[0]["name"],
                         "fp32_flops": measure.peak_flops(gpu, torch.float32, refresh=refresh),
                         "fp32_measured_at": measure.peak_measured_at(gpu, torch.float32),
                         "tf32_flops": measure.peak_tf32_flops(gpu, refresh=refresh),
                         "memory_bandwidth_bytes_per_second": measure.peak_bandwidth(gpu, refresh=refresh)}
        if torch.cuda.is_bf16_supported():
            peaks["cuda"]["bf16_flops"] = measure.peak_flops(gpu, torch.bfloat16, refresh=refresh)
    elif build["mps_available"]:
        mps = torch.device("mps")
        peaks["mps"] = {"fp32_flops": measure.peak_flops(mps, torch.float32, refresh=refresh),
                        "fp32_measured_at": measure.peak_measured_at(mps, torch.float32),
                        "memory_bandwidth_bytes_per_second": measure.peak_bandwidth(mps, refresh=refresh)}
    return {
        "host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
        "parallelnn": __version__,
        "cpu": {"model": measure.cpu_model(), "cores": os.cpu_count(), "physical_cores": physical_cores(),
                "available_cores": len(cores() or []) or None},
        "memory_bytes": memory_bytes(),
        "gpus": gpus, "mps": build["mps_available"], "torch": build, "peaks": peaks,
        "peak_cache": str(measure._cache_file()),
    }


def _bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP/s" if n >= 1e12 else f"{n / 1e9:.1f} GFLOP/s"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def text(info: dict[str, Any]) -> str:
    from parallelnn import measure

    cpu, t = info["cpu"], info["torch"]
    cores = f"{cpu['cores']} cores" + (f" ({cpu['physical_cores']} physical)" if cpu["physical_cores"]
                                       and cpu["physical_cores"] != cpu["cores"] else "")
    lines = [f"host      {info['host']} ({info['platform']})",
             f"CPU       {cpu['model']}, {cores}",
             f"memory    {_bytes(info['memory_bytes'])}"]
    if info["gpus"]:
        for g in info["gpus"]:
            lines.append(f"GPU {g['index']}     {g['name']}, {_bytes(g['memory_bytes'])}, compute capability "
                         f"{g['capability']}")
    else:
        lines.append("GPU       none" + (" (Apple MPS available)" if info["mps"] else ""))
    lines.append(f"torch     {t['version']}: CUDA build {t['cuda_build'] or 'none'}, CUDA {_yes(t['cuda_available'])}, "
                 f"MPS {_yes(t['mps_available'])}, gloo {_yes(t['gloo'])}, nccl {_yes(t['nccl'])}")
    for name, p in info["peaks"].items():
        where = f"{name} ({p['device']})" if "device" in p else name
        mm = ", ".join(f"{label} {_flops(p[key])}" for key, label in
                       (("fp32_flops", "fp32"), ("tf32_flops", "tf32"), ("bf16_flops", "bf16")) if key in p)
        lines.append(f"peak      {where}: matmul {mm}; memory bandwidth "
                     f"{p['memory_bandwidth_bytes_per_second'] / 1e9:.1f} GB/s"
                     + (f"; fp32 measured {p['fp32_measured_at']}" if p.get("fp32_measured_at") else ""))
    lines.append(f"          (best of {measure.PROBE_ROUNDS} probes spaced apart, cached in {info['peak_cache']}; "
                 "records' MFU uses the fp32 peak; --refresh to measure again)")
    return "\n".join(lines)


def cmd_info(ns) -> int:
    info = gather(refresh=ns.refresh)
    print(json.dumps(info, indent=2) if ns.json else text(info), flush=True)
    return 0
