"""Run a test body on several gloo ranks in fresh spawned processes.

Each rank gets ``torch.distributed`` initialised on gloo over a file store and one
intra-op thread (so 2-4 ranks share a small machine's cores without oversubscribing
them), and returns a picklable value (python numbers, lists, numpy arrays) to the parent.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import traceback
from typing import Any, Callable


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, store_path: str, results, args, kwargs) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size))
    try:
        dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
        value = fn(rank, world_size, *args, **kwargs)
        results.put((rank, True, value))
    except BaseException:  # report any failure, including assertion errors, to the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 300.0, **kwargs: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` ranks; return the per-rank values.

    ``fn`` must be a module-level function (it is pickled by name). A failure on any
    rank raises ``AssertionError`` carrying that rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, store, results, args, kwargs))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        values: dict[int, Any] = {}
        try:
            for _ in range(world_size):
                rank, ok, value = results.get(timeout=timeout)
                if not ok:
                    raise AssertionError(f"rank {rank} failed:\n{value}")
                values[rank] = value
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout}s waiting for ranks {sorted(set(range(world_size)) - set(values))}")
        finally:
            for p in procs:
                p.join(timeout=10)
                if p.is_alive():
                    p.kill()
    return [values[r] for r in range(world_size)]
