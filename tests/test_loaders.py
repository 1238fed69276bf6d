"""The batch plan every loader and rank follows: shares that cover each global batch exactly once,
and a step count (used for lengths, schedules and logging) that agrees with the batches drawn."""

import pytest
import torch

from parallelnn.data.loaders import ArraySplit, BatchPlan, make_loader


@pytest.mark.parametrize("n,batch,dp", [(0, 64, 1), (5, 7, 2), (64, 64, 2), (65, 64, 2), (300, 64, 4), (130, 64, 3)])
def test_step_count_agrees_with_the_batches(n, batch, dp):
    assert BatchPlan(n, batch, True, 0, 0, dp).steps == len(BatchPlan(n, batch, True, 0, 0, dp).global_batches())


def test_the_last_short_batch_is_trained_whatever_the_ranks():
    """Iris at batch 7: 17 batches of 7 and one of 1, alone or over 2 or 3 ranks (some shares empty)."""
    for dp in (1, 2, 3):
        plans = [BatchPlan(120, 7, True, seed=0, dp_rank=r, dp_size=dp) for r in range(dp)]
        assert all(p.steps == 18 for p in plans)
        per_rank = [list(p.rank_batches()) for p in plans]
        assert [n for _, n in per_rank[0]] == [7] * 17 + [1]
        assert sum(len(idx) for shares in per_rank for idx, _ in shares) == 120
        assert sorted(torch.cat([idx for shares in per_rank for idx, _ in shares]).tolist()) == list(range(120))


def test_both_loaders_give_an_empty_share_the_shape_of_the_others():
    split = ArraySplit(torch.randn(120, 4), torch.arange(120) % 3, prepare=lambda x: x * 2)
    kw = dict(shuffle=True, seed=1, dp_rank=1, dp_size=2)
    memory = list(make_loader("memory", split, 7, torch.device("cpu"), **kw))
    loader = make_loader("dataloader", split, 7, torch.device("cpu"), **kw)
    batches = list(loader)
    loader.close()
    assert len(memory) == len(batches) == len(loader) == 18
    for (xm, ym, nm), (xd, yd, nd) in zip(memory, batches):
        assert torch.equal(xm, xd) and torch.equal(ym, yd) and nm == nd
    x, y, n = batches[-1]  # the last global batch has 1 sample: rank 0's, so rank 1's share is empty
    assert x.shape == (0, 4) and x.dtype == torch.float32 and y.shape == (0,) and y.dtype == torch.long and n == 1


def test_rank_shares_cover_each_global_batch_once():
    plans = [BatchPlan(300, 64, True, seed=3, dp_rank=r, dp_size=3, epoch=2) for r in range(3)]
    per_rank = [list(p.rank_batches()) for p in plans]
    for step, batch in enumerate(plans[0].global_batches()):
        shares = [per_rank[r][step][0] for r in range(3)]
        assert torch.equal(torch.cat(shares), batch)
        assert all(per_rank[r][step][1] == len(batch) for r in range(3))
