"""megatron_mile.multi_tensor: the foreach versions of amp_C's l2norm and scale kernels.

Values against float64 references written from the definitions; no host sync (the reason they
exist: megatron-core's own fallback waits on the GPU once per tensor); and installed exactly where
megatron-core fell back to its per-tensor loops. MEGATRON_MILE_TEST_DEVICE=cuda runs them on a GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from host_sync import HostSync, no_host_sync
from megatron_mile import multi_tensor

DEVICE = torch.device(os.environ.get("MEGATRON_MILE_TEST_DEVICE", "cpu"))
SHAPES = [(7, 3), (129,), (2, 5, 4), (1,)]


def _tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(s, generator=g, dtype=torch.float64) * (i + 1)).to(DEVICE, dtype) for i, s in enumerate(SHAPES)]


def _flag() -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_l2_norm_matches_float64(dtype):
    tensors = _tensors(dtype)
    with no_host_sync():
        total, per_tensor = multi_tensor.l2_norm(2048, _flag(), [tensors], True)
    exact = [math.sqrt(sum(float(x) ** 2 for x in t.double().flatten())) for t in tensors]
    assert total.shape == (1,) and total.dtype == torch.float32 and total.device.type == DEVICE.type
    assert total.item() == pytest.approx(math.sqrt(sum(n * n for n in exact)), rel=1e-6)
    assert per_tensor.tolist() == pytest.approx(exact, rel=1e-6)
    assert multi_tensor.l2_norm(2048, _flag(), [tensors], False)[1] is None

    from megatron.core.utils import local_multi_tensor_l2_norm

    with pytest.raises(HostSync), no_host_sync():  # megatron-core's fallback: one wait per tensor
        local_multi_tensor_l2_norm(2048, _flag(), [tensors], False)


def test_l2_norm_of_nothing_is_zero():
    total, _ = multi_tensor.l2_norm(2048, _flag(), [[]], False)
    assert total.tolist() == [0.0]


def test_scale_in_place_and_into_another_dtype():
    grads = _tensors(torch.float32)
    expected = [t.double() * 0.25 for t in grads]
    with no_host_sync():
        multi_tensor.scale(2048, _flag(), [grads, grads], 0.25)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want, rtol=1e-7, atol=0)

    # The optimizer's copy of fp32 main weights into bf16 model weights (factor 1), and a scaled copy.
    main = _tensors(torch.float32, seed=1)
    for factor in (1.0, -3.0):
        model = [torch.empty_like(t, dtype=torch.bfloat16) for t in main]
        with no_host_sync():
            multi_tensor.scale(2048, _flag(), [main, model], factor)
        for got, src in zip(model, main):
            torch.testing.assert_close(got, (src.double() * factor).to(torch.bfloat16), rtol=0, atol=0)
    multi_tensor.scale(2048, _flag(), [[], []], 2.0)  # nothing to do


def test_installed_where_megatron_core_fell_back():
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as mcore_optimizer

    assert clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm  # no TE or Apex here
    try:
        multi_tensor.install()
        multi_tensor.install()  # idempotent
        assert clip_grads.l2_norm_impl is multi_tensor.l2_norm
        assert clip_grads.multi_tensor_scale_impl is mcore_optimizer.multi_tensor_scale_impl is multi_tensor.scale
        assert multi_tensor.implementation() == "torch._foreach"
    finally:
        clip_grads.l2_norm_impl = mcore_utils.local_multi_tensor_l2_norm
        clip_grads.multi_tensor_scale_impl = mcore_optimizer.multi_tensor_scale_impl = mcore_utils.local_multi_tensor_scale
    assert multi_tensor.implementation() == "megatron-core's per-tensor loops"
