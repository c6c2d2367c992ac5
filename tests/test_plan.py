"""megatron-mile-plan: its memory model against what megatron-core allocates, its activation
formulas against the paper's closed forms, its schedule counts against megatron-core's,
its ranking against the launchers, and its one-line errors."""

from __future__ import annotations

import dataclasses

import pytest

from dist_utils import run_ranks
from training_utils import optim_settings
from megatron_mile.model import PRESETS, ModelShape
from megatron_mile.planning import Layout, ModelSpec
from megatron_mile.planning.activations import PAPER_GPT, in_flight_chunk_forwards, layer_activation_terms
from megatron_mile.planning.memory import static_memory

# Odd sizes, so that megatron-core's 64-element parameter alignment and bucket padding show.
CUSTOM = ModelShape(num_layers=4, hidden_size=36, num_attention_heads=4, ffn_hidden_size=60, seq_length=16)
VOCAB = 300

# (shape, query groups, TP, PP, VP, distributed optimizer, DDP bucket size) on 2 ranks; DP = 2 / (TP·PP).
STATIC_CASES = [
    ("tiny", None, 1, 1, None, True, None),
    ("tiny", None, 1, 1, None, False, None),
    ("tiny", None, 2, 1, None, True, None),
    ("tiny", None, 1, 2, None, True, None),
    ("custom", None, 1, 1, None, True, 3000),  # several buckets, each padded to lcm(DP, 128)
    ("custom", None, 1, 2, 2, True, None),  # interleaved: two model chunks per rank
    ("custom", 2, 2, 1, None, False, None),  # grouped-query attention at TP=2
]


def _shape(name: str) -> ModelShape:
    return CUSTOM if name == "custom" else PRESETS[name]


def _allocated(cases) -> list[dict]:
    """Build each case with the trainer's own pieces and sum the bytes of the storages megatron-core
    allocated: parameters, gradient buffers, optimizer state (main weights and Adam moments)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from megatron_mile import model as mm
    from megatron_mile import optim, runtime

    def storage_bytes(tensors) -> int:
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    out = []
    for name, groups, tp, pp, vp, distributed, bucket_size in cases:
        shape = _shape(name)
        rt = runtime.initialize(tp, pp, vp, seed=3)
        config = mm.build_transformer_config(shape, tp=tp, pp=pp, vp=vp, bf16=True)
        if groups:
            config = dataclasses.replace(config, num_query_groups=groups)
        chunks = mm.build_model_chunks(config, VOCAB, shape.seq_length, 3, rt.device)
        settings = optim_settings("--use-distributed-optimizer" if distributed else "--no-distributed-optimizer")
        if bucket_size is None:
            model = optim.wrap_data_parallel(config, chunks, settings)
        else:  # stock megatron-core DDP with a small bucket size
            ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=True,
                                                       use_distributed_optimizer=distributed, bucket_size=bucket_size)
            model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=c) for c in chunks]
        optimizer = optim.build_optimizer(model, settings, bf16=True)
        optimizer.step()  # Adam's moments exist from the first step on
        params = [p for c in chunks for p in c.parameters()]
        inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
        main = [p for o in inner for g in o.param_groups for p in g["params"]]
        moments = [o.state[p][k] for o in inner for p in main if p in o.state for k in ("exp_avg", "exp_avg_sq")]
        out.append({"pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
                    "dp_rank": parallel_state.get_data_parallel_rank(),
                    "weights": storage_bytes(params), "gradients": storage_bytes(p.main_grad for p in params),
                    "optimizer": storage_bytes(main) + storage_bytes(moments)})
        parallel_state.destroy_model_parallel()
    return out


# (sequence parallel, recomputation) at TP=2: the collectives of one micro-batch's forward and backward.
TP_CASES = [(False, "none"), (True, "none"), (True, "full")]
TP_SHAPE = dataclasses.replace(PRESETS["tiny"], seq_length=16)


def _tp_collectives(cases) -> list[list[tuple[str, int, bool]]]:
    """Run one micro-batch through the GPT model and the MiLe loss at TP=2 and record every
    collective megatron-core and the loss issue: (kind, bytes of the full tensor, asynchronous)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import layers, mappings

    from megatron_mile import model as mm
    from megatron_mile import runtime
    from megatron_mile.loss import weighted_lm_loss

    calls: list[tuple[str, int, bool]] = []

    def recorded(kind: str, collective):
        def call(*args, **kwargs):
            full = args[1] if kind == "reduce-scatter" else args[0]
            calls.append((kind, full.numel() * full.element_size(), bool(kwargs.get("async_op", False))))
            return collective(*args, **kwargs)
        return call

    dist.all_reduce = recorded("all-reduce", dist.all_reduce)
    for module in (layers, mappings):
        module.dist_all_gather_func = recorded("all-gather", module.dist_all_gather_func)
        module.dist_reduce_scatter_func = recorded("reduce-scatter", module.dist_reduce_scatter_func)
    out = []
    b, s = 2, TP_SHAPE.seq_length
    for sequence_parallel, recompute in cases:
        rt = runtime.initialize(2, 1, seed=5)
        config = mm.build_transformer_config(TP_SHAPE, tp=2, bf16=True, sequence_parallel=sequence_parallel,
                                             recompute_activations=recompute == "full")
        (chunk,) = mm.build_model_chunks(config, VOCAB, s, 5, rt.device)
        tokens = torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(1))
        calls.clear()
        logits = chunk(tokens, torch.arange(s).expand(b, s), None)
        loss, _ = weighted_lm_loss(logits, tokens.roll(-1, dims=1), torch.ones(b, s), kind="mile",
                                   vocab_size=VOCAB, inplace=True)
        loss.backward()
        out.append(sorted(calls))
        parallel_state.destroy_model_parallel()
    return out


def _measure(rank: int, world: int) -> dict:
    return {"allocated": _allocated(STATIC_CASES), "collectives": _tp_collectives(TP_CASES)}


@pytest.fixture(scope="module")
def measured():
    """Both measurements in one pair of spawned gloo ranks."""
    return run_ranks(_measure, 2)


@pytest.mark.parametrize("index", range(len(STATIC_CASES)))
def test_weight_gradient_and_optimizer_bytes_are_what_megatron_core_allocates(measured, index):
    name, groups, tp, pp, vp, distributed, bucket_size = STATIC_CASES[index]
    spec = ModelSpec(_shape(name), VOCAB, groups)
    layout = Layout(tp=tp, pp=pp, dp=2 // (tp * pp), vp=vp or 1, micro_batch_size=1, num_microbatches=1,
                    sequence_parallel=False, distributed_optimizer=distributed, recompute="none")
    for rank in measured:
        allocated = rank["allocated"][index]
        predicted = static_memory(spec, layout, allocated["pp_rank"], allocated["dp_rank"], bucket_size)
        assert predicted == (allocated["weights"], allocated["gradients"], allocated["optimizer"]), allocated


@pytest.mark.parametrize("index", range(len(TP_CASES)))
def test_tensor_parallel_collectives_are_the_ones_megatron_core_and_the_loss_issue(measured, index):
    """Kind, size and overlap (asynchronous launch) of every TP collective of a micro-batch, as the
    communication model counts them; MiLe's entropy adds none to the cross-entropy's two."""
    from megatron_mile.planning.communication import Hardware, microbatch_traffic

    sequence_parallel, recompute = TP_CASES[index]
    layout = Layout(tp=2, pp=1, dp=1, vp=1, micro_batch_size=2, num_microbatches=1,
                    sequence_parallel=sequence_parallel, distributed_optimizer=True, recompute=recompute)
    hardware = Hardware(peak_flops=1.0, achievable_mfu=1.0, nvlink_bandwidth=1.0, inter_node_bandwidth=1.0,
                        hbm_bandwidth=1.0, latency=0.0, gpus_per_node=8)
    predicted = sorted((x.collective, round(x.payload / x.count), x.overlapped)
                       for x in microbatch_traffic(ModelSpec(TP_SHAPE, VOCAB), layout, hardware, 0)
                       for _ in range(round(x.count)))
    for rank in measured:
        assert [tuple(c) for c in rank["collectives"][index]] == predicted


@pytest.mark.parametrize("s,b,h,a,t", [(2048, 1, 4096, 32, 1), (2048, 4, 4096, 32, 8), (1024, 2, 1024, 16, 2)])
def test_gpt_block_activations_are_the_papers_closed_forms(s, b, h, a, t):
    """Korthikanti et al. 2022, Table 2, for the GPT block (f = 4h, dropout, fused softmax)."""
    def per_layer(sequence_parallel: bool, recompute: str) -> float:
        terms = layer_activation_terms(s, b, h, a, a, 4 * h, t, sequence_parallel=sequence_parallel,
                                       recompute=recompute, block=PAPER_GPT)
        return sum(terms.values())

    sbh = s * b * h
    assert per_layer(False, "none") == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)), rel=1e-12)
    assert per_layer(True, "none") == pytest.approx(sbh / t * (34 + 5 * a * s / h), rel=1e-12)
    assert per_layer(False, "selective") == pytest.approx(sbh * (10 + 24 / t), rel=1e-12)
    assert per_layer(True, "selective") == pytest.approx(34 * sbh / t, rel=1e-12)
    assert per_layer(False, "full") == 2 * sbh
    if t == 1:
        assert per_layer(False, "none") == pytest.approx(sbh * (34 + 5 * a * s / h), rel=1e-12)


@pytest.mark.parametrize("attention,g", [("flash", 32), ("flash", 8), ("local", 8)])
def test_llama_block_activations_follow_the_derivation(attention, g):
    """The LLaMA terms of megatron_mile.planning.activations' docstring, at 6.7B's shape."""
    from megatron_mile.planning.activations import Block

    s, b, h, a, f, t = 2048, 2, 4096, 32, 11008, 2
    n = s * b * h
    for sp, r in ((False, 1), (True, t)):
        terms = layer_activation_terms(s, b, h, a, g, f, t, sequence_parallel=sp, recompute="none",
                                       block=Block(attention=attention))
        if attention == "flash":
            expected = n * (8 / r + (4 + 4 * g / a) / t) + 6 * s * b * f / t + 4 * a * s * b / t
        else:  # megatron-core's local attention keeps K and V repeated to every head, and fp32 + bf16 scores
            expected = n * (8 / r + 8 / t) + 6 * s * b * f / t + 6 * a * s * s * b / t
        assert sum(terms.values()) == pytest.approx(expected, rel=1e-12)


def test_in_flight_micro_batches_match_megatron_cores_schedules():
    """Warm-up forwards from megatron-core's own ``get_pp_rank_microbatches``, plus the steady-state one."""
    from types import SimpleNamespace

    from megatron.core.pipeline_parallel.schedules import get_pp_rank_microbatches

    for pp in (1, 2, 4, 8):
        for vp in ((1, 2, 4) if pp > 1 else (1,)):
            for m in (1, 3, 8, 32) if vp == 1 else (pp, 4 * pp):
                for rank in range(pp):
                    group = SimpleNamespace(size=lambda pp=pp: pp, rank=lambda rank=rank: rank)
                    comm = SimpleNamespace(pp_group=group, virtual_pipeline_model_parallel_size=vp if vp > 1 else None)
                    total, _, warmup, _ = get_pp_rank_microbatches(m, vp, pp, p2p_communicator=comm)
                    assert in_flight_chunk_forwards(pp, vp, m, rank) == min(warmup + 1, total), (pp, vp, m, rank)


@pytest.mark.parametrize("pp,vp", [(2, 2), (4, 2), (8, 4)])
def test_first_stage_holds_the_papers_interleaved_share(pp, vp):
    """Korthikanti et al.: with interleaving the first stage holds L(1 + (p−1)/(p·vp)) layers' activations."""
    layers = 32
    held = in_flight_chunk_forwards(pp, vp, 64, 0) * layers // (pp * vp)
    assert held == pytest.approx(layers * (1 + (pp - 1) / (pp * vp)))


def _plan(argv: list[str]):
    from megatron_mile import plan

    return plan.plan(plan.build_parser().parse_args(argv))


@pytest.mark.parametrize("script,gpus", [("pretrain_468M.sh", 16), ("pretrain_1.2B.sh", 32), ("pretrain_6.7B.sh", 128)])
def test_launcher_layout_is_a_top_choice_on_80_gb_cards_or_its_header_says_why(script, gpus, tmp_path, demo):
    """The launcher's defaults (DRY_RUN=1) against the planner's table: same parallel layout,
    optimizer and recomputation as one of the rows, with a micro-batch size within that row's
    near-equal range. Otherwise the header must name the planner's first choice and the layout
    must still fit."""
    import shlex

    from megatron_mile.arguments import parse_args
    from megatron_mile.optim import choose_distributed_optimizer
    from megatron_mile.planning.planner import choices, family
    from test_launchers import REPO, _launch

    proc = _launch(script, "10.0.0.1", "0", SAVE=str(tmp_path), DATA_PATH=demo["blend"], TOKENIZER=demo["tokenizer"])
    assert proc.returncode == 0, proc.stderr
    command = shlex.split(proc.stdout)
    trainer = parse_args(command[command.index("megatron_mile.train") + 1:])
    spec, cluster, estimates, ranking = _plan(
        ["--model-preset", trainer.model_preset, "--seq-length", str(trainer.seq_length), "--gpus", str(gpus),
         "--gpu-memory", "80", "--global-batch-size", str(trainer.global_batch_size)])
    tp, pp = trainer.tensor_model_parallel_size, trainer.pipeline_model_parallel_size
    per_vp = trainer.num_layers_per_virtual_pipeline_stage
    dp = gpus // (tp * pp)
    launcher = Layout(tp=tp, pp=pp, dp=dp, vp=spec.shape.num_layers // (pp * per_vp) if per_vp else 1,
                      micro_batch_size=trainer.micro_batch_size,
                      num_microbatches=trainer.global_batch_size // (dp * trainer.micro_batch_size),
                      sequence_parallel=trainer.sequence_parallel,
                      distributed_optimizer=choose_distributed_optimizer(trainer.use_distributed_optimizer, dp, None)[0],
                      recompute="full" if trainer.recompute_activations else "none")
    (estimate,) = [e for e in estimates if e.layout == launcher]
    assert estimate.fits
    rows = choices(ranking, cluster, top=5)
    if any(family(r.estimate.layout) == family(launcher) and launcher.micro_batch_size in r.near_micro_batch_sizes
           and (r.estimate.layout.distributed_optimizer, r.estimate.layout.recompute)
           == (launcher.distributed_optimizer, launcher.recompute) for r in rows):
        return
    with open(f"{REPO}/examples/{script}") as f:
        header = " ".join(line.lstrip("#").strip() for line in f if line.startswith("#"))
    assert f"megatron-mile-plan ranks {rows[0].estimate.layout.describe()} first" in header


BAD_INPUTS = [
    ("--model-preset 6.7B --gpus 12 --global-batch-size 2048",
     "--gpus-per-node 8 does not divide --gpus 12: nearest GPU counts that work: 8 or 16", ["--gpus 8", "--gpus 16"]),
    ("--model-preset 6.7B --gpus 24 --global-batch-size 2048",
     "no layout splits 24 GPUs (TP must divide 8 GPUs per node, 32 heads and FFN 11008; PP 32 layers; "
     "DP --global-batch-size 2048): nearest GPU counts that work: 16 or 32", ["--gpus 16", "--gpus 32"]),
    ("--model-preset 6.7B --gpus 8 --gpu-memory 12 --global-batch-size 2048",
     "6.7B fits no layout on 8 x 12 GiB GPUs: the smallest needs 14.3 GiB", ["--gpu-memory 16", "--gpus 16"]),
    ("--model-preset 468M --gpus 16 --global-batch-size 1024 --micro-batch-size 3",
     "--micro-batch-size 3 divides no per-DP-rank batch of --global-batch-size 1024 on 16 GPUs: nearest sizes "
     "that do: 2 or 4", ["--micro-batch-size 2", "--micro-batch-size 4"]),
    ("--model-preset 468M --gpus 16 --global-batch-size 1024 --hidden-size 1000",
     "--hidden-size 1000 is not divisible by --num-attention-heads 16", []),
    ("--model-preset 468M --gpus 16 --global-batch-size 1024 --micro-batch-size x",
     "argument --micro-batch-size: expected 'auto' or a positive integer, got 'x'", []),
    ("--model-preset 468M --gpus 16 --global-batch-size 1024 --memory-margin 1",
     "--memory-margin must be in [0, 1)", []),
]


@pytest.mark.parametrize("argv,message,alternatives", BAD_INPUTS)
def test_bad_input_is_one_line_naming_the_nearest_alternative_that_works(argv, message, alternatives, capsys):
    from megatron_mile import plan

    with pytest.raises(SystemExit) as exit_info:
        plan.main(argv.split())
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-mile-plan: error: ") and message in err[0], err
    for alternative in alternatives:  # what the line suggests does plan
        _plan(argv.split() + alternative.split())


def test_every_runnable_layout_passes_the_trainers_validation():
    from megatron_mile.arguments import parse_args, validate

    spec, _, estimates, _ = _plan("--model-preset tiny --gpus 8 --gpus-per-node 4 --global-batch-size 16".split())
    base = ["--model-preset", "tiny", "--global-batch-size", "16", "--train-iters", "10", "--lr-warmup-iters", "1",
            "--data-path", "x", "--tokenizer-model", __file__]
    runnable = [e.layout for e in estimates if e.layout.runnable]
    assert {(l.vp > 1, l.sequence_parallel, l.recompute) for l in runnable} == {
        (vp, sp, r) for vp in (False, True) for sp in (False, True) for r in ("none", "full")}
    for layout in runnable:
        validate(parse_args(base + layout.trainer_flags(spec.shape.num_layers)), world_size=8)


def test_interleaving_needs_a_multiple_of_pp_micro_batches():
    """megatron-core runs interleaved micro-batches in groups of PP and refuses a short last group."""
    from megatron_mile.planning import enumerate_layouts

    layouts = enumerate_layouts(ModelSpec(PRESETS["tiny"], VOCAB), 2, 8, global_batch_size=6)
    interleaved = {l.num_microbatches for l in layouts if l.pp == 2 and l.vp == 2}
    plain = {l.num_microbatches for l in layouts if l.pp == 2 and l.vp == 1}
    assert plain == {1, 2, 3, 6} and interleaved == {2, 6}


def test_single_gpu_step_is_its_flops_at_the_achievable_rate_plus_the_optimizer_step():
    """Float64 reference from the docstrings: 6N + 12·L·s·h FLOPs a token (N with the padded
    vocabulary), nothing to communicate but three scalar all-reduces, and the optimizer's
    5 + 38 bytes an element at HBM bandwidth."""
    from megatron_mile.planning.communication import Hardware
    from megatron_mile.planning.step_time import estimate_step_time

    shape = PRESETS["468M"]
    L, h, f, s = shape.num_layers, shape.hidden_size, shape.ffn_hidden_size, shape.seq_length
    hw = Hardware(peak_flops=1e15, achievable_mfu=0.5, nvlink_bandwidth=3e11, inter_node_bandwidth=4e10,
                  hbm_bandwidth=3e12, latency=1e-5, gpus_per_node=8)
    layout = Layout(tp=1, pp=1, dp=1, vp=1, micro_batch_size=4, num_microbatches=8, sequence_parallel=False,
                    distributed_optimizer=True, recompute="full")
    time = estimate_step_time(ModelSpec(shape, 32000), layout, hw)
    layers = 6.0 * L * (4 * h * h + 3 * h * f) + 12.0 * L * s * h
    flops = layers * 4 / 3 + 6.0 * 32000 * h  # full recomputation repeats the layers' forward; V = 32000 is padded
    params = L * (4 * h * h + 3 * h * f + 2 * h) + h + 2 * 32000 * h
    buffer = -(-params // 128) * 128  # one bucket, padded to lcm(DP = 1, 128); every tensor is a multiple of 64
    assert time.compute == pytest.approx(8 * 4 * s * flops / (1e15 * 0.5), rel=1e-12)
    assert time.recompute == pytest.approx(8 * 4 * s * layers / 3 / (1e15 * 0.5), rel=1e-12)
    assert time.optimizer == pytest.approx((5 * buffer + 38 * params) / 3e12, rel=1e-12)
    assert time.total == pytest.approx(time.compute + time.optimizer + 3 * 1e-5, rel=1e-12)
    assert time.tp == time.pp == time.bubble == time.dp == time.mile == 0


def test_json_has_every_layout_with_its_estimates_and_mile_adds_one_dp_all_reduce_per_micro_batch(capsys):
    import json

    from megatron_mile import plan
    from megatron_mile.planning import enumerate_layouts

    plan.main("--model-preset tiny --gpus 8 --gpus-per-node 4 --global-batch-size 16 --json".split())
    out = json.loads(capsys.readouterr().out)
    assert len(out["layouts"]) == len(enumerate_layouts(ModelSpec(PRESETS["tiny"], 32000), 8, 4, 16))
    ranked = sorted((e for e in out["layouts"] if e["rank"]), key=lambda e: e["rank"])
    assert all(e["fits"] and e["runnable"] for e in ranked)
    assert [e["step_time_s"]["total"] for e in ranked] == sorted(e["step_time_s"]["total"] for e in ranked)
    assert out["choices"][0]["rank"] == 1 and all(c["reason"] for c in out["choices"])
    for e in out["layouts"]:
        layout, communication = e["layout"], e["communication_last_stage"]
        assert set(e["memory_gib"]) >= {"weights", "gradients", "optimizer", "activations", "logits", "total"}
        if layout["dp"] > 1:
            mile = communication["mile alpha (dp)"]
            assert mile["collectives"] == layout["num_microbatches"]
            assert mile["bytes_per_gpu"] == pytest.approx(
                layout["num_microbatches"] * 2 * (layout["dp"] - 1) / layout["dp"] * 8)
        if layout["tp"] > 1:  # the cross-entropy's two all-reduces carry the entropy too
            assert communication["loss (tp)"]["collectives"] == 2 * layout["num_microbatches"]
