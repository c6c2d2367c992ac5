import pytest

from dist_utils import run_ranks


def _allreduce_rank(rank: int, world_size: int) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def _failing_rank(rank: int, world_size: int) -> None:
    assert rank == 0, "rank 1 fails on purpose"


def test_run_ranks_returns_each_rank_value():
    assert run_ranks(_allreduce_rank, 2) == [3.0, 3.0]


def test_run_ranks_reports_rank_failure():
    with pytest.raises(AssertionError, match="rank 1 failed"):
        run_ranks(_failing_rank, 2)
