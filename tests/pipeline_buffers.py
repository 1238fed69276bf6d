"""Run under torchrun by ``test_advise``: a pipeline's receive buffers, as torch.distributed.pipelining allocated
them on this rank after a step, against ``pipeline.receive_buffers``' prediction. Prints one JSON line a rank.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/pipeline_buffers.py SCHEDULE MICROBATCHES WORKLOAD
"""

import json
import sys

import torch
import torch.distributed as dist

from parallelnn.advise.costs import ModelStats
from parallelnn.advise.stats import model_stats
from parallelnn.config import RunConfig
from parallelnn.launch import Context
from parallelnn.parallel import Layout, pipeline
from parallelnn.runner import build_workload, check

schedule, m, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = check(RunConfig(workload=name, quiet=True, strategy="pipeline", schedule=schedule,
                      microbatches=m, batch_size=16, nproc=2))
cfg, workload = build_workload(cfg, torch.device("cpu"), lambda msg: None)
stats = ModelStats(**model_stats(workload, cfg.batch_size))
ctx = Context(device=torch.device("cpu"), rank=rank, world_size=world, local_rank=rank, local_world_size=world,
              distributed=True)
engine = pipeline.apply(workload.model, workload, cfg, ctx, Layout(pp=world), 2)
sample = workload.train.head(16)
x, y = sample.prepare(sample.inputs), sample.targets
engine.train_step(x, y, 1 / 16)
sched = engine._schedules[16]
stages = getattr(sched, "_stages", None) or [sched._stage]
held = {}
for stage in stages:
    for infos in [*stage.args_recv_info.values(), *stage.grad_recv_info.values()]:
        for info in infos:
            buffer = getattr(info, "buffer", None)
            if isinstance(buffer, torch.Tensor):
                held[buffer.untyped_storage().data_ptr()] = buffer.untyped_storage().nbytes()
v = pipeline.VIRTUAL.get(schedule, 1)
ranks = pipeline.stage_shares(stats, world, v)
predicted = pipeline.receive_buffers(stats, world, v, rank, 16, ranks[rank]["stages"])
print(json.dumps({"rank": rank, "allocated": sum(held.values()), "predicted": predicted}))
dist.destroy_process_group()
