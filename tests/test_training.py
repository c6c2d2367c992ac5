"""End-to-end pretraining on CPU through the real entry point (torchrun, gloo, tiny model).

Same seed and data everywhere; layout-invariant init makes the parallel layouts comparable
step for step.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest

import data_fixtures
from megatron.core import dist_checkpointing
from training_utils import ITERS, REPO, losses, read_records, train, train_command, train_env


@pytest.fixture(scope="module")
def mile_tp1(demo, tmp_path_factory):
    save = str(tmp_path_factory.mktemp("tp1") / "run")
    records = train(demo, None, "run", 1, "--loss", "mile", "--eval-interval", str(ITERS), save=save)
    return {"train": records, "eval": read_records(save, "eval")}


def test_evaluation_reports_overall_and_per_domain_log_ppl(mile_tp1):
    (record,) = mile_tp1["eval"]
    assert record["iteration"] == ITERS
    domains = record["domains"]
    assert sorted(domains) == sorted(data_fixtures.DOMAINS)
    assert record["domain_avg"] == pytest.approx(np.mean(list(domains.values())))
    assert record["domain_worst"] == pytest.approx(max(domains.values()))
    # A model trained a few steps from uniform: log-ppl below log(V) but far from 0.
    assert 0.5 < record["eval_loss"] < np.log(300)


@pytest.mark.parametrize("name,nproc,layout", [
    ("tp2", 2, ["--tensor-model-parallel-size", "2"]),
    # Sequence-parallel norm grads are partial sums per TP rank; left un-reduced they move
    # the grad norm by ~1e-5 here, which the grad-norm check below catches.
    ("tp2_sp", 2, ["--tensor-model-parallel-size", "2", "--sequence-parallel"]),
    ("pp2", 2, ["--pipeline-model-parallel-size", "2"]),
    ("tp2pp2", 4, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]),
    ("pp2_interleaved", 2, ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]),
    ("recompute", 1, ["--recompute-activations"]),
])
def test_parallel_layouts_reproduce_single_rank_milelosses(demo, tmp_path, mile_tp1, name, nproc, layout):
    records = train(demo, tmp_path, name, nproc, "--loss", "mile", *layout)
    mile_tp1 = mile_tp1["train"]
    assert [r["iteration"] for r in records] == list(range(1, ITERS + 1))
    for key in ("loss", "ce", "entropy", "alpha"):
        np.testing.assert_allclose(losses(records, key), losses(mile_tp1, key), rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(losses(records, "grad_norm"), losses(mile_tp1, "grad_norm"), rtol=2e-6)
    # Training moved: the loss fell, and MiLe reported CE beside its own objective.
    assert losses(mile_tp1)[-1] < losses(mile_tp1)[0]
    assert all(0 < r["alpha"] < 1 and r["entropy"] > 0 for r in mile_tp1)


GQA = ["--loss", "mile", "--group-query-attention", "--num-query-groups", "2", "--rotary-base", "500000"]


@pytest.fixture(scope="module")
def gqa_tp2(demo, tmp_path_factory):
    """Grouped-query attention at TP=2: one key/value group (and two query heads) per rank."""
    save = str(tmp_path_factory.mktemp("gqa") / "tp2")
    records = train(demo, None, "tp2", 2, *GQA, "--tensor-model-parallel-size", "2", iters=3, save=save)
    return {"train": records, "save": save}


def test_grouped_query_attention_agrees_across_tensor_parallelism(demo, tmp_path, gqa_tp2):
    tp1 = train(demo, tmp_path, "gqa_tp1", 1, *GQA, iters=3)
    for key in ("loss", "ce", "entropy", "alpha"):
        np.testing.assert_allclose(losses(gqa_tp2["train"], key), losses(tp1, key), rtol=2e-5, err_msg=key)
    np.testing.assert_allclose(losses(gqa_tp2["train"], "grad_norm"), losses(tp1, "grad_norm"), rtol=2e-6)
    assert losses(tp1)[-1] < losses(tp1)[0]


def test_finetune_keeps_only_the_weights(demo, tmp_path, gqa_tp2):
    """--finetune from a TP=2 run at iteration 3 (Adam moments, a decayed schedule, consumed
    data), at TP=1 where its optimizer state could not even be read: iteration 1 on the first
    batch with a fresh schedule, and a first Adam step (zero moments, so m/sqrt(v) = g/|g|)
    that moves each weight by lr (the 0.1 weight decay on weights of ~0.01 adds ~0.1%), where
    a resumed Adam moves under 1% of them by that much. No architecture flag is repeated: it
    comes from the checkpoint."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from megatron_mile.checkpointing import holds_weights_only

    assert not holds_weights_only(gqa_tp2["save"])
    save = str(tmp_path / "ft")
    records = train(demo, tmp_path, "ft", 1, "--load", gqa_tp2["save"], "--finetune", "--lr-warmup-iters", "0",
                    "--exit-interval", "1", iters=2, save=save)
    assert [(r["iteration"], r["consumed_tokens"]) for r in records] == [(1, 4 * 32)]
    # Cosine over 2 iterations, half-way after the first: (lr + min_lr) / 2.
    assert records[0]["lr"] == pytest.approx((1e-3 + 3e-5) / 2)
    weights = {}
    for name, path in (("before", os.path.join(gqa_tp2["save"], "iter_0000003")),
                       ("after", os.path.join(save, "iter_0000001"))):
        dcp_to_torch_save(path, str(tmp_path / f"{name}.pt"))
        weights[name] = torch.load(str(tmp_path / f"{name}.pt"), weights_only=False)
    for key in ("decoder.layers.self_attention.linear_proj.weight", "decoder.layers.mlp.linear_fc2.weight"):
        step = (weights["after"][key] - weights["before"][key]).abs().numpy() / 1e-3
        assert np.mean(np.abs(step - 1) < 0.005) > 0.95, key


def test_focal_legacy_alpha_and_label_smoothing_agree_across_tensor_parallelism(demo, tmp_path):
    flags = ["--loss", "focal", "--mile-gamma", "2", "--mile-alpha-mode", "legacy", "--label-smoothing", "0.1"]
    tp1 = train(demo, tmp_path, "focal_tp1", 1, *flags, iters=3)
    tp2 = train(demo, tmp_path, "focal_tp2", 2, *flags, "--tensor-model-parallel-size", "2", iters=3)
    for key in ("loss", "ce", "alpha"):
        np.testing.assert_allclose(losses(tp2, key), losses(tp1, key), rtol=2e-5, err_msg=key)
    # Focal down-weights confident tokens, so alpha = 1/mean(w) exceeds 1.
    assert all(r["alpha"] > 1 for r in tp1)


def test_data_parallel_matches_gradient_accumulation_with_ce(demo, tmp_path):
    """DP=1 with 2 accumulated micro-batches and DP=2 with one each see the same global batch,
    with the distributed optimizer (the default: overlapped reduce-scatter into per-rank
    optimizer shards) and with megatron-core's regular one (all-reduce).
    (Under MiLe the per-micro-batch alpha differs between the two by design; see training.py.)"""
    dp1 = train(demo, tmp_path, "dp1", 1, "--loss", "ce")
    runs = {"dp2": train(demo, tmp_path, "dp2", 2, "--loss", "ce", "--use-distributed-optimizer"),
            "dp2_plain": train(demo, tmp_path, "dp2_plain", 2, "--loss", "ce", "--no-distributed-optimizer"),
            "dp2pp2": train(demo, tmp_path, "dp2pp2", 4, "--loss", "ce", "--pipeline-model-parallel-size", "2")}
    for name, records in runs.items():
        np.testing.assert_allclose(losses(records), losses(dp1), rtol=2e-5, err_msg=name)
        np.testing.assert_allclose(losses(records, "grad_norm"), losses(dp1, "grad_norm"), rtol=2e-5, err_msg=name)
    np.testing.assert_allclose(losses(dp1, "alpha"), 1.0)


def test_mile_with_gamma_zero_reproduces_ce(demo, tmp_path):
    ce = train(demo, tmp_path, "ce", 1, "--loss", "ce")
    mile0 = train(demo, tmp_path, "mile0", 1, "--loss", "mile", "--mile-gamma", "0")
    np.testing.assert_allclose(losses(mile0), losses(ce), rtol=1e-6)
    np.testing.assert_allclose(losses(mile0, "ce"), losses(ce, "ce"), rtol=1e-6)


@pytest.mark.parametrize("flags,also_at_dp1", [
    (["--tensor-model-parallel-size", "2"], False),
    # DP=2 (CE, so that DP=1 computes the same loss): the distributed optimizer's state is
    # split between the two ranks (dp_reshardable), and also reloads at DP=1.
    (["--loss", "ce"], True),
], ids=["tp2", "dp2"])
def test_resume_is_exact_and_appends_metrics(demo, tmp_path, flags, also_at_dp1):
    full = train(demo, tmp_path, "full", 2, *flags, iters=6)
    save = str(tmp_path / "halves")
    # Same schedule (--train-iters 6) in both halves; the first stops after 3.
    train(demo, tmp_path, "first", 2, *flags, "--exit-interval", "3", iters=6, save=save)
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "3"
    if also_at_dp1:
        dp1 = str(tmp_path / "dp1")
        shutil.copytree(save, dp1)
        at_dp1 = train(demo, tmp_path, "dp1", 1, *flags, "--load", dp1, iters=6, save=dp1)
        np.testing.assert_allclose(losses(at_dp1)[3:], losses(full)[3:], rtol=1e-5)
        # A fresh DP=1 run takes megatron-core's regular optimizer; resumed at DP=2 with the
        # defaults, it keeps that optimizer. The DP=1 resume above kept the distributed one.
        from_dp1 = str(tmp_path / "from_dp1")
        train(demo, tmp_path, "first_dp1", 1, *flags, "--exit-interval", "3", iters=6, save=from_dp1)
        at_dp2 = train(demo, tmp_path, "dp2_from_dp1", 2, *flags, "--load", from_dp1, iters=6, save=from_dp1)
        np.testing.assert_allclose(losses(at_dp2)[3:], losses(full)[3:], rtol=2e-5)
        formats = {run: [dist_checkpointing.load_common_state_dict(f"{run}/iter_{i:07d}")["optimizer_format"]
                         for i in (3, 6)] for run in (dp1, from_dp1)}
        assert formats == {dp1: ["dp_reshardable", "dp_reshardable"], from_dp1: ["plain", "plain"]}
    resumed = train(demo, tmp_path, "second", 2, *flags, "--load", save, iters=6, save=save)
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal(losses(resumed), losses(full))
    np.testing.assert_array_equal(losses(resumed, "grad_norm"), losses(full, "grad_norm"))


def test_checkpoint_reshards_tp2_to_tp1(demo, tmp_path):
    """The model and the regular optimizer's state reshard; the distributed optimizer's
    dp_reshardable state does not, so it is refused in one line unless --no-load-optim.
    Without an optimizer flag a resumed run takes the optimizer whose state it loads."""
    tp2 = ["--tensor-model-parallel-size", "2"]
    reference = train(demo, tmp_path, "ref", 2, *tp2, "--no-distributed-optimizer", iters=5)
    plain = str(tmp_path / "plain")
    train(demo, tmp_path, "tp2", 2, *tp2, "--no-distributed-optimizer", "--exit-interval", "3", iters=5, save=plain)
    proc = subprocess.run(train_command(demo, 1, plain, "--load", plain, "--use-distributed-optimizer", iters=5),
                          capture_output=True, text=True, env=train_env(), timeout=600)
    _assert_one_line_error(proc, "holds plain optimizer state; resume with --no-distributed-optimizer")
    resumed = train(demo, tmp_path, "tp1", 1, "--load", plain, iters=5, save=plain)
    np.testing.assert_allclose(losses(resumed)[3:], losses(reference)[3:], rtol=1e-4)

    sharded = str(tmp_path / "sharded")
    train(demo, tmp_path, "tp2_dist", 2, *tp2, "--use-distributed-optimizer", "--exit-interval", "3", iters=5,
          save=sharded)
    proc = subprocess.run(train_command(demo, 1, sharded, "--load", sharded, iters=5), capture_output=True, text=True,
                          env=train_env(), timeout=600)
    _assert_one_line_error(proc, "dp_reshardable optimizer state saved at TP 2 PP 1")
    fresh_optim = train(demo, tmp_path, "tp1_fresh", 1, "--load", sharded, "--no-load-optim", iters=5, save=sharded)
    # The weights after step 3 were restored (step 4's loss); Adam then restarts from zero moments.
    np.testing.assert_allclose(losses(fresh_optim)[3], losses(reference)[3], rtol=1e-4)
    assert abs(losses(fresh_optim)[4] - losses(reference)[4]) > 1e-4


def test_bf16_mixed_precision_tracks_fp32(demo, tmp_path, mile_tp1):
    """--bf16 (bf16 weights and activations, fp32 grads and main weights) follows the fp32 run
    to bf16 accuracy with the distributed optimizer at TP=2 x DP=2 and with megatron-core's
    bf16 optimizer at TP=2, both with sequence parallelism, and checkpoints bf16 weights."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    save = str(tmp_path / "bf16")
    fp32 = mile_tp1["train"]
    # The 6.7B launcher's layout in miniature: TP=2 with sequence parallelism x DP=2, bf16, ZeRO-1.
    runs = {"tp2_sp_dp2": train(demo, tmp_path, "bf16", 4, "--loss", "mile", "--bf16", "--tensor-model-parallel-size",
                                 "2", "--sequence-parallel", save=save),
            "tp2_sp": train(demo, tmp_path, "bf16_sp", 2, "--loss", "mile", "--bf16", "--no-distributed-optimizer",
                             "--tensor-model-parallel-size", "2", "--sequence-parallel")}
    for name, records in runs.items():
        np.testing.assert_allclose(losses(records), losses(fp32), rtol=1e-3, err_msg=name)
        np.testing.assert_allclose(losses(records, "grad_norm"), losses(fp32, "grad_norm"), rtol=1e-2, err_msg=name)
        assert not np.array_equal(losses(records), losses(fp32))
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(save, f"iter_{ITERS:07d}"), flat)
    state = torch.load(flat, weights_only=False)
    assert state["embedding.word_embeddings.weight"].dtype == torch.bfloat16
    assert state["output_layer.weight"].dtype == torch.bfloat16


def test_killed_save_resumes_from_previous_checkpoint(demo, tmp_path):
    save = str(tmp_path / "killed")
    cmd = train_command(demo, 1, save, "--save-interval", "2", iters=6)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=train_env(),
                            start_new_session=True)
    staging = os.path.join(save, "iter_0000004.tmp")
    deadline = time.time() + 300
    while not os.path.exists(staging) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(staging), "the run ended before its second save started"
    assert not os.path.exists(os.path.join(save, "iter_0000004"))
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "2"

    resumed = train(demo, tmp_path, "resume", 1, "--load", save, "--save-interval", "2", iters=6, save=save)
    reference = train(demo, tmp_path, "reference", 1, iters=6)
    # The killed run logged iterations 1-4; the resumed one redoes 3 and 4 and goes on, exactly.
    by_iter = {r["iteration"]: r["loss"] for r in resumed}
    assert sorted(by_iter) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_array_equal([by_iter[i] for i in range(1, 7)], losses(reference))
    assert not os.path.exists(staging)


def test_non_finite_steps_are_skipped_then_stop_the_run(demo, tmp_path):
    import torch

    save = str(tmp_path / "nan")
    proc = subprocess.run(train_command(demo, 1, save, "--lr", "1e30", "--lr-warmup-iters", "0", "--max-skipped-iters",
                                   "3", "--save-interval", "1", iters=20),
                          capture_output=True, text=True, env=train_env(), timeout=600)
    _assert_one_line_error(proc, "3 consecutive non-finite iterations")
    assert "step skipped" in proc.stdout
    records = read_records(save, "train")
    assert [r["skipped"] for r in records[-3:]] == [1, 2, 3]
    # A NaN never reaches a checkpoint: skipped steps leave the weights untouched.
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    latest = int(open(os.path.join(save, "latest_checkpointed_iteration.txt")).read())
    assert latest >= records[-1]["iteration"] - 1
    flat = str(tmp_path / "flat.pt")
    dcp_to_torch_save(os.path.join(save, f"iter_{latest:07d}"), flat)
    tensors = [t for t in _tensors(torch.load(flat, weights_only=False))]
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors)


def _tensors(tree):
    import torch

    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensors(value)


def test_vocabulary_larger_than_checkpoint_is_refused(demo, tmp_path):
    import torch

    save = str(tmp_path / "vocab")
    train(demo, tmp_path, "small", 1, iters=2, save=save)
    common = os.path.join(save, "iter_0000002", "common.pt")
    state = torch.load(common, weights_only=False)
    state["vocab_size"] = 100
    torch.save(state, common)
    proc = subprocess.run(train_command(demo, 1, save, "--load", save, iters=3), capture_output=True, text=True,
                          env=train_env(), timeout=600)
    _assert_one_line_error(proc, "more than the 100")


def _assert_one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """Our error is one line; no traceback from this package (torchrun adds its own exit summary)."""
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-mile-train: error:")]
    assert len(errors) == 1 and fragment in errors[0], proc.stderr[-3000:]
    assert f'File "{REPO}/megatron_mile' not in proc.stderr


BAD_CONFIGS = [
    (["--tensor-model-parallel-size", "3"], 3, "--num-attention-heads 4 is not divisible by --tensor-model-parallel-size 3"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
    (["--num-layers-per-virtual-pipeline-stage", "3", "--pipeline-model-parallel-size", "4"], 4,
     "--num-layers 4 is not divisible by --pipeline-model-parallel-size 4 × --num-layers-per-virtual-pipeline-stage 3"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], 2,
     "--global-batch-size 6 is not divisible by --micro-batch-size 2 × data-parallel size 2"),
    (["--tokenizer-model", "/nonexistent/tok.model"], 1, "--tokenizer-model: /nonexistent/tok.model does not exist"),
    (["--sequence-parallel", "--tensor-model-parallel-size", "2", "--seq-length", "33"], 2,
     "--seq-length 33 is not divisible by --tensor-model-parallel-size 2"),
    (["--dist-ckpt-optim-fully-reshardable"], 2, "--dist-ckpt-optim-fully-reshardable needs apex or Transformer Engine"),
    (["--lr-warmup-iters", "50"], 1, "--lr-warmup-iters 50 must be smaller"),
    (["--model-preset", "468M", "--tensor-model-parallel-size", "32"], 32, "--num-attention-heads 16 is not divisible"),
    (["--group-query-attention", "--num-query-groups", "3"], 1,
     "--num-attention-heads 4 is not divisible by --num-query-groups 3"),
    (["--group-query-attention", "--num-query-groups", "2", "--tensor-model-parallel-size", "4"], 4,
     "--num-query-groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--finetune"], 1, "--finetune needs --load"),
]


@pytest.mark.parametrize("flags,world,message", BAD_CONFIGS)
def test_bad_configuration_fails_with_one_line(flags, world, message, monkeypatch, capsys):
    from megatron_mile import train

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    base = ["--train-iters", "10", "--lr-warmup-iters", "1", "--data-path", "x", "--tokenizer-model", __file__]
    with pytest.raises(SystemExit) as exit_info:
        train.main(base + flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_missing_data_prefix_fails_with_one_line(demo, tmp_path):
    # A later --data-path replaces the fixture's.
    proc = subprocess.run(train_command(demo, 1, str(tmp_path / "x")) + ["--data-path", str(tmp_path / "no_such_prefix")],
                          capture_output=True, text=True, env=train_env(), timeout=600)
    _assert_one_line_error(proc, "no_such_prefix")
