"""Vocab-parallel cross-entropy and entropy, and the MiLe / focal / CE language-model losses.

Each tensor-parallel (TP) rank holds a vocabulary shard ``z[..., V/tp]`` of the logits in
megatron-core's layout (rank r owns global columns ``[r*V/tp, (r+1)*V/tp)``). With ``m`` the
row maximum over all real columns, ``e_v = exp(z_v - m)``, ``S = sum_v e_v``, ``log Z = m + log S``:

    nll      = log S - (z_t - m)                       = -log softmax(z)[t]
    p_target = exp(-nll)
    entropy  = -sum_v p_v log p_v = log S - sum_v e_v (z_v - m) / S

The entropy form needs no log of a probability, so it is exact and finite when most ``p_v``
underflow (the original MiLe code clamped ``p`` at 1e-8 instead, which biases H upwards).

Label smoothing ``eps`` uses the target distribution ``(1 - eps) * onehot(t) + eps / V`` over the
``V`` real columns (torch's ``F.cross_entropy(label_smoothing=eps)`` convention):

    ce = (1 - eps) * nll + eps * (log S - sum_v (z_v - m) / V)          (ce = nll for eps = 0)

``sum_v (z_v - m)`` is reduced over the whole vocabulary, so smoothing is correct for TP > 1.
``ce`` is the training target; ``nll`` (the log-perplexity term), ``entropy`` and ``p_target`` are
statistics. Only ``ce`` has a gradient, ``grad_ce * (p_v - q_v)`` w.r.t. the real logits (padded
columns get zero); the other three come back with ``requires_grad=False``: they are constants
in whatever is built on them, as after ``detach()``, and never carry a silently dropped gradient.

TP communication, per call, is two all-reduces: a MAX of the per-rank row maxima ``m_r``,
then one SUM of the stacked rows ``[z_t, S_r, T_r (, sum (z - m))]`` after rescaling each
rank's statistics from ``m_r`` to ``m``: ``S_r <- S_r exp(m_r - m)`` and
``T_r <- exp(m_r - m) (T_r + (m_r - m) S_r)`` where ``T_r = sum e (z - m_r)``.

Memory: the rows are processed in chunks, so the work buffers stay small (and, on CPU, in cache)
and no second full-size fp32 buffer is needed. Each fp32 work buffer holds at most 1/32 of the
logits' bytes (``rows / 32`` rows for fp32 logits, ``rows / 64`` for 16-bit ones) and at most two
are live, so the extra memory of ``inplace=True`` stays near 1/16 of the logits whatever their
dtype. For fp32 logits the forward writes ``exp(z - m_r)`` into the buffer that becomes the
gradient (the logits themselves when ``inplace=True``, a new buffer otherwise), so the backward
is a single multiply. For 16-bit logits, storing exp at 16 bits would cost gradient precision,
so the backward recomputes it in fp32 chunks from the (untouched) logits.

Host syncs: none with ``check_target_range=False``, like megatron-core's CE. The target column
is gathered and its gradient added with one ``scatter_add_`` over all rows (rows whose target
lies on another TP rank add 0), so no ``nonzero`` or boolean indexing waits for the device. The
target-range check reads a flag back from the device, so it is on by default on CPU only.

The weighted loss, with ``w`` detached:

    mile:  w_i = (sigma + entropy_i) ** gamma
    focal: w_i = (1 - p_target_i) ** gamma, with p_target_i = 1 (so w_i = 0 for gamma > 0) where mask_i = 0
    ce:    w_i = 1
    loss   = sum_i mask_i * alpha * w_i * ce_i / sum_i mask_i

``alpha_mode="global"``: ``alpha = sum mask / sum mask * w`` over the data-parallel group (one
all-reduce), so the weights average to 1 over the tokens that count. ``alpha_mode="legacy"``
reproduces the original trainer: each rank takes ``1 / mean(w)`` over every position (ignored
ones too), ``alpha`` is the mean of that over DP ranks, and the loss is the mean of
``alpha * w * mask * ce`` over every position. The original computes CE = 0 at an ignored
position, hence p_target = 1 and a focal weight of 0 there, which is why the focal ``w`` above
takes p_target = 1 where the mask is 0 (it matters only for ``legacy``, where ignored positions
enter ``mean(w)``; MiLe's entropy does not depend on the target). ``gamma = 0`` makes
``w = alpha = 1`` exactly, which is the CE loss and gradient bit for bit.

Without ``parallel_state.initialize_model_parallel`` both functions run as a single rank
(TP = DP = 1), which is convenient for tests and tools.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.utils import VocabUtility

__all__ = ["CHUNK_ELEMENTS", "TokenLosses", "vocab_parallel_ce_and_entropy", "weighted_lm_loss"]

# Elements per row chunk on CPU (1 MiB of fp32): small enough to stay in cache, large enough that
# the per-chunk Python overhead is negligible next to the exp.
CHUNK_ELEMENTS = 1 << 18
# Elements per row chunk on a GPU at least (16 MiB of fp32): below that a chunk's kernels are too
# short to hide their launches, and a small vocabulary would cost hundreds of launches per step.
MIN_GPU_CHUNK_ELEMENTS = 1 << 22

_KINDS = ("ce", "focal", "mile")
_ALPHA_MODES = ("global", "legacy")


class TokenLosses(NamedTuple):
    """Per-token fp32 terms shaped like the target; only ``ce`` has a gradient."""

    ce: torch.Tensor  # the training cross-entropy (label-smoothed when eps > 0)
    entropy: torch.Tensor  # of the predicted distribution over the real vocabulary
    p_target: torch.Tensor  # exp(-nll)
    nll: torch.Tensor  # -log p(target): the log-perplexity term, whatever the smoothing


def _tensor_parallel() -> tuple[dist.ProcessGroup | None, int, int]:
    if not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _data_parallel() -> tuple[dist.ProcessGroup | None, int]:
    if not parallel_state.model_parallel_is_initialized():
        return None, 1
    return parallel_state.get_data_parallel_group(), parallel_state.get_data_parallel_world_size()


def _chunk_rows(z: torch.Tensor, columns: int) -> int:
    """Rows per chunk: each fp32 work buffer is at most 1/32 of the logits' bytes (rows/32 for fp32
    logits, rows/64 for 16-bit ones), so the two live at once stay <= 1/16 of the logits.

    On CPU also at most ``CHUNK_ELEMENTS``, to stay in cache. On a GPU at least
    ``MIN_GPU_CHUNK_ELEMENTS`` (where the logits are that small, the buffers are small anyway):
    there more chunks only add launches.
    """
    rows = z.shape[0]
    columns = max(columns, 1)
    share = rows * z.element_size() // (4 * 32)
    if z.device.type == "cpu":
        return max(1, min(CHUNK_ELEMENTS // columns, share))
    return min(rows, max(1, share, MIN_GPU_CHUNK_ELEMENTS // columns))


def _local_stats(z: torch.Tensor, real: int, with_shift_sum: bool,
                 exp_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row local max ``m_r`` and ``[S_r, T_r (, sum (z - m_r))]`` over the first ``real`` columns.

    ``exp_out`` (fp32, shaped like ``z``) receives ``exp(z - m_r)`` when given; it may be ``z``
    itself, because each chunk's shifted copy is taken before its exp overwrites it.
    """
    rows = z.shape[0]
    m_loc = torch.empty(rows, dtype=torch.float32, device=z.device)
    sums = torch.zeros(3 if with_shift_sum else 2, rows, dtype=torch.float32, device=z.device)
    step = _chunk_rows(z, real)
    shifted = torch.empty(min(step, rows), real, dtype=torch.float32, device=z.device)
    exps = torch.empty_like(shifted) if exp_out is None else None
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        zc = z[r0:r1, :real]
        m_loc[r0:r1] = zc.amax(dim=-1)
        s = torch.sub(zc, m_loc[r0:r1, None], out=shifted[: r1 - r0])
        if with_shift_sum:
            torch.sum(s, dim=-1, out=sums[2, r0:r1])
        e = exps[: r1 - r0] if exp_out is None else exp_out[r0:r1, :real]
        torch.exp(s, out=e)
        torch.sum(e, dim=-1, out=sums[0, r0:r1])
        torch.sum(s.mul_(e), dim=-1, out=sums[1, r0:r1])  # in place: no third chunk-sized buffer
    return m_loc, sums


class _VocabParallelCEAndEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_size: int,
                label_smoothing: float, inplace: bool):
        group, rank, tp = _tensor_parallel()
        part = logits.shape[-1]
        start, _ = VocabUtility.vocab_range_from_per_partition_vocab_size(part, rank, tp)
        real = min(max(vocab_size - start, 0), part)  # unpadded columns on this rank
        logits = logits.contiguous()  # a non-contiguous input is copied once; in-place work uses the copy
        z = logits.view(-1, part)
        rows = z.shape[0]
        col = target.reshape(-1) - start
        owned = (col >= 0) & (col < real)
        col = torch.where(owned, col, 0)[:, None]
        # Gather the target logit before an in-place exp can overwrite it.
        target_logit = torch.where(owned, z.gather(1, col).squeeze(1).float(), 0.0)

        store_exp = ctx.needs_input_grad[0] and logits.dtype == torch.float32 and real > 0
        exp_out = (z if inplace else torch.empty_like(z)) if store_exp else None
        if real > 0:
            m_loc, sums = _local_stats(z, real, label_smoothing > 0, exp_out)
        else:  # every column of this shard is padding
            m_loc = torch.full((rows,), float("-inf"), device=z.device)
            sums = torch.zeros(3 if label_smoothing > 0 else 2, rows, device=z.device)

        m = m_loc.clone()
        if tp > 1:
            dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
            if real > 0:
                shift = m_loc - m
                scale = shift.exp()
                sums[1] = scale * (sums[1] + shift * sums[0])
                sums[0] *= scale
                if label_smoothing > 0:
                    sums[2] += real * shift
            stacked = torch.cat([target_logit[None], sums])
            dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
            target_logit, sums = stacked[0], stacked[1:]

        sum_exp = sums[0]
        log_s = sum_exp.log()
        nll = log_s - (target_logit - m)
        entropy = (log_s - sums[1] / sum_exp).clamp_min_(0.0)
        p_target = torch.exp(-nll)
        if label_smoothing > 0:
            ce = (1.0 - label_smoothing) * nll + label_smoothing * (log_s - sums[2] / vocab_size)
        else:
            ce = nll.clone()  # a separate output from nll, which has no gradient

        # exp(z - m_r) * coef = softmax(z)
        coef = (m_loc - m).exp() / sum_exp if real > 0 else torch.zeros_like(sum_exp)
        # Save the logits tensor itself, not its reshaped view, when it holds the exp (in place).
        ctx.save_for_backward(exp_out if store_exp and not inplace else logits, m_loc, coef, col, owned)
        ctx.meta = (logits.shape, real, store_exp, inplace, label_smoothing, vocab_size)
        # Marked in the shape they are returned in: marking the flat tensors would leave the
        # returned views differentiable.
        outputs = tuple(x.view(target.shape) for x in (ce, entropy, p_target, nll))
        ctx.mark_non_differentiable(*outputs[1:])
        return outputs

    @staticmethod
    def backward(ctx, grad_ce: torch.Tensor, *_grad_statistics):
        saved, m_loc, coef, col, owned = ctx.saved_tensors
        shape, real, store_exp, inplace, eps, vocab_size = ctx.meta
        part = shape[-1]
        g = grad_ce.reshape(-1).float()
        scale = g * coef
        uniform = (eps / vocab_size) * g
        # -q_t at the target column (q_t = 1 - eps, plus eps/V from the uniform part); rows whose
        # target lies on another rank add 0 to column 0, so one scatter covers every row.
        on_target = torch.where(owned, (eps - 1.0) * g, 0.0)[:, None]

        if store_exp:  # saved holds exp(z - m_r): the gradient is one multiply away
            grad = saved.view(-1, part)
            e = grad[:, :real]
            e.mul_(scale[:, None])
            if eps > 0:
                e.sub_(uniform[:, None])
            e.scatter_add_(1, col, on_target)
        else:  # 16-bit logits (or an all-padding shard): recompute exp in fp32 chunks, round once
            z = saved.view(-1, part)
            grad = z if inplace else torch.empty_like(z)
            rows = z.shape[0]
            step = _chunk_rows(z, real)
            work = torch.empty(min(step, rows), real, dtype=torch.float32, device=z.device)
            for r0 in range(0, rows if real > 0 else 0, step):
                r1 = min(r0 + step, rows)
                w = torch.sub(z[r0:r1, :real], m_loc[r0:r1, None], out=work[: r1 - r0])
                w.exp_().mul_(scale[r0:r1, None])
                if eps > 0:
                    w.sub_(uniform[r0:r1, None])
                w.scatter_add_(1, col[r0:r1], on_target[r0:r1])
                grad[r0:r1, :real].copy_(w)
        grad[:, real:].zero_()
        return grad.view(shape), None, None, None, None


def _check_ce_inputs(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None,
                     label_smoothing: float, tp: int, check_target_range: bool | None) -> int:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError("logits must be a floating-point tensor of shape [..., V/tp]")
    if not isinstance(target, torch.Tensor) or target.is_floating_point() or target.dtype == torch.bool:
        raise ValueError("target must be an integer tensor of global token ids")
    if target.shape != logits.shape[:-1]:
        raise ValueError(f"target shape {tuple(target.shape)} must equal logits.shape[:-1] "
                         f"{tuple(logits.shape[:-1])}")
    padded = logits.shape[-1] * tp
    if vocab_size is None:
        vocab_size = padded
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 0 < vocab_size <= padded:
        raise ValueError(f"vocab_size must be an int in [1, {padded}] (the padded vocabulary "
                         f"{logits.shape[-1]} x tp {tp}), got {vocab_size!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing!r}")
    if check_target_range is None:
        check_target_range = target.device.type == "cpu"
    # The one data-dependent check: it waits for the device, hence off by default on GPUs.
    if check_target_range and target.numel() and bool(((target < 0) | (target >= vocab_size)).any()):
        raise ValueError(f"target ids must lie in [0, {vocab_size}); got min {int(target.min())}, "
                         f"max {int(target.max())}")
    return vocab_size


def vocab_parallel_ce_and_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_size: int | None = None,
                                  label_smoothing: float = 0.0, inplace: bool = False,
                                  check_target_range: bool | None = None) -> TokenLosses:
    """Cross-entropy, entropy, target probability and NLL of vocab-sharded logits.

    Args:
        logits: ``[..., V/tp]``, this rank's vocabulary shard (any float dtype, finite values).
        target: ``[...]`` int64 global token ids in ``[0, vocab_size)``.
        vocab_size: true vocabulary size; global columns ``>= vocab_size`` are padding and are
            left out of the softmax, CE and entropy. ``None``: every column is a real token.
        label_smoothing: ``eps`` in ``[0, 1)``; ``ce`` becomes the smoothed cross-entropy (``nll``
            stays the plain one).
        inplace: the logits buffer may be overwritten (with exp in the forward for fp32, with
            the gradient in the backward); use it when nothing else reads the logits afterwards.
            Values and gradients are identical to ``inplace=False``.
        check_target_range: raise ``ValueError`` for ids outside ``[0, vocab_size)``. This waits
            for the device, so ``None`` (the default) checks on CPU only; on a GPU pass ``True``
            to debug, since out-of-range ids otherwise give wrong values, as in megatron-core.

    Returns ``TokenLosses(ce, entropy, p_target, nll)``, fp32 tensors shaped like ``target``. Only
    ``ce`` is differentiable (w.r.t. ``logits``); the others have ``requires_grad=False``.
    Uses megatron-core's tensor-parallel group.
    """
    _, _, tp = _tensor_parallel()
    vocab_size = _check_ce_inputs(logits, target, vocab_size, label_smoothing, tp, check_target_range)
    return TokenLosses(*_VocabParallelCEAndEntropy.apply(logits, target, vocab_size, float(label_smoothing),
                                                          bool(inplace)))


def weighted_lm_loss(logits: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor, kind: str = "mile",
                     gamma: float = 1.0, sigma: float = 1.0, alpha_mode: str = "global",
                     vocab_size: int | None = None, label_smoothing: float = 0.0, inplace: bool = False,
                     check_target_range: bool | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Scalar MiLe / focal / CE loss of vocab-sharded logits and detached statistics.

    ``loss = sum mask * alpha * w * ce / sum mask`` (see the module docstring for ``w`` and the
    two ``alpha_mode`` values). ``stats`` holds this rank's masked means ``ce`` (the plain NLL, the
    log-perplexity term, also under label smoothing), ``entropy`` and ``weight``, plus ``alpha``
    and ``tokens`` (``sum mask``). Non-CE kinds make one all-reduce over the data-parallel group.
    ``check_target_range`` as in ``vocab_parallel_ce_and_entropy``; nothing else syncs with the host.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
    if alpha_mode not in _ALPHA_MODES:
        raise ValueError(f"alpha_mode must be one of {_ALPHA_MODES}, got {alpha_mode!r}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    if kind == "mile" and not sigma >= 0:
        raise ValueError(f"sigma must be >= 0 so that (sigma + entropy) ** gamma is real, got {sigma!r}")
    if not isinstance(loss_mask, torch.Tensor) or loss_mask.shape != target.shape:
        raise ValueError(f"loss_mask must be a tensor shaped like target {tuple(target.shape)}, got "
                         f"{tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask)}")

    terms = vocab_parallel_ce_and_entropy(logits, target, vocab_size, label_smoothing, inplace, check_target_range)
    ce = terms.ce
    mask = loss_mask.to(torch.float32)
    if kind == "ce":
        w = torch.ones_like(ce)
    elif kind == "focal":
        # As in the original trainer, an ignored position counts as CE 0, i.e. p_target 1.
        w = (1.0 - torch.where(mask == 0, 1.0, terms.p_target)).pow(gamma)
    else:
        w = (sigma + terms.entropy).pow(gamma)
    tokens = mask.sum()

    group, dp = _data_parallel()
    one = torch.ones((), device=ce.device)
    if alpha_mode == "global":
        alpha = one
        if kind != "ce":
            totals = torch.stack([(mask * w).sum(), tokens])
            if dp > 1:
                dist.all_reduce(totals, group=group)
            alpha = torch.where(totals[0] > 0, totals[1] / totals[0], one)
        loss = (mask * alpha * w * ce).sum() / tokens.clamp_min(torch.finfo(torch.float32).tiny)
    else:
        alpha = one
        if kind != "ce":
            alpha = 1.0 / w.mean()
            if dp > 1:
                dist.all_reduce(alpha, group=group)
                alpha = alpha / dp
        loss = (mask * alpha * w * ce).mean()

    with torch.no_grad():
        denom = tokens.clamp_min(torch.finfo(torch.float32).tiny)
        stats = {"ce": (mask * terms.nll).sum() / denom, "entropy": (mask * terms.entropy).sum() / denom,
                 "weight": (mask * w).sum() / denom, "alpha": alpha.detach().clone(), "tokens": tokens}
    return loss, stats
