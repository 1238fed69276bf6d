"""Hardware for predictions: a device's peak FLOP/s and memory, and the two links between devices.

A job's ranks sit on ``nodes`` machines of ``devices_per_node`` devices. Within a node they talk over
``intra`` (NVLink/NVSwitch, PCIe, shared memory); between nodes over ``inter`` (InfiniBand/Ethernet NICs).
Bandwidths are what NCCL achieves (bus bandwidth, per direction), not the links' nameplate, and both are
*per device*: ``inter.bandwidth`` is the node's NIC bandwidth divided by its devices, i.e. each device's
share when all devices of a node communicate across nodes at once, as data-parallel collectives do.

    parse_hardware("8xH100-nvlink")
    parse_hardware("gpus_per_node=8,nodes=2,bf16_tflops=989,fp32_tflops=67,memory_gb=80,intra_gbps=360,"
                   "inter_gbps=45,efficiency=0.55")

Units of custom figures: TFLOP/s (10^12), GB and GB/s (10^9 bytes), microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from parallelnn.errors import UserError

DTYPES = ("fp32", "tf32", "bf16", "fp16")
T, G, US = 1e12, 1e9, 1e-6


@dataclass(frozen=True)
class Link:
    """A link's achievable bandwidth (bytes/s per direction per device) and per-hop latency (s)."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Hardware:
    name: str
    device_type: str  # "cuda" | "cpu"
    #: Dense peak FLOP/s of one device, by compute dtype: "fp32", "tf32", "bf16", "fp16".
    peak_flops: dict[str, float]
    #: Memory per device a training job can use.
    memory_bytes: int
    devices_per_node: int
    #: Between devices of one node (NVLink / PCIe / shared memory).
    intra: Link
    #: Between nodes, per device's share of the node's NICs.
    inter: Link
    #: Fraction of peak the counted FLOPs run at. With ``memory_bandwidth`` set: the GEMM efficiency (matrix
    #: multiplies and fused attention, the only FLOPs counted); without: a whole-step rate, which then also covers
    #: the memory-bound rest (this machine's calibration measures it so, with 1.0 and a measured peak).
    matmul_efficiency: float
    max_devices: int
    #: Where each figure comes from, and what is assumed.
    notes: str = ""
    #: NICs per node: a lone cross-node flow (a pipeline boundary) gets one NIC, not the node's all.
    nics_per_node: int = 1
    #: Share of the compute a collective started during backward (DDP buckets, FSDP prefetch) can hide
    #: behind: 1 on GPUs (NCCL runs on its own streams); on CPUs gloo's threads take the cores that compute.
    comm_overlap: float = 1.0
    #: Within a node, a link fitted per collective kind ("all_reduce", "all_gather", "reduce_scatter",
    #: "send_recv") where they differ (measured on this machine: gloo's kinds are not equally fast); else intra.
    kind_links: dict[str, Link] | None = None
    #: Seconds of an optimizer step (and the gradient norm) per parameter a rank updates, when measured (this
    #: machine); 0 on presets, where the update is a few percent of a step (memory-bound, not modelled).
    optimizer_seconds_per_parameter: float = 0.0
    #: Device memory (HBM) bandwidth, bytes/s, nameplate: the memory-bound work besides the counted FLOPs
    #: (normalisations, activations, softmax of the loss, residual adds, casts) moves ``nonmatmul_bytes`` at this
    #: rate (``costs.compute_seconds``). None: not modelled apart (``matmul_efficiency`` covers it).
    memory_bandwidth: float | None = None
    #: A pipeline candidate's stages, in order, as timed here: seconds of one microbatch's forward + backward
    #: each. The bubble reads the ranks' shares of the work from them (a memory-bound stage takes longer than
    #: its FLOPs say); None: from the FLOPs.
    stage_seconds: list[float] | None = None

    def link(self, kind: str) -> Link:
        """The within-node link of a collective ``kind``."""
        return (self.kind_links or {}).get(kind, self.intra)

    @property
    def nodes(self) -> int:
        return max(1, self.max_devices // self.devices_per_node)

    def peak(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise UserError(f"no peak FLOP/s for dtype '{dtype}' on {self.name}: it has {', '.join(self.peak_flops)}")
        return self.peak_flops[dtype]

    def lone_inter_bandwidth(self) -> float:
        """Bandwidth of one cross-node flow that has its NIC to itself: the node's NIC bandwidth / NICs."""
        return self.inter.bandwidth * self.devices_per_node / max(1, self.nics_per_node)

    def nodes_for(self, devices: int) -> int:
        """Nodes a job of ``devices`` occupies (filling nodes first)."""
        return max(1, math.ceil(devices / self.devices_per_node))


def _h100(nodes: int, inter: Link, name: str, inter_note: str, nics: int = 1) -> Hardware:
    return Hardware(
        name=name, device_type="cuda",
        peak_flops={"fp32": 66.9 * T, "tf32": 494.7 * T, "bf16": 989.4 * T, "fp16": 989.4 * T},
        memory_bytes=int(80 * G), devices_per_node=8,
        intra=Link(370 * G, 2 * US), inter=inter, matmul_efficiency=0.70, max_devices=8 * nodes,
        memory_bandwidth=3.35 * T,
        notes=("H100 SXM5: dense peaks from NVIDIA's H100 datasheet (989 TFLOP/s bf16/fp16 without sparsity, "
               "495 tf32, 67 fp32); 80 GB HBM3 taken as 80e9 bytes usable (nvidia-smi shows 81,559 MiB; the "
               "rest is CUDA context and allocator slack). NVLink 4 via NVSwitch: 450 GB/s per direction "
               "nameplate; 370 GB/s effective after NCCL's protocol overhead (NCCL maintainer, "
               "NVIDIA/nccl-tests#212), used for ring collectives; NVLink SHARP all-reduce can reach ~480 GB/s "
               "bus bandwidth, not assumed. 2 us per ring hop. HBM3 3.35 TB/s (datasheet) for the memory-bound "
               "non-matmul work. matmul_efficiency 0.70: the sustained rate of large bf16 GEMMs in training, 60-75% of "
               "peak (the best shape found by search reaches 80%, 794.5 of 989 TFLOP/s: stas00/ml-engineering, "
               "compute/accelerator/README.md, MAMF table; a ceiling, not what training's shapes hold). "
               + inter_note), nics_per_node=nics)


def _presets() -> dict[str, Hardware]:
    none = "One node: no inter-node link (inter = intra)."
    h100_1 = _h100(1, Link(370 * G, 2 * US), "8xH100-nvlink", none)
    h100_2 = _h100(2, Link(45 * G, 5 * US), "2x8xH100-ib",
                   "InfiniBand: 8 x 400 Gb/s NDR NICs per node (one per GPU, rail-optimised) = 50 GB/s per GPU "
                   "nameplate, 45 GB/s assumed achievable; 5 us per hop.", nics=8)
    a100 = Hardware(
        name="8xA100-pcie", device_type="cuda",
        peak_flops={"fp32": 19.5 * T, "tf32": 156 * T, "bf16": 312 * T, "fp16": 312 * T},
        memory_bytes=int(80 * G), devices_per_node=8,
        intra=Link(12 * G, 5 * US), inter=Link(12 * G, 5 * US), matmul_efficiency=0.70, max_devices=8,
        memory_bandwidth=1.935 * T,
        notes=("A100 80GB PCIe: dense peaks from NVIDIA's A100 datasheet (312 TFLOP/s bf16/fp16, 156 tf32, 19.5 "
               "fp32); 80e9 bytes usable. No NVLink: GPUs talk over PCIe 4.0 x16 (32 GB/s per direction "
               "nameplate) through PCIe switches and across two CPU sockets; 12 GB/s assumed for NCCL bus "
               "bandwidth: on PCIe systems the CPUs' root complexes and memory bound it (NVIDIA/nccl#1639), and "
               "8-GPU PCIe servers report 10-25 GB/s depending on switches and sockets. 5 us per hop. "
               "HBM2e 1,935 GB/s (A100 80GB PCIe datasheet) for the memory-bound non-matmul work. "
               "matmul_efficiency 0.70: sustained large-GEMM rate, as for the H100 (the searched best, 252.9 of "
               "312 TFLOP/s = 0.81, is a ceiling: stas00/ml-engineering MAMF table). "
               "One node: no inter-node link (inter = intra)."))
    v100 = Hardware(
        name="4x8xV100-ib1", device_type="cuda",
        # No bf16 or tf32 tensor cores on Volta: those dtypes run at (at best) fp32 rates.
        peak_flops={"fp32": 15.7 * T, "tf32": 15.7 * T, "bf16": 15.7 * T, "fp16": 125 * T},
        memory_bytes=int(32 * G), devices_per_node=8,
        intra=Link(130 * G, 3 * US), inter=Link(1.5 * G, 5 * US), matmul_efficiency=0.5, max_devices=32,
        notes=("V100-SXM2 32GB (DGX-1V-like): NVIDIA V100 datasheet, 125 TFLOP/s fp16 tensor cores, 15.7 fp32; "
               "no bf16/tf32 tensor cores, so bf16 and tf32 are taken at the fp32 rate (use fp16). NVLink 2 "
               "hybrid cube-mesh: 6 links x 25 GB/s = 150 GB/s per direction nameplate, 130 GB/s assumed "
               "NCCL bus bandwidth, 3 us per hop. Inter-node: ONE 100 Gb/s EDR InfiniBand NIC per node = "
               "12.5 GB/s nameplate, 12 GB/s achievable, shared by 8 GPUs = 1.5 GB/s per GPU; 5 us per hop. "
               "matmul_efficiency 0.5, a whole-step rate: no measured GEMM rate of a V100 is cited here, so the "
               "memory-bound non-matmul work is not modelled apart (memory_bandwidth unset; HBM2 is 900 GB/s)."))
    return {h.name: h for h in (h100_1, h100_2, a100, v100)}


PRESETS: dict[str, Hardware] = _presets()

# Custom figures: key -> (meaning, scale to SI units).
CUSTOM_KEYS = {
    "gpus_per_node": ("devices per node", 1), "nodes": ("nodes", 1),
    "fp32_tflops": ("fp32 peak, TFLOP/s", T), "tf32_tflops": ("tf32 peak, TFLOP/s", T),
    "bf16_tflops": ("bf16 peak, TFLOP/s", T), "fp16_tflops": ("fp16 peak, TFLOP/s", T),
    "memory_gb": ("memory per device, GB", G),
    "intra_gbps": ("bandwidth within a node, GB/s per device", G), "intra_latency_us": ("intra hop latency, us", US),
    "inter_gbps": ("bandwidth between nodes, GB/s per device", G), "inter_latency_us": ("inter hop latency, us", US),
    "efficiency": ("fraction of peak reached by matmuls", 1),
    "memory_gbps": ("device memory (HBM) bandwidth, GB/s", G),
    "nics_per_node": ("NICs per node (default: one per device)", 1),
}
REQUIRED = ("gpus_per_node", "memory_gb", "intra_gbps")
DEFAULT_LATENCY_US = {"intra_latency_us": 5.0, "inter_latency_us": 10.0}
DEFAULT_EFFICIENCY = 0.5
#: With ``memory_gbps`` the efficiency is a sustained GEMM rate, 0.7 (large GEMMs hold 60-75% of peak; the best
#: shape found by search, 80-87%, is a ceiling: stas00/ml-engineering MAMF table); without, a whole-step rate (0.5).
DEFAULT_GEMM_EFFICIENCY = 0.7


def _custom_figures(text: str) -> dict[str, float]:
    figures: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = (s.strip() for s in item.partition("="))
        if not sep:
            raise UserError(f"hardware figure '{item}' is not key=value (e.g. memory_gb=80)")
        if key not in CUSTOM_KEYS:
            raise UserError(f"unknown hardware figure '{key}': use {', '.join(CUSTOM_KEYS)}")
        if key in figures:
            raise UserError(f"hardware figure '{key}' is given twice")
        try:
            number = float(value)
        except ValueError:
            raise UserError(f"hardware figure {key}='{value}' is not a number") from None
        if not math.isfinite(number) or number <= 0:
            raise UserError(f"hardware figure {key}={value} must be a positive number")
        if key in ("gpus_per_node", "nodes", "nics_per_node") and number != int(number):
            raise UserError(f"hardware figure {key}={value} must be a whole number")
        figures[key] = number
    return figures


def _custom(text: str) -> Hardware:
    f = _custom_figures(text)
    nodes = int(f.get("nodes", 1))
    missing = [k for k in REQUIRED if k not in f]
    if nodes > 1 and "inter_gbps" not in f:
        missing.append("inter_gbps")
    if not any(k in f for k in ("fp32_tflops", "tf32_tflops", "bf16_tflops", "fp16_tflops")):
        missing.append("bf16_tflops or fp32_tflops")
    if missing:
        raise UserError(f"custom hardware '{text}' lacks {', '.join(missing)}")
    default_efficiency = DEFAULT_GEMM_EFFICIENCY if "memory_gbps" in f else DEFAULT_EFFICIENCY
    if f.get("efficiency", default_efficiency) > 1:
        raise UserError(f"hardware figure efficiency={f['efficiency']:g} must be a fraction of peak, at most 1")
    fp32 = f.get("fp32_tflops", f.get("tf32_tflops", f.get("bf16_tflops", f.get("fp16_tflops"))))
    bf16 = f.get("bf16_tflops", f.get("fp16_tflops", fp32))
    peaks = {"fp32": fp32 * T, "tf32": f.get("tf32_tflops", fp32) * T, "bf16": bf16 * T,
             "fp16": f.get("fp16_tflops", bf16) * T}
    lat = {k: f.get(k, v) / 1e6 for k, v in DEFAULT_LATENCY_US.items()}
    intra = Link(f["intra_gbps"] * G, lat["intra_latency_us"])
    inter = Link(f["inter_gbps"] * G, lat["inter_latency_us"]) if "inter_gbps" in f else intra
    defaulted = [k for k in ("efficiency", *DEFAULT_LATENCY_US) if k not in f]
    per_node = int(f["gpus_per_node"])
    return Hardware(
        name=f"custom {nodes}x{per_node}" if nodes > 1 else f"custom {per_node}x", device_type="cuda",
        peak_flops=peaks, memory_bytes=int(f["memory_gb"] * G), devices_per_node=per_node, intra=intra,
        inter=inter, matmul_efficiency=f.get("efficiency", default_efficiency), max_devices=nodes * per_node,
        memory_bandwidth=f["memory_gbps"] * G if "memory_gbps" in f else None,
        notes=f"custom figures: {text.strip()}" + (
            f"; defaults for {', '.join(defaulted)} (efficiency {default_efficiency}, intra hop "
            f"{DEFAULT_LATENCY_US['intra_latency_us']:g} us, inter hop {DEFAULT_LATENCY_US['inter_latency_us']:g} us); "
            "dtypes not given take the nearest given peak" if defaulted else "; dtypes not given take the nearest given peak"),
        nics_per_node=int(f.get("nics_per_node", per_node)))


def parse_hardware(text: str) -> Hardware:
    """A preset's name (see :data:`PRESETS`), or custom figures ``key=value,...`` (see :data:`CUSTOM_KEYS`)."""
    text = (text or "").strip()
    if text in PRESETS:
        return PRESETS[text]
    if "=" not in text:
        raise UserError(f"unknown hardware '{text}': choose a preset ({', '.join(PRESETS)}) or give figures "
                        "key=value,... (gpus_per_node, nodes, bf16_tflops, fp32_tflops, memory_gb, intra_gbps, "
                        "inter_gbps, efficiency, ...)")
    return _custom(text)
