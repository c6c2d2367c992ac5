"""megatron-core's GPTModel, schedules, DDP and optimizer on CPU through the runtime layer.

The same seed gives the same logical model at every layout (layout-invariant init), so
forward outputs and gradients at TP=2, PP=2 and TP=2×PP=2 must match TP=1, and a DP=2
step must match a DP=1 step over the same global batch.
"""

import numpy as np
import pytest

from dist_utils import run_ranks
from training_utils import optim_settings

VOCAB, SEQ, MBS = 500, 16, 2


def _batch(index: int):
    import torch

    g = torch.Generator().manual_seed(100 + index)
    tokens = torch.randint(0, VOCAB, (MBS, SEQ), generator=g)
    return tokens, torch.randint(0, VOCAB, (MBS, SEQ), generator=g)


def _run_layout(rank: int, world: int, tp: int, pp: int, num_microbatches: int, step: bool,
                distributed_optimizer: bool = True):
    """Forward+backward of 2 micro-batches through the schedules; returns the losses and
    the grad of the final norm (or, with `step`, the parameters after one clipped step),
    and the sizes of megatron-core's groups with the rank's count of gloo event-loop threads."""
    import os

    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from torch.distributed import distributed_c10d

    from megatron_mile import model as mm
    from megatron_mile import optim, runtime

    rt = runtime.initialize(tp, pp, seed=7)
    cfg = mm.build_transformer_config(mm.PRESETS["tiny"], tp=tp, pp=pp)
    chunks = mm.build_model_chunks(cfg, VOCAB, SEQ, seed=7, device=rt.device)
    settings = optim_settings("--lr", "1e-2", "--clip-grad", "0.05", "--lr-warmup-iters", "0",
                              *([] if distributed_optimizer else ["--no-distributed-optimizer"]))
    model = optim.wrap_data_parallel(cfg, chunks, settings)
    optimizer = optim.build_optimizer(model, settings, bf16=False)
    optim.build_scheduler(optimizer, settings, train_iters=10)  # as the trainer: sets lr, and wd 0 on norms
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = [_batch(dp_rank * num_microbatches + i) for i in range(num_microbatches)]
    positions = torch.arange(SEQ).unsqueeze(0).expand(MBS, -1)

    def forward_step(data_iterator, m):
        tokens, labels = next(data_iterator)
        logits = m(tokens, positions, None)

        def loss_func(output):
            # Plain vocab-parallel CE: this test is about the runtime, not the loss module.
            loss = tensor_parallel.vocab_parallel_cross_entropy(output.float().transpose(0, 1).contiguous(),
                                                                 labels.t().contiguous()).mean()
            return loss, {"loss": loss.detach()}

        return logits, loss_func

    for m in model:
        m.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches), model=model,
                                      num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=MBS)
    losses = [float(o["loss"]) for o in out]
    result = {"losses": losses, "last_stage": parallel_state.is_pipeline_last_stage(), "tp_rank": rt.rank % tp,
              "group_sizes": [g.size() for g in distributed_c10d._world.pg_map if g is not dist.group.WORLD],
              "gloo_loop_threads": [open(f"/proc/self/task/{t}/comm").read().strip()
                                    for t in os.listdir("/proc/self/task")].count("gloo_tcp_loop")}
    if step:
        if world == 1:  # the norm from its definition, over every gradient the optimizer sees
            grads = [p.main_grad.double() for m in model for p in m.module.parameters()]
            result["grad_norm_f64"] = float(torch.sqrt(sum((g * g).sum() for g in grads)))
            result["final_norm_grad"] = model[-1].module.decoder.final_layernorm.weight.main_grad.double().numpy()
        ok, grad_norm, _ = optimizer.step()
        assert ok
        result["grad_norm"] = float(grad_norm)
        if parallel_state.is_pipeline_last_stage():
            result["final_norm"] = chunks[-1].decoder.final_layernorm.weight.detach().numpy().copy()
    elif parallel_state.is_pipeline_last_stage():
        result["final_norm_grad"] = model[-1].module.decoder.final_layernorm.weight.main_grad.numpy().copy()
    return result


@pytest.fixture(scope="module")
def reference():
    return run_ranks(_run_layout, 1, 1, 1, 2, False)[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)])
def test_model_parallel_forward_backward_matches_single_rank(reference, tp, pp):
    results = run_ranks(_run_layout, tp * pp, tp, pp, 2, False)
    last = [r for r in results if r["last_stage"]]
    assert len(last) == tp
    for r in last:
        np.testing.assert_allclose(r["losses"], reference["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["final_norm_grad"], reference["final_norm_grad"], rtol=1e-4, atol=1e-7)
    assert reference["losses"][0] > 0
    for r in [reference, *results]:
        _check_gloo_loop_threads(r)


def _check_gloo_loop_threads(result: dict) -> None:
    """Runtime item 8: megatron-core's single-member groups share one event-loop thread; a group
    with peers has its own. run_ranks built the default group, with its own thread, beforehand.
    An upper bound: the count is one reading of /proc, which once (on a loaded machine) listed one
    thread fewer; without item 8 it is one per group, above the bound."""
    sizes = result["group_sizes"]
    assert len(sizes) > 15 and 1 in sizes
    assert 1 <= result["gloo_loop_threads"] <= 1 + sum(size > 1 for size in sizes) + 1


@pytest.mark.parametrize("distributed_optimizer", [True, False], ids=["distributed", "regular"])
def test_data_parallel_step_with_clipping_matches_single_rank(distributed_optimizer):
    single = run_ranks(_run_layout, 1, 1, 1, 2, True, False)[0]
    dp2 = run_ranks(_run_layout, 2, 1, 1, 1, True, distributed_optimizer)
    # The grad norm exceeds clip_grad, so the update was really clipped.
    assert single["grad_norm"] > 0.05
    assert single["grad_norm"] == pytest.approx(single["grad_norm_f64"], rel=1e-6)
    # The first AdamW step from its formula, on the final norm's weight (1 at init; norms get no weight
    # decay, and the cosine schedule without warm-up starts at the peak lr):
    # the clipped gradient g, m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected: w = 1 - lr g / (|g| + eps).
    g = single["final_norm_grad"] * 0.05 / (single["grad_norm_f64"] + 1e-6)
    np.testing.assert_allclose(single["final_norm"], 1 - 1e-2 * g / (np.abs(g) + 1e-8), rtol=1e-6, atol=1e-7)
    for r in dp2:
        np.testing.assert_allclose(r["grad_norm"], single["grad_norm"], rtol=1e-5)
        np.testing.assert_allclose(r["final_norm"], single["final_norm"], rtol=1e-5, atol=1e-7)
    assert not np.allclose(single["final_norm"], 1.0)


def test_cpu_compat_is_explicit():
    """Importing the package patches nothing; enable_cpu_compat() does, once, and only without CUDA."""
    import subprocess
    import sys

    probe = (
        "import torch, megatron_mile.runtime as rt, megatron_mile.training\n"
        "from megatron.core.transformer import utils\n"
        "from megatron.core.pipeline_parallel import schedules\n"
        "before = utils.get_default_causal_mask\n"
        "try:\n"
        "    torch.cuda.current_device(); print('cuda-ok')\n"
        "except (AssertionError, RuntimeError):\n"
        "    print('unpatched', schedules.torch is torch)\n"
        "print(rt.enable_cpu_compat(), rt.enable_cpu_compat())\n"
        "print(torch.cuda.current_device(), utils.get_default_causal_mask is not before)\n"
        "print(utils.get_default_causal_mask(3).tolist())\n"
        # The schedules' torch: factories asked for CUDA create on the CPU, the rest is torch's.
        "print(schedules.torch.zeros([], dtype=torch.int, device='cuda').device, schedules.torch.nn is torch.nn)\n"
        # Outside the patched helpers, nothing is redirected.
        "try:\n"
        "    torch.zeros(1, device='cuda'); print('redirected')\n"
        "except (AssertionError, RuntimeError):\n"
        "    print('cuda refused')\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, check=True)
    lines = out.stdout.split("\n")
    assert lines[0] == "unpatched True"
    assert lines[1] == "True True"
    assert lines[2] == "cpu True"
    assert lines[3] == "[[False, True, True], [False, False, True], [False, False, False]]"
    assert lines[4] == "cpu True"
    assert lines[5] == "cuda refused"


@pytest.mark.parametrize("preset,expected", [("468M", 468e6), ("1.2B", 1.2e9), ("6.7B", 6.7e9)])
def test_presets_have_the_papers_sizes(preset, expected):
    from megatron_mile import model as mm

    # The paper's LLaMA vocabulary; 1% covers its rounding of the names.
    assert mm.count_parameters(mm.PRESETS[preset], 32000) == pytest.approx(expected, rel=0.01)
    assert mm.padded_vocab_size(32000, 4) % 512 == 0 and mm.padded_vocab_size(32000, 1) == 32000
