"""Distributed start-up, and the layer that lets megatron-core 0.16.1 run on CPU.

``initialize()`` is the one entry point: it starts ``torch.distributed`` from the
torchrun environment (NCCL with CUDA, gloo without), builds megatron-core's
tensor/pipeline/data-parallel groups and seeds every RNG.

On a machine without CUDA it first calls ``enable_cpu_compat()``. megatron-core
hard-codes CUDA in a handful of places that the GPT model, the pipeline schedules,
DDP and the optimizer touch; each patch below names the place and why. Nothing is
patched at import time, and with CUDA present ``enable_cpu_compat()`` does nothing.

1. ``torch.cuda.current_device()`` answers ``cpu``: megatron-core allocates with
   ``device=torch.cuda.current_device()`` in ``RotaryEmbedding``, ``GlobalMemoryBuffer``,
   the DDP grad buffers and the pipeline p2p shape exchange.
2. The "CUDA" RNG is the CPU generator: ``torch.cuda.get_rng_state``/``manual_seed`` and
   ``tensor_parallel.random._get/_set_cuda_rng_state`` (used by the RNG tracker's
   ``add``/``fork`` and by activation recomputation) read and write the CPU state.
3. Literal ``device="cuda"`` tensors are created on the CPU. Small helpers that make them
   run under a torch-function mode that rewrites CUDA devices to ``cpu`` in every torch
   call: ``transformer.utils.get_default_causal_mask``, the grad-norm and clipping helpers
   (``get_grad_norm_fp32``, ``count_zeros_fp32``, ``clip_grad_by_total_norm_fp32``) and the
   optimizers' constructors (loss-scale and found-inf scalars). The three pipeline schedules
   make one (the token counter, ``torch.zeros(..., device="cuda")``), but they also run the
   whole forward and backward, where that mode would put a Python call in front of every
   torch operation; instead the schedules module gets its own ``torch``, whose tensor
   factories create a tensor asked for on a CUDA device on the CPU and which is torch itself
   for everything else.
4. The bf16 and distributed optimizers' constructors sort parameters by their CUDA type
   names (``"torch.cuda.FloatTensor"``, ...) and reject anything else, and
   ``clip_grad_by_total_norm_fp32`` asserts ``torch.cuda.FloatTensor`` grads; under the same
   mode ``Tensor.type()`` reports a CPU tensor by its CUDA name.
5. ``torch.cuda.synchronize()`` is a no-op (CPU work is already synchronous): the
   ``dist_checkpointing`` writer calls it after staging tensors to host memory.
6. megatron-core's advice to set ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (so that tensor-parallel
   communication overlaps with compute on one CUDA work queue) is silenced: there is no queue.
7. The RNG tracker's ``fork`` warns when the CPU generator moved inside it, which on a GPU
   means a CPU draw leaked into the model-parallel stream; here the "CUDA" generator *is*
   the CPU one, so every dropout draw under ``fork`` would warn. That one warning is
   filtered from megatron's ``tensor_parallel.random`` logger.
8. Every gloo process group gets its own transport device, whose event-loop thread wakes
   every 10 ms even when the group is idle. megatron-core builds about twenty groups; at a
   world of one all of them, and at larger worlds many (pipeline, context, expert groups of
   size one), have a single member and never send anything, yet their loop threads woke a
   one-rank trainer about 2,000 times a second and preempted its compute threads. Gloo groups
   of one member therefore share one loopback device per process
   (``_GlooSharingSingleRankDevice``); a group with peers keeps a device of its own, as torch
   builds it, so that no group's traffic waits behind another's.

One more CUDA assumption is configuration, not a patch, and lives where the config is
built (``megatron_mile.model``): ``batch_p2p_sync`` (a ``torch.cuda.synchronize()``
around p2p) is turned off. With these in place the GPU recipe itself (bf16 with fp32 main
weights, the distributed optimizer, overlapped grad reduce-scatter, sequence
parallelism) runs on gloo; only Transformer Engine and the fused kernels stay CUDA-only.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import logging
import os
import random
import socket
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroupGloo, distributed_c10d
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_cpu_compat_enabled = False


def has_cuda() -> bool:
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- CPU layer


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is a CUDA ordinal in torch's device arguments.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaDevicesOnCpu(TorchFunctionMode):
    """Rewrites ``device=cuda`` (and ``pin_memory``) in torch calls to the CPU, and names
    CPU tensors by their CUDA types."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs = {**kwargs, "device": "cpu"}
        if kwargs.get("pin_memory"):
            kwargs = {**kwargs, "pin_memory": False}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # megatron-core sorts parameters by their CUDA type names ("torch.cuda.FloatTensor").
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


def _cuda_literals_on_cpu(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _CudaDevicesOnCpu():
            return fn(*args, **kwargs)

    return wrapper


def _factory_on_cpu(factory: Callable) -> Callable:
    @functools.wraps(factory)
    def create(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return factory(*args, **kwargs)

    return create


class _TorchWithCpuFactories(types.ModuleType):
    """``torch`` as a megatron-core module sees it: tensor factories asked for a CUDA device
    create on the CPU; every other attribute is looked up in torch itself."""

    FACTORIES = ("empty", "full", "ones", "tensor", "zeros")

    def __init__(self):
        super().__init__("torch")
        for name in self.FACTORIES:
            setattr(self, name, _factory_on_cpu(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:  # only for names not set in __init__
        return getattr(torch, name)


class _WithoutForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


class _GlooSharingSingleRankDevice(ProcessGroupGloo):
    """torch's gloo backend, except that groups of one member share one loopback device (item 8)."""

    shared_device: ProcessGroupGloo.Device | None = None

    def __init__(self, store: dist.Store, rank: int, size: int, timeout: datetime.timedelta):
        if size > 1:
            super().__init__(store, rank, size, timeout=timeout)
            return
        if _GlooSharingSingleRankDevice.shared_device is None:
            _GlooSharingSingleRankDevice.shared_device = ProcessGroupGloo.create_device(hostname="127.0.0.1")
        options = ProcessGroupGloo._Options()
        options._devices = [_GlooSharingSingleRankDevice.shared_device]
        options._threads = 1
        options._timeout = timeout
        super().__init__(store, rank, size, options)


def enable_cpu_compat() -> bool:
    """Apply the CPU patches listed in the module docstring. Returns True if applied.

    Idempotent, and a no-op (returning False) when CUDA is available.
    """
    global _cpu_compat_enabled
    if has_cuda():
        return False
    if _cpu_compat_enabled:
        return True

    from megatron.core.fusions import fused_softmax
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mcore_random
    from megatron.core.transformer import utils as transformer_utils

    # 1. The "current device" is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")

    # 2. The CUDA RNG is the CPU generator.
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.manual_seed = torch.manual_seed
    mcore_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)

    # 3. Literal device="cuda" tensors (and 4., CUDA type names: clipping, the optimizers' constructors).
    causal_mask = _cuda_literals_on_cpu(transformer_utils.get_default_causal_mask)
    transformer_utils.get_default_causal_mask = causal_mask
    fused_softmax.get_default_causal_mask = causal_mask
    for name in ("get_grad_norm_fp32", "count_zeros_fp32", "clip_grad_by_total_norm_fp32"):
        patched = _cuda_literals_on_cpu(getattr(clip_grads, name))
        setattr(clip_grads, name, patched)
        setattr(mcore_optimizer, name, patched)
    schedules.torch = _TorchWithCpuFactories()
    for cls in (mcore_optimizer.FP32Optimizer, mcore_optimizer.MixedPrecisionOptimizer,
                mcore_optimizer.Float16OptimizerWithFloat16Params, DistributedOptimizer):
        cls.__init__ = _cuda_literals_on_cpu(cls.__init__)

    # 5. Nothing to wait for on the CPU.
    torch.cuda.synchronize = lambda device=None: None

    # 6. Advice about CUDA work queues.
    warnings.filterwarnings("ignore", message="When using async grad allreduce it is recommended to set the "
                            "environment variable CUDA_DEVICE_MAX_CONNECTIONS",
                            module=r"megatron\.core\.tensor_parallel\.layers")
    # 7. On CPU the "CUDA" RNG is the CPU generator: draws under the tracker's fork are expected.
    logging.getLogger(mcore_random.__name__).addFilter(_WithoutForkWarning())
    # 8. Gloo groups without peers share one idle event loop.
    distributed_c10d.ProcessGroupGloo = _GlooSharingSingleRankDevice

    _cpu_compat_enabled = True
    log.info("megatron-core CPU compatibility layer enabled (no CUDA on this machine)")
    return True


# --------------------------------------------------------------------------- start-up


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    vp: int | None

    @property
    def is_logging_rank(self) -> bool:
        """The last rank holds the last pipeline stage, so it sees the loss."""
        return self.rank == self.world_size - 1


def _init_process_group(timeout_minutes: int) -> None:
    if dist.is_initialized():
        return
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            # A single process without torchrun: a world of one on a local port.
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29500")
            break
    backend = "nccl" if has_cuda() else "gloo"
    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
    if has_cuda():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kwargs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; megatron's tracker gets per-TP-rank model-parallel seeds."""
    from megatron.core import parallel_state, tensor_parallel

    # Pipeline stages draw different streams, as in Megatron-LM.
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    tensor_parallel.model_parallel_cuda_manual_seed(stage_seed)


def initialize(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
               virtual_pipeline_model_parallel_size: int | None = None, seed: int = 1234,
               timeout_minutes: int = 10) -> Runtime:
    """Start distributed, build megatron-core's parallel groups and seed the RNGs."""
    from megatron.core import parallel_state

    enable_cpu_compat()  # before the default group, which item 8 concerns too
    _init_process_group(timeout_minutes)
    world_size = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not divisible by "
                         f"tensor-model-parallel-size × pipeline-model-parallel-size = {model_parallel}")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        )
    seed_everything(seed)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return Runtime(
        rank=dist.get_rank(),
        world_size=world_size,
        local_rank=local_rank,
        device=torch.device("cuda", local_rank) if has_cuda() else torch.device("cpu"),
        tp=tensor_model_parallel_size,
        pp=pipeline_model_parallel_size,
        dp=world_size // model_parallel,
        vp=virtual_pipeline_model_parallel_size,
    )


def claim_failure(message: str | None = None) -> bool:
    """Record that this rank failed, and say whether it should report the failure.

    With ``message`` (a one-line error): True for the first rank to fail with that message,
    so ranks that fail alike print it once and a failure on one pipeline stage is still
    printed by that stage. Without one (an unexpected exception): True unless another rank
    failed first, in which case this one is almost surely its consequence (a peer that left
    mid-collective) and that rank's report explains the run.

    Counted in the process group's key-value store, not with a collective: the other ranks
    may be blocked elsewhere. Before a process group exists, rank 0 reports a message (every
    rank checks the same command line); if the store cannot be reached, this rank reports,
    since a duplicate line beats a silent failure.
    """
    if not dist.is_initialized():
        return message is None or os.environ.get("RANK", "0") == "0"
    try:
        store = dist.distributed_c10d._get_default_store()
        first_failure = store.add("megatron_mile/failed", 1) == 1
        if message is None:
            return first_failure
        return store.add("megatron_mile/error/" + hashlib.sha256(message.encode()).hexdigest(), 1) == 1
    except RuntimeError:
        return True


def initialize_world_of_one(seed: int = 1234) -> Runtime:
    """One process at TP = PP = 1 for offline tools (checkpoint conversion), on a free local
    port so that a training job on the same node is left alone."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return initialize(1, 1, seed=seed)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
