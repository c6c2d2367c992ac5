"""Tests for megatron_mile.loss.

Every number is checked against a float64 reference written here from the formulas (full,
unsharded logits, plain autograd), never against the implementation. Multi-rank checks run in
one spawned gloo group per layout (TP=4; TP=2 x DP=2) and batch all their cases; each rank also
counts its all-reduces by wrapping ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from dist_utils import run_ranks
from host_sync import HostSync, no_host_sync
from megatron_mile import loss as loss_module
from megatron_mile.loss import vocab_parallel_ce_and_entropy, weighted_lm_loss

F64 = torch.float64
# Single-rank cases run their loss here; the float64 reference always runs on the CPU.
# On a GPU machine: MEGATRON_MILE_TEST_DEVICE=cuda pytest tests/test_loss.py -k "single_rank or extreme or gamma
# or host_sync or no_gradient" (benchmarks/gpu_smoke.sh runs that).
DEVICE = torch.device(os.environ.get("MEGATRON_MILE_TEST_DEVICE", "cpu"))


# ---------------------------------------------------------------- float64 reference


def ref_terms(z: torch.Tensor, target: torch.Tensor, vocab: int, eps: float):
    """CE (label-smoothed with eps), entropy, p_target and NLL of full logits z over the first `vocab` columns."""
    logp = z[..., :vocab].log_softmax(-1)
    nll = -logp.gather(-1, target[..., None]).squeeze(-1)
    ce = (1 - eps) * nll - eps * logp.mean(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return ce, entropy, torch.exp(-nll), nll


def ref_weights(z, target, mask, vocab, eps, kind, gamma, sigma):
    _, entropy, _, nll = ref_terms(z.detach(), target, vocab, eps)
    if kind == "ce":
        return torch.ones_like(entropy)
    if kind == "focal":  # the original trainer: CE is 0 at an ignored position, so p_target is 1 there
        return (1 - torch.exp(-nll * mask)) ** gamma
    return (sigma + entropy) ** gamma


def reference(zs, ts, ms, me, kind, gamma=1.0, sigma=1.0, alpha_mode="global", vocab=None, eps=0.0):
    """Loss, d loss / d logits and stats of DP rank `me`; zs[r], ts[r], ms[r] are DP rank r's full data."""
    vocab = vocab or zs[0].shape[-1]
    zs = [z.to(F64) for z in zs]
    ms = [m.to(F64) for m in ms]
    ws = [ref_weights(z, t, m, vocab, eps, kind, gamma, sigma) for z, t, m in zip(zs, ts, ms)]
    if alpha_mode == "global":
        alpha = sum(m.sum() for m in ms) / sum((m * w).sum() for m, w in zip(ms, ws))
    else:
        alpha = sum(1 / w.mean() for w in ws) / len(ws)
    z = zs[me].clone().requires_grad_()
    ce, entropy, _, nll = ref_terms(z, ts[me], vocab, eps)
    m, w = ms[me], ws[me]
    terms = m * alpha * w * ce
    loss = terms.sum() / m.sum() if alpha_mode == "global" else terms.mean()
    loss.backward()
    # The logged "ce" is the plain NLL (log-perplexity) whatever the smoothing of the training CE.
    stats = {"ce": (m * nll).sum() / m.sum(), "entropy": (m * entropy).sum() / m.sum(), "alpha": alpha}
    return loss.detach(), z.grad, {k: v.detach() for k, v in stats.items()}


def make_data(seed: int, dp: int, columns: int, vocab: int | None, dtype: torch.dtype, style: str = "normal",
              shape: tuple[int, ...] = (3, 5)):
    """Logits [dp, *shape, columns] (already rounded to dtype), targets, partial 0/1 masks."""
    g = torch.Generator().manual_seed(seed)
    vocab = vocab or columns
    z = 3 * torch.randn(dp, *shape, columns, generator=g, dtype=F64)
    t = torch.randint(0, vocab, (dp, *shape), generator=g)
    if style == "extreme":  # +-1e4: exp of every gap underflows
        z = 1e4 * torch.sign(z)
    elif style == "peaked":  # one column 200 above the rest (on any TP shard); half the targets hit it
        peak = torch.randint(0, vocab, (dp, *shape), generator=g)
        z.scatter_add_(-1, peak[..., None], torch.full((dp, *shape, 1), 200.0, dtype=F64))
        t = torch.where(torch.rand(dp, *shape, generator=g) < 0.5, peak, t)
    mask = (torch.rand(dp, *shape, generator=g) < 0.7).to(F64)
    mask.view(dp, -1)[:, 0] = 1.0
    return z.to(dtype), t, mask


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().to(F64), b.detach().cpu().to(F64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-5, 1e-2)}  # (forward, gradient) relative


# ---------------------------------------------------------------- single rank (TP = DP = 1)

SINGLE_CASES = [
    # (dtype, kind, inplace, vocab (None = no padding), label_smoothing, alpha_mode)
    (torch.float32, "mile", False, None, 0.0, "global"),
    (torch.float32, "mile", True, 57, 0.1, "global"),
    (torch.float32, "focal", True, None, 0.0, "legacy"),
    (torch.float32, "ce", False, 57, 0.2, "global"),
    (torch.float32, "mile", True, None, 0.0, "legacy"),
    (torch.bfloat16, "mile", False, 57, 0.0, "global"),
    (torch.bfloat16, "mile", True, None, 0.1, "legacy"),
    (torch.bfloat16, "focal", False, None, 0.0, "global"),
    (torch.bfloat16, "ce", True, 57, 0.0, "global"),
]


@pytest.mark.parametrize("dtype,kind,inplace,vocab,eps,alpha_mode", SINGLE_CASES)
def test_single_rank_matches_float64_reference(dtype, kind, inplace, vocab, eps, alpha_mode):
    z, t, m = make_data(1, 1, 64, vocab, dtype)
    leaf = z[0].to(DEVICE).clone().requires_grad_()
    logits = leaf.clone() if inplace else leaf  # a non-leaf buffer for in-place, as in training
    loss, stats = weighted_lm_loss(logits, t[0].to(DEVICE), m[0].to(DEVICE), kind=kind, gamma=1.5, sigma=0.5, alpha_mode=alpha_mode,
                                   vocab_size=vocab, label_smoothing=eps, inplace=inplace)
    loss.backward()
    ref_loss, ref_grad, ref_stats = reference(z, t, m, 0, kind, 1.5, 0.5, alpha_mode, vocab, eps)
    fwd_tol, grad_tol = TOL[dtype]
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < fwd_tol
    for key in ("ce", "entropy", "alpha"):
        assert rel_err(stats[key], ref_stats[key]) < fwd_tol, key
    assert leaf.grad.dtype == dtype
    assert rel_err(leaf.grad, ref_grad) < grad_tol
    if vocab is not None:
        assert torch.all(leaf.grad[..., vocab:] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["extreme", "peaked"])
def test_extreme_and_peaked_logits_are_finite_and_exact(dtype, style):
    z, t, m = make_data(2, 1, 64, None, dtype, style)
    leaf = z[0].to(DEVICE).clone().requires_grad_()
    ce, entropy, p_target, nll = vocab_parallel_ce_and_entropy(leaf, t[0].to(DEVICE))
    loss, _ = weighted_lm_loss(leaf, t[0].to(DEVICE), m[0].to(DEVICE), kind="mile")
    loss.backward()
    ref_ce, ref_entropy, ref_p, _ = ref_terms(z[0].to(F64), t[0], 64, 0.0)
    _, ref_grad, _ = reference(z, t, m, 0, "mile")
    for value in (ce, entropy, p_target, nll, loss, leaf.grad):
        assert torch.isfinite(value).all()
    assert rel_err(ce, ref_ce) < 1e-6 and torch.equal(ce, nll)
    assert float((entropy.cpu() - ref_entropy).abs().max()) < 1e-5  # H is ~0 or ~log(#ties) here
    assert float((p_target.cpu() - ref_p).abs().max()) < 1e-6
    assert rel_err(leaf.grad, ref_grad) < TOL[dtype][1]


@pytest.mark.parametrize("kind", ["mile", "focal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gamma_zero_is_exactly_cross_entropy(kind, dtype):
    z, t, m = make_data(3, 1, 64, 60, dtype)
    results = []
    for k, gamma in ((kind, 0.0), ("ce", 1.0)):
        leaf = z[0].to(DEVICE).clone().requires_grad_()
        loss, stats = weighted_lm_loss(leaf, t[0].to(DEVICE), m[0].to(DEVICE), kind=k, gamma=gamma, vocab_size=60)
        loss.backward()
        results.append((loss, leaf.grad, stats["alpha"]))
    (loss0, grad0, alpha0), (loss_ce, grad_ce, _) = results
    assert float(alpha0) == 1.0
    assert torch.equal(loss0, loss_ce) and torch.equal(grad0, grad_ce)
    ref_loss, ref_grad, _ = reference(z, t, m, 0, "ce", vocab=60)
    assert rel_err(loss_ce, ref_loss) < 2e-5 and rel_err(grad_ce, ref_grad) < TOL[dtype][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_reuses_the_logits_buffer_and_keeps_gradients(dtype):
    z, t, m = make_data(4, 1, 64, 50, dtype, shape=(5, 3))
    grads = {}
    for inplace in (False, True):
        leaf = z[0].clone().requires_grad_()
        logits = leaf.clone()
        before = logits.detach().clone()
        loss, _ = weighted_lm_loss(logits, t[0], m[0], label_smoothing=0.1, vocab_size=50, inplace=inplace)
        loss.backward()
        grads[inplace] = leaf.grad
        if inplace:  # the gradient lives in the logits' own storage: no second full-size buffer
            assert leaf.grad.data_ptr() == logits.data_ptr()
        else:
            assert torch.equal(logits.detach(), before)
    assert torch.equal(grads[True], grads[False])

    # a non-contiguous [s, b, v] view works too (it is copied once, and in-place work uses the copy)
    leaf = z[0].clone().transpose(0, 1).requires_grad_()
    loss, _ = weighted_lm_loss(leaf.clone(), t[0].T, m[0].T, label_smoothing=0.1, vocab_size=50, inplace=True)
    loss.backward()
    assert torch.equal(leaf.grad, grads[False].transpose(0, 1))


def test_statistics_have_no_gradient():
    """Only ce is differentiable: entropy, p_target and nll are constants, not silently zero-gradient nodes."""
    z, t, _ = make_data(5, 1, 64, None, torch.float32)
    leaf = z[0].to(DEVICE).clone().requires_grad_()
    terms = vocab_parallel_ce_and_entropy(leaf, t[0].to(DEVICE), label_smoothing=0.1)
    assert terms.ce.requires_grad and terms.ce.grad_fn is not None
    for name in ("entropy", "p_target", "nll"):
        value = getattr(terms, name)
        assert not value.requires_grad and value.grad_fn is None, name
        with pytest.raises(RuntimeError, match="does not require grad"):
            value.sum().backward()
    (terms.ce.sum() + terms.entropy.sum()).backward()  # the entropy term adds a constant, no gradient
    ref_leaf = z[0].to(F64).requires_grad_()
    ref_terms(ref_leaf, t[0], 64, 0.1)[0].sum().backward()
    assert rel_err(leaf.grad, ref_leaf.grad) < TOL[torch.float32][1]


# ---------------------------------------------------------------- host syncs


class _SyncInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.sum())


def test_gpu_chunks_hold_a_share_of_the_logits_but_not_fewer_elements_than_the_floor():
    """Rows per chunk on a GPU (shapes only: meta tensors take the GPU rule): a 1/64 share of bf16
    logits' rows, but never under MIN_GPU_CHUNK_ELEMENTS elements, nor over the rows there are."""
    floor = loss_module.MIN_GPU_CHUNK_ELEMENTS
    for rows, columns, dtype, expected in ((65536, 32000, torch.bfloat16, 1024),  # the share: rows / 64
                                           (8192, 4096, torch.bfloat16, floor // 4096),  # the floor: 1024 rows
                                           (8192, 4096, torch.float32, floor // 4096),
                                           (64, 4096, torch.bfloat16, 64)):  # all the rows there are
        z = torch.empty(rows, columns, dtype=dtype, device="meta")
        assert loss_module._chunk_rows(z, columns) == expected, (rows, columns, dtype)


def test_host_sync_guard_catches_planted_syncs():
    x = torch.randn(8, device=DEVICE)
    planted = {
        "item": lambda: x.sum().item(),
        "bool": lambda: bool(x.sum() > 0),
        "float": lambda: float(x.max()),
        "tolist": lambda: x.tolist(),
        "nonzero": lambda: x.nonzero(),
        "where_1arg": lambda: torch.where(x > 0),
        "mask_index": lambda: x[x > 0],
        "unique": lambda: torch.unique(x),
        "backward": lambda: _SyncInBackward.apply(x.clone().requires_grad_()).sum().backward(),
        "range_check": lambda: vocab_parallel_ce_and_entropy(torch.randn(2, 4, device=DEVICE),
                                                             torch.zeros(2, dtype=torch.long, device=DEVICE),
                                                             check_target_range=True),
    }
    for name, call in planted.items():
        with pytest.raises(HostSync), no_host_sync():
            call()
        call()  # and each runs fine outside the guard


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_host_sync_in_forward_and_backward(dtype, monkeypatch):
    """With the range check off (the GPU default) nothing waits for the device, as in megatron-core's CE."""
    monkeypatch.setattr(loss_module, "MIN_GPU_CHUNK_ELEMENTS", 1)  # so that a GPU chunks these 66 rows too
    z, t, m = make_data(6, 1, 64, 57, dtype, shape=(33, 2))
    for kind, alpha_mode, eps, inplace in (("mile", "global", 0.1, True), ("focal", "legacy", 0.0, False),
                                           ("ce", "global", 0.0, True)):
        leaf = z[0].to(DEVICE).clone().requires_grad_()
        with no_host_sync():
            loss, stats = weighted_lm_loss(leaf.clone() if inplace else leaf, t[0].to(DEVICE), m[0].to(DEVICE),
                                           kind=kind, alpha_mode=alpha_mode, vocab_size=57, label_smoothing=eps,
                                           inplace=inplace, check_target_range=False)
            loss.backward()
        ref_loss, ref_grad, ref_stats = reference(z, t, m, 0, kind, alpha_mode=alpha_mode, vocab=57, eps=eps)
        assert rel_err(loss, ref_loss) < TOL[dtype][0] and rel_err(stats["ce"], ref_stats["ce"]) < TOL[dtype][0]
        assert rel_err(leaf.grad, ref_grad) < TOL[dtype][1]


def test_bad_inputs_raise_value_error_naming_the_argument():
    z = torch.randn(2, 3, 8)
    t = torch.randint(0, 8, (2, 3))
    m = torch.ones(2, 3)
    bad = [
        ("target", lambda: vocab_parallel_ce_and_entropy(z, torch.full((2, 3), 8))),
        ("target", lambda: vocab_parallel_ce_and_entropy(z, torch.full((2, 3), -1))),
        ("target", lambda: vocab_parallel_ce_and_entropy(z, torch.full((2, 3), 6), vocab_size=6)),
        ("target", lambda: vocab_parallel_ce_and_entropy(z, t[:, :2])),
        ("target", lambda: vocab_parallel_ce_and_entropy(z, t.float())),
        ("logits", lambda: vocab_parallel_ce_and_entropy(t, t)),
        ("vocab_size", lambda: vocab_parallel_ce_and_entropy(z, t, vocab_size=9)),
        ("label_smoothing", lambda: vocab_parallel_ce_and_entropy(z, t, label_smoothing=1.0)),
        ("loss_mask", lambda: weighted_lm_loss(z, t, m[:, :2])),
        ("kind", lambda: weighted_lm_loss(z, t, m, kind="mle")),
        ("gamma", lambda: weighted_lm_loss(z, t, m, gamma=-0.5)),
        ("sigma", lambda: weighted_lm_loss(z, t, m, sigma=-1.0)),
        ("alpha_mode", lambda: weighted_lm_loss(z, t, m, alpha_mode="local")),
    ]
    for name, call in bad:
        with pytest.raises(ValueError, match=rf"\b{name}\b"):
            call()


# ---------------------------------------------------------------- peak memory (fresh process)


def _peak_extra_rank(rank: int, world_size: int) -> dict[str, float]:
    """Peak resident memory above the logits during forward+backward, in units of the logits' bytes.

    The process starts with MALLOC_MMAP_THRESHOLD_ set, so every large buffer is its own mmap and
    is returned to the OS on free; /proc/self/clear_refs=5 resets the high-water mark (VmHWM).
    The logits come out of an autograd node that drops its gradient, as the output layer would
    consume it, so the gradient buffer counts while it lives.
    """
    import torch.nn.functional as F

    # The loss benchmark's own harness, so the test also checks what the benchmark measures.
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from loss_bench import LogitsHarness, peak_extra_rss

    cases = {
        "inplace": lambda x, t, m: weighted_lm_loss(x, t, m, inplace=True)[0],
        "out_of_place": lambda x, t, m: weighted_lm_loss(x, t, m)[0],
        "torch_cross_entropy": lambda x, t, m: F.cross_entropy(x, t),  # sanity: the method sees buffers
    }
    extra = {}
    # fp32 at a CPU-cache-bound chunk; bf16 where the chunk is bound by its share of the logits
    # (rows / 64), the bound that decides a GPU's chunk.
    for dtype, rows, columns in ((torch.float32, 1024, 16000), (torch.bfloat16, 256, 32000)):
        harness = LogitsHarness(rows, columns, tp=1, rank=0, device="cpu", dtype=dtype)
        for name, fn in cases.items():
            extra[f"{name}_{str(dtype)[6:]}"] = peak_extra_rss(harness, fn)
    return extra


def test_peak_extra_memory_inplace_and_out_of_place(monkeypatch):
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pytest.skip("needs /proc/self/clear_refs to reset the peak RSS")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    (extra,) = run_ranks(_peak_extra_rank, 1)
    for dtype in ("float32", "bfloat16"):
        assert extra[f"torch_cross_entropy_{dtype}"] > 1.9, extra  # the measurement does see full-size buffers
        assert extra[f"inplace_{dtype}"] <= 0.1, extra
        assert extra[f"out_of_place_{dtype}"] <= 1.1, extra


# ---------------------------------------------------------------- TP / DP groups (spawned gloo ranks)

# (name, dtype, kind, inplace, columns (global, padded), vocab, label_smoothing, alpha_mode, style)
PARALLEL_CASES = [
    ("mile_fp32", torch.float32, "mile", False, 64, None, 0.0, "global", "normal"),
    ("mile_fp32_inplace_pad_ls", torch.float32, "mile", True, 64, 45, 0.1, "global", "normal"),
    ("mile_bf16_pad", torch.bfloat16, "mile", False, 64, 45, 0.0, "global", "normal"),
    ("mile_bf16_inplace_ls", torch.bfloat16, "mile", True, 64, None, 0.2, "global", "normal"),
    ("focal_fp32_legacy", torch.float32, "focal", True, 64, None, 0.0, "legacy", "normal"),
    ("mile_fp32_legacy_pad", torch.float32, "mile", False, 64, 50, 0.0, "legacy", "normal"),
    ("ce_fp32_ls", torch.float32, "ce", True, 64, None, 0.1, "global", "normal"),
    ("mile_fp32_extreme", torch.float32, "mile", True, 64, None, 0.0, "global", "extreme"),
    ("mile_fp32_peaked_ls", torch.float32, "mile", False, 64, 60, 0.1, "global", "peaked"),
    ("mile_bf16_peaked", torch.bfloat16, "mile", True, 64, None, 0.0, "global", "peaked"),
]


def _parallel_rank(rank: int, world_size: int, tp: int) -> dict[str, dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp)
    tp_rank, dp_rank, dp = ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank(), world_size // tp
    calls: list[tuple[str, str]] = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        which = {id(ps.get_tensor_model_parallel_group()): "tp", id(ps.get_data_parallel_group()): "dp"}
        calls.append((which.get(id(group), "other"), str(op).rsplit(".", 1)[-1]))
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting_all_reduce
    results = {}
    for seed, (name, dtype, kind, inplace, columns, vocab, eps, alpha_mode, style) in enumerate(PARALLEL_CASES):
        z, t, m = make_data(100 + seed, dp, columns, vocab, dtype, style)
        part = columns // tp
        shard = z[dp_rank][..., tp_rank * part:(tp_rank + 1) * part]
        leaf = shard.clone().requires_grad_()
        calls.clear()
        ce, entropy, p_target, nll = vocab_parallel_ce_and_entropy(leaf.clone() if inplace else leaf, t[dp_rank],
                                                              vocab_size=vocab, label_smoothing=eps, inplace=inplace)
        ce_calls = list(calls)
        calls.clear()
        loss, stats = weighted_lm_loss(leaf.clone() if inplace else leaf, t[dp_rank], m[dp_rank], kind=kind,
                                       gamma=1.0, sigma=1.0, alpha_mode=alpha_mode, vocab_size=vocab,
                                       label_smoothing=eps, inplace=inplace)
        loss_calls = list(calls)
        loss.backward()
        ref_loss, ref_grad, ref_stats = reference(z, t, m, dp_rank, kind, 1.0, 1.0, alpha_mode, vocab, eps)
        ref_ce, ref_entropy, ref_p, ref_nll = ref_terms(z[dp_rank].to(F64), t[dp_rank], vocab or columns, eps)
        values = (ce, entropy, p_target, nll, loss, leaf.grad)
        results[name] = {
            "finite": all(bool(torch.isfinite(v).all()) for v in values),
            "ce": max(rel_err(ce, ref_ce), rel_err(nll, ref_nll)),
            "entropy_abs": float((entropy - ref_entropy).abs().max()),
            "p_target_abs": float((p_target - ref_p).abs().max()),
            "loss": rel_err(loss, ref_loss),
            "stats": max(rel_err(stats[k], ref_stats[k]) for k in ("ce", "entropy", "alpha")),
            "grad": rel_err(leaf.grad, ref_grad[..., tp_rank * part:(tp_rank + 1) * part]),
            "grad_dtype_ok": leaf.grad.dtype == dtype,
            "ce_calls": ce_calls,
            "loss_calls": loss_calls,
        }
    dist.all_reduce = real_all_reduce
    ps.destroy_model_parallel()
    return results


def _check_parallel(results: list[dict[str, dict]], dp: int) -> None:
    for rank, per_case in enumerate(results):
        for name, dtype, kind, *_ in PARALLEL_CASES:
            r = per_case[name]
            where = f"rank {rank}, case {name}: {r}"
            fwd_tol, grad_tol = TOL[dtype]
            assert r["finite"], where
            assert r["ce"] < 1e-5 and r["entropy_abs"] < 1e-4 and r["p_target_abs"] < 1e-5, where
            assert r["loss"] < fwd_tol and r["stats"] < fwd_tol, where
            assert r["grad"] < grad_tol and r["grad_dtype_ok"], where
            # two TP all-reduces, MAX then one SUM; one DP all-reduce for alpha when there is a DP group
            assert r["ce_calls"] == [("tp", "MAX"), ("tp", "SUM")], where
            dp_calls = [("dp", "SUM")] if dp > 1 and kind != "ce" else []
            assert r["loss_calls"] == [("tp", "MAX"), ("tp", "SUM")] + dp_calls, where


def test_tensor_parallel_4():
    _check_parallel(run_ranks(_parallel_rank, 4, 4), dp=1)


def test_tensor_parallel_2_data_parallel_2():
    _check_parallel(run_ranks(_parallel_rank, 4, 2), dp=2)
