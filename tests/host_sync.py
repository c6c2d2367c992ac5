"""A guard that fails on any host sync: an operation whose result the host must wait for on a GPU.

It works on the CPU too (the same operations are intercepted), so code that must never stall a
GPU's work queue is checked on every machine.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class HostSync(AssertionError):
    pass


# Ops whose result the host has to wait for on a GPU: .item() / bool() / int() / float() all go
# through _local_scalar_dense; the others have a data-dependent output size.
_SYNC_OPS = {"aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal", "aten::nonzero",
             "aten::nonzero_numpy", "aten::argwhere", "aten::masked_select", "aten::_unique2",
             "aten::unique_dim", "aten::unique_consecutive", "aten::repeat_interleave"}
_INDEX_OPS = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"}


class _SyncDispatchGuard(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _SYNC_OPS or (name == "aten::where" and len(args) == 1):
            raise HostSync(f"host sync: {func}")
        if name in _INDEX_OPS and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                      for i in args[1]):
            raise HostSync(f"host sync: {func} with a boolean mask")
        return func(*args, **(kwargs or {}))


class _SyncFunctionGuard(TorchFunctionMode):
    _METHODS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._METHODS:
            raise HostSync(f"host sync: Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync():
    """Fails on any data-dependent host sync in the block (autograd's backward included)."""
    with _SyncFunctionGuard(), _SyncDispatchGuard():
        yield
