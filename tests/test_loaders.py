"""The batch plan every loader and rank follows: shares that cover each global batch exactly once,
and a step count (used for lengths, schedules and logging) that agrees with the batches drawn."""

import pytest
import torch

from parallelnn.data.loaders import BatchPlan


@pytest.mark.parametrize("n,batch,dp", [(0, 64, 1), (5, 7, 2), (64, 64, 2), (65, 64, 2), (300, 64, 4), (130, 64, 3)])
def test_step_count_agrees_with_the_batches(n, batch, dp):
    assert BatchPlan(n, batch, True, 0, 0, dp).steps == len(BatchPlan(n, batch, True, 0, 0, dp).global_batches())


def test_rank_shares_cover_each_global_batch_once():
    plans = [BatchPlan(300, 64, True, seed=3, dp_rank=r, dp_size=3, epoch=2) for r in range(3)]
    per_rank = [list(p.rank_batches()) for p in plans]
    for step, batch in enumerate(plans[0].global_batches()):
        shares = [per_rank[r][step][0] for r in range(3)]
        assert torch.equal(torch.cat(shares), batch)
        assert all(per_rank[r][step][1] == len(batch) for r in range(3))
