"""Predictions over layouts and device counts, a figure of them, and model statistics from the meta device.

    stats = stats_from_meta(lambda: GPT2LMHeadModel(GPT2Config(n_layer=48, n_embd=1600, n_head=25)), (1, 1024))
    table = predict_curves(stats, parse_hardware("4x8xV100-ib1"), global_batch=64, dtype="fp16")
    plot_curves(table, Path("predicted.png"))

Every strategy of ``parallelnn/parallel`` that has a cost model takes part; nothing here names one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parallelnn import parallel
from parallelnn.advise.costs import ADAM_STATE_BYTES, Candidate, ModelStats, Prediction, predict_step
from parallelnn.advise.hardware import Hardware

MODEL_ASSUMPTIONS = (
    ("predicted, not measured: compute = counted FLOPs / (peak x matmul efficiency) [+ memory-bound ops' bytes / "
     "HBM bandwidth, where the hardware states it]; the optimizer step, data loading and kernel launch gaps are "
     "not counted"),
    ("collectives: NCCL ring formulas, hierarchical across nodes; inter-node bandwidth is each device's share "
     "of its node's NICs (all devices of a node communicate at once)"),
    ("memory: fp32 weights and gradients, Adam state (8 bytes/parameter unless stated), saved activations at "
     "the compute dtype; CUDA context and allocator fragmentation not counted beyond the usable memory figure"),
    "strong scaling: the same global batch at every device count",
)


ATTENTION_ASSUMPTION = (
    "attention: F.scaled_dot_product_attention (transformers' attn_implementation='sdpa') counted as CUDA's fused "
    "flash / memory-efficient kernels run it: saves q, k, v, output and logsumexp, not the seq x seq weights; "
    "causal attention at the FLOPs of its unmasked half; memory-bound ops as eager PyTorch runs them (one kernel "
    "each, no fusion), at the compute dtype")


def assumptions(hw: Hardware) -> list[str]:
    """Lines to print under a prediction: the model's simplifications and the hardware's sources."""
    return [*MODEL_ASSUMPTIONS, ATTENTION_ASSUMPTION, f"{hw.name}: {hw.notes}"]


def candidates(nproc: int, strategies: Iterable[str] | None, global_batch: int,
               checkpointing: Sequence[bool] = (False,)) -> list[Candidate]:
    """Every strategy (all with a cost model, or those named) x its layouts for ``nproc`` devices (all
    factorisations for 2-D meshes) x microbatches and schedules for pipelines x activation recomputation."""
    found = []
    for name in strategies or parallel.names():
        strategy = parallel.get(name)
        if strategy.cost is None or strategy.nproc_problem(nproc):
            continue
        for layout, microbatches, schedule in strategy.cost.candidates(nproc, global_batch):
            found += [Candidate(name, layout, microbatches, schedule, ckpt) for ckpt in checkpointing]
    return found


@dataclass
class Curves:
    """Predictions for every candidate at every device count (``rows``), and what they assume."""

    hardware: str
    dtype: str
    global_batch: int
    rows: list[dict[str, Any]]
    assumptions: list[str] = field(default_factory=list)
    device_memory_bytes: float | None = None

    def best(self) -> dict[tuple[str, int], dict[str, Any]]:
        """(strategy, devices) -> its fastest feasible row."""
        out: dict[tuple[str, int], dict[str, Any]] = {}
        for row in self.rows:
            key = (row["strategy"], row["devices"])
            if row["feasible"] and (key not in out or row["samples_per_second"] > out[key]["samples_per_second"]):
                out[key] = row
        return out


def device_counts_for(hw: Hardware) -> list[int]:
    """1, 2, 4, ... up to the hardware's devices (and the total itself)."""
    counts = [2**k for k in range(int(math.log2(hw.max_devices)) + 1)]
    return counts if counts[-1] == hw.max_devices else [*counts, hw.max_devices]


def _row(p: Prediction, devices: int, nodes: int, baseline: float, tokens: int | None) -> dict[str, Any]:
    row = {"devices": devices, "nodes": nodes, **p.to_dict()}
    row["speedup"] = p.samples_per_second / baseline if baseline > 0 else None
    row["tokens_per_second"] = p.samples_per_second * tokens if tokens else None
    row["memory_gb"] = p.memory_bytes_per_rank / 1e9
    return row


def predict_curves(stats: ModelStats, hw: Hardware, global_batch: int, dtype: str = "bf16",
                   device_counts: Sequence[int] | None = None, strategies: Iterable[str] | None = None,
                   checkpointing: Sequence[bool] = (False,),
                   optimizer_state_bytes_per_param: float = ADAM_STATE_BYTES) -> Curves:
    """Predicted step time, samples/s, speedup over one device (the fastest one-device prediction, memory
    aside), memory per rank and feasibility of every candidate at each device count."""
    counts = list(device_counts or device_counts_for(hw))
    names = list(strategies or parallel.names())

    def predict(n: int) -> list[Prediction]:
        return [predict_step(stats, hw, c, global_batch, dtype, optimizer_state_bytes_per_param, hw.nodes_for(n))
                for c in candidates(n, names, global_batch, checkpointing)]

    # The baseline: the fastest one-device prediction of any strategy (those asked for may start at two).
    one = [predict_step(stats, hw, c, global_batch, dtype, optimizer_state_bytes_per_param, 1)
           for c in candidates(1, None, global_batch)]
    baseline = max((p.samples_per_second for p in one), default=0.0)
    rows = [_row(p, n, hw.nodes_for(n), baseline, stats.tokens_per_sample) for n in counts for p in predict(n)]
    return Curves(hw.name, dtype, global_batch, rows, assumptions(hw), hw.memory_bytes)


def plot_curves(table: Curves, path: Path) -> Path:
    """Predicted throughput (fastest feasible layout per strategy) and memory per rank against devices."""
    import textwrap

    from parallelnn.plots import _figure, _save

    fig = _figure(12, 5.8)
    notes = "\n".join(textwrap.fill(a, 170) for a in table.assumptions[:2])
    fig.suptitle(f"PREDICTED (not measured): {table.hardware}, {table.dtype}, global batch {table.global_batch}\n"
                 + notes, fontsize=8)
    speed, memory = fig.subplots(1, 2)
    best = table.best()
    strategies = list(dict.fromkeys(r["strategy"] for r in table.rows))
    color = {name: f"C{parallel.order(name) % 10}" for name in strategies}  # the same in both panels
    for name in strategies:
        points = sorted((n, row["samples_per_second"]) for (s, n), row in best.items() if s == name)
        if points:
            speed.plot(*zip(*points), marker="o", label=name, color=color[name])
        least = {}
        for row in table.rows:
            if row["strategy"] == name:
                n = row["devices"]
                least[n] = min(least.get(n, math.inf), row["memory_gb"])
        if least:
            memory.plot(*zip(*sorted(least.items())), marker="o", label=name, color=color[name])
    one = [r for r in table.rows if r["devices"] == 1]
    if one and one[0]["speedup"]:
        base = one[0]["samples_per_second"] / one[0]["speedup"]
        ns = sorted({r["devices"] for r in table.rows})
        speed.plot(ns, [base * n for n in ns], color="grey", linestyle=":", label="linear")
    speed.set(xscale="log", yscale="log", xlabel="devices", ylabel="predicted samples/s",
              title="fastest feasible layout per strategy")
    memory.set(xscale="log", yscale="log", xlabel="devices", ylabel="predicted GB per device",
               title="least memory per device, per strategy")
    if table.device_memory_bytes:
        memory.axhline(table.device_memory_bytes / 1e9, color="black", linestyle="--", label="device memory")
    for ax in (speed, memory):
        ax.xaxis.set_major_formatter("{x:g}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    _save(fig, Path(path))
    return Path(path)


# -- model statistics without memory: the meta device ------------------------------------------------------

def _blocks(model) -> list:
    from torch import nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return list(max(lists, key=len)) if lists else []


def _storage_key(t) -> int:
    return t.untyped_storage()._cdata


class _SavedBytes:
    """Sums the bytes of tensors autograd saves (each storage once, parameters excluded), at the compute
    dtype's size for floating tensors; splits those saved inside blocks whose last dimension is not the
    hidden size (the ones Megatron tensor parallelism shards: 3h, 4h, per-head) from the rest."""

    def __init__(self, params, itemsize: int):
        self.skip = {_storage_key(p) for p in params}
        self.itemsize, self.seen = itemsize, set()
        self.total = self.in_blocks = self.sharded = 0.0
        self.block_depth, self.hidden = 0, None

    def pack(self, t):
        key = _storage_key(t)
        if key not in self.skip and key not in self.seen:
            self.seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            if t.is_floating_point():
                nbytes = nbytes / t.element_size() * self.itemsize
            self.total += nbytes
            if self.block_depth:
                self.in_blocks += nbytes
                if t.dim() and t.shape[-1] != self.hidden:
                    self.sharded += nbytes
        return t


#: Fused attention ops (FlopCounterMode counts them; their causal half is masked, see :class:`_Traffic`).
_ATTENTION = ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_efficient_attention_backward",
              "_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_cudnn_attention_backward")
#: Ops that move no bytes (metadata, or memory not yet written).
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "alias",
               "_unsafe_view", "lift_fresh"}


def causal_kept(s_q: int, s_k: int) -> float:
    """Share of the query x key scores a causal mask keeps (PyTorch's ``is_causal``: query i sees keys 0..i):
    sum(min(i+1, s_k)) / (s_q s_k), (s+1)/2s for s_q = s_k. Flash and memory-efficient kernels skip the
    fully masked tiles (Dao 2023, FlashAttention-2, arXiv:2307.08691, section 3.1: "we can skip the
    computation of about half of the blocks"); FlopCounterMode counts all s_q x s_k ("We aren't accounting
    for causal attention here", torch/utils/flop_counter.py)."""
    full = min(s_q, s_k)
    kept = full * (full + 1) / 2 + (s_q - full) * s_k
    return kept / (s_q * s_k)


def _nbytes(t, itemsize: int) -> float:
    """Bytes of tensor ``t`` a kernel reads or writes once: its elements (at most its storage's: a broadcast view
    is read from cache), floating ones at the compute dtype's ``itemsize``."""
    n = t.numel()
    if t.element_size():
        n = min(n, t.untyped_storage().nbytes() // t.element_size())
    return n * (itemsize if t.is_floating_point() else t.element_size())


def _attention_arg(func, args, kwargs, name: str, default):
    for i, a in enumerate(func._schema.arguments):
        if a.name == name:
            return kwargs.get(name, args[i] if i < len(args) else default)
    return default


def _op_bytes(name: str, ins: list, outs: list, itemsize: int) -> float:
    """Bytes memory-bound op ``name`` reads and writes, given its tensor inputs and outputs."""
    size = lambda ts: sum(_nbytes(t, itemsize) for t in ts)  # noqa: E731
    if name == "embedding":  # reads the rows it gathers, not the table
        return size(ins[1:]) + 2 * size(outs)
    if name == "nll_loss_forward":  # reads one log-probability per target
        return size(ins[1:]) + ins[1].numel() * itemsize + size(outs)
    if name == "nll_loss_backward":  # writes the gradient (zeroed, one entry per target set)
        return size(ins[:1] + ins[2:3]) + size(outs)
    return size(ins) + size(outs)


def _traffic_mode():
    import contextlib

    from torch.utils._python_dispatch import TorchDispatchMode

    class _Traffic(TorchDispatchMode):
        """Sums the bytes every memory-bound aten op reads and writes (inputs + outputs, at the compute dtype;
        views and allocations move none) in forward and backward; the ops FlopCounterMode counts (matmuls,
        convolutions, fused attention) are left out, their time is their FLOPs'. This is the traffic of
        eager PyTorch, one kernel per op (no fusion): normalisations, activations, softmax, dropout, residual
        adds, casts, the loss. Also notes the fused attention FLOPs a causal mask skips (:func:`causal_kept`).
        ``saved`` says when the forward is inside a block and the hidden size; set ``backward`` from outside."""

        def __init__(self, itemsize: int, counted, saved: _SavedBytes):
            super().__init__()
            self.itemsize, self.counted, self.paused, self.saved = itemsize, counted, False, saved
            self.total = self.block_forward = self.block_forward_sharded = self.forward = 0.0
            self.attention_flops = self.masked_flops = 0.0
            self.backward = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            import torch
            from torch.utils._pytree import tree_leaves

            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            name = func._schema.name.split("::")[-1]
            if self.paused or name in _NO_TRAFFIC or any(r.alias_info is not None and not r.alias_info.is_write
                                                          for r in func._schema.returns):
                return out
            if func._overloadpacket in self.counted:
                if name in _ATTENTION:
                    self._attention(func, args, kwargs, out)
                return out
            ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
            moved = _op_bytes(name, ins, outs, self.itemsize)
            self.total += moved
            if not self.backward:
                self.forward += moved
                if self.saved.block_depth:
                    self.block_forward += moved
                    if outs and outs[0].dim() and outs[0].shape[-1] != self.saved.hidden:
                        self.block_forward_sharded += moved
            return out

        @contextlib.contextmanager
        def pausing(self):
            """Count nothing meanwhile."""
            before, self.paused = self.paused, True
            try:
                yield
            finally:
                self.paused = before

        def _attention(self, func, args, kwargs, out):
            from torch.utils.flop_counter import flop_registry

            flops = flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
            self.attention_flops += flops
            if _attention_arg(func, args, kwargs, "is_causal", False):
                q = _attention_arg(func, args, kwargs, "query", None)
                k = _attention_arg(func, args, kwargs, "key", None)
                self.masked_flops += flops * (1 - causal_kept(q.shape[-2], k.shape[-2]))

    return _Traffic


def _repeat_heads(x, rep: int, traffic):
    """``x`` [..., kv_heads, s, d] repeated to [..., kv_heads * rep, s, d] for a kernel without grouped-query
    support; its copy and its gradient's sum are not counted as traffic (a GQA kernel reads the kv heads in
    place)."""
    import contextlib

    import torch

    def quiet():
        return contextlib.nullcontext() if traffic is None else traffic.pausing()

    class Repeat(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            with quiet():
                return t.repeat_interleave(rep, dim=-3)

        @staticmethod
        def backward(ctx, g):
            with quiet():
                return g.unflatten(-3, (-1, rep)).sum(-3)

    return Repeat.apply(x)


def _fused_attention(saved: _SavedBytes | None = None, traffic=None):
    """Patch ``F.scaled_dot_product_attention`` to the memory-efficient kernel (it has meta kernels), as
    CUDA runs it: it saves q, k, v, the output and the logsumexp (O(seq) per head), not the seq x seq weights the
    math fallback on meta saves (Dao et al. 2022, FlashAttention, arXiv:2205.14135, section 3.1: the backward
    recomputes the attention matrix from the saved softmax statistics). Grouped-query attention
    (``enable_gqa``, as transformers' sdpa path calls it for Llama) is run on repeated kv heads, counted as
    a GQA kernel saves them: the kv heads once (``saved``), no copy (``traffic``)."""
    from unittest import mock

    import torch
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, **kw):
        grouped = q.shape[-3] != k.shape[-3]
        if attn_mask is not None or kw or (grouped and not enable_gqa) or q.dim() != 4:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                            enable_gqa=enable_gqa, **kw)
        if grouped:
            rep = q.shape[-3] // k.shape[-3]
            k_rep, v_rep = _repeat_heads(k, rep, traffic), _repeat_heads(v, rep, traffic)
            if saved is not None:  # the kernel saves the repeated copies; a GQA kernel saves k and v
                saved.skip.update(_storage_key(t) for t in (k_rep, v_rep))
                saved.pack(k)
                saved.pack(v)
            k, v = k_rep, v_rep
        return torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, None, True, dropout_p, is_causal, scale=scale)[0]

    return mock.patch.object(F, "scaled_dot_product_attention", sdpa)


def _loss(out, x):
    import torch.nn.functional as F

    out = getattr(out, "logits", out)
    out = out[0] if isinstance(out, (tuple, list)) else out
    if not x.is_floating_point() and out.dim() == 3:  # a language model: next-token cross-entropy
        return F.cross_entropy(out.flatten(0, 1).float(), x.flatten())
    return out.float().sum()


def stats_from_meta(build_model: Callable[[], Any], sample_input_shape: tuple[int, ...], *, input_dtype=None,
                    compute_dtype: str = "bf16", blocks: Callable[[Any], list] | None = None) -> ModelStats:
    """:class:`ModelStats` of a model built on the meta device (no memory): parameters, FLOPs of forward +
    backward (``FlopCounterMode``; causal fused attention at its kept share, :func:`causal_kept`), the bytes of
    the memory-bound ops (:func:`_traffic_mode`), saved activations (``saved_tensors_hooks``; SDPA as the
    fused kernels save, :func:`_fused_attention`) and block boundaries, for a
    batch of ``sample_input_shape`` (integer token ids unless ``input_dtype`` says otherwise; the first
    dimension is the batch). ``blocks``: the model's repeated blocks (default: its longest ModuleList)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from parallelnn.advise.costs import BYTES

    with torch.device("meta"):
        model = build_model()
    params = list({id(p): p for p in model.parameters()}.values())
    n_params = sum(p.numel() for p in params)
    found = list(blocks(model) if blocks else _blocks(model))
    block_params = [sum(p.numel() for p in b.parameters()) for b in found]
    batch = sample_input_shape[0]
    x = torch.zeros(sample_input_shape, dtype=input_dtype or torch.long, device="meta")
    saved = _SavedBytes(params, BYTES[compute_dtype])
    boundary: list[Any] = []
    hooks = _watch_blocks(found, saved, boundary)
    counter = FlopCounterMode(display=False)
    traffic = _traffic_mode()(BYTES[compute_dtype], set(counter.flop_registry), saved)
    try:  # traffic below the counter: it sees the ops the counter has decomposed
        with _fused_attention(saved, traffic), traffic, counter, \
                torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            loss = _loss(model(x), x)
            traffic.backward = True
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    flops = counter.get_total_flops() - traffic.masked_flops
    stats = _stats(model, params, n_params, found, block_params, flops, saved, boundary, batch,
                   sample_input_shape, x, BYTES[compute_dtype])
    block = _block_flops(model, found, counter)
    if traffic.masked_flops:  # the blocks' share of the masked attention FLOPs
        block -= _block_flops(model, found, counter, _ATTENTION) * traffic.masked_flops / traffic.attention_flops
    stats.tp_sharded_flops_fraction = block / max(flops, 1)
    stats.block_flops_fraction = stats.tp_sharded_flops_fraction if found else None
    stats.nonmatmul_bytes_per_sample = traffic.total / batch
    stats.nonmatmul_block_forward_bytes_per_sample = traffic.block_forward / batch
    stats.tp_sharded_nonmatmul_fraction = traffic.block_forward_sharded / traffic.forward if traffic.forward else 0.0
    return stats


def _block_flops(model, found, counter, only: tuple[str, ...] | None = None) -> float:
    """FLOPs counted inside the blocks (FlopCounterMode names modules ``ClassName.fqn``), of the ops named
    ``only`` if given."""
    ids = {id(b) for b in found}
    names = {f"{type(model).__name__}.{fqn}" for fqn, m in model.named_modules() if id(m) in ids}
    return float(sum(n for name, ops in counter.get_flop_counts().items() if name in names
                     for op, n in ops.items() if only is None or str(op).split(".")[-1] in only))


def _watch_blocks(found, saved: _SavedBytes, boundary: list) -> list:
    """Hooks that mark when a block runs (for the saved-tensor split) and keep the first block's output."""
    def enter(module, args):
        saved.block_depth += 1

    def leave(module, args, output):
        saved.block_depth -= 1
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not boundary:
            boundary.append(out)
            saved.hidden = out.shape[-1]

    hooks = []
    for b in found:
        hooks += [b.register_forward_pre_hook(enter), b.register_forward_hook(leave)]
    if found:  # the hidden size is known before the first block's tensors are saved: its input's last dim
        hooks.append(found[0].register_forward_pre_hook(
            lambda m, args: setattr(saved, "hidden", args[0].shape[-1]) if args else None))
    return hooks


def _stats(model, params, n_params, found, block_params, flops, saved, boundary, batch, shape, x, itemsize):
    per_param = params[0].element_size() if params else 4
    root = n_params - sum(block_params)
    out = boundary[0] if boundary else None
    boundary_bytes = out.numel() / batch * itemsize if out is not None else 0.0
    sharded = sum(p.numel() for b in found for m in b.modules() for p in m.parameters(recurse=False) if p.dim() >= 2)
    sharded += sum(m.bias.numel() for b in found for m in b.modules()
                   if getattr(m, "bias", None) is not None and getattr(m, "weight", None) is not None
                   and m.weight.dim() >= 2)
    n_blocks = len(found)
    return ModelStats(
        parameters=n_params, parameter_bytes=n_params * per_param, flops_per_sample=flops / batch,
        activation_bytes_per_sample=saved.total / batch,
        layers=n_blocks + 2 if n_blocks else sum(1 for m in model.children() if any(True for _ in m.parameters())),
        largest_layer_parameters=max([*block_params, root]),
        boundary_bytes_per_sample=boundary_bytes,
        tp_allreduce_bytes_per_sample=2 * n_blocks * boundary_bytes, tp_allreduce_calls=2 * n_blocks,
        tp_sharded_fraction=sharded / n_params if n_params else 0.0,
        tp_sharded_activation_fraction=saved.sharded / saved.total if saved.total else 0.0,
        tokens_per_sample=int(shape[1]) if not x.is_floating_point() and len(shape) > 1 else None)
