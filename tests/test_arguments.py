"""The trainer's flags: Megatron-LM command lines, one-line refusals, and a --help that tells the truth."""

from __future__ import annotations

import os
import re
import sys

import pytest

from data_fixtures import train_sentencepiece

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    return train_sentencepiece(str(tmp_path_factory.mktemp("tok") / "sp.model"), vocab_size=300)


def megatron_lm_llama(tokenizer: str, checkpoints: str) -> list[str]:
    """The flags of Megatron-LM's Llama recipes (examples/llama/train_llama3_8b_h100_fp8.sh and the
    Llama-2/3 commands of docs/llama_mistral.md), in their order and spelling, at tiny sizes."""
    model = ["--use-mcore-models", "--num-layers", "4", "--hidden-size", "64", "--ffn-hidden-size", "176",
             "--num-attention-heads", "4", "--kv-channels", "16", "--seq-length", "128",
             "--max-position-embeddings", "128", "--position-embedding-type", "rope", "--rotary-percent", "1.0",
             "--attention-dropout", "0.0", "--hidden-dropout", "0.0", "--swiglu", "--normalization", "RMSNorm",
             "--norm-epsilon", "1e-5", "--init-method-std", "0.01", "--untie-embeddings-and-output-weights",
             "--disable-bias-linear", "--no-position-embedding", "--use-rotary-position-embeddings",
             "--no-masked-softmax-fusion", "--attention-softmax-in-fp32", "--transformer-impl", "transformer_engine"]
    training = ["--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "100",
                "--lr-decay-iters", "100", "--lr-warmup-iters", "10", "--lr", "0.00015", "--min-lr", "0.00001",
                "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--weight-decay", "0.1", "--adam-beta1", "0.9",
                "--adam-beta2", "0.95", "--bf16", "--optimizer", "adam", "--use-distributed-optimizer",
                "--overlap-grad-reduce", "--no-gradient-accumulation-fusion"]
    parallel = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                "--context-parallel-size", "1", "--sequence-parallel", "--distributed-backend", "nccl",
                "--distributed-timeout-minutes", "60"]
    data = ["--data-path", "data/pile_text_document", "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
            tokenizer, "--data-cache-path", "cache", "--split", "99,1,0", "--no-create-attention-mask-in-dataloader",
            "--num-workers", "1", "--make-vocab-size-divisible-by", "128"]
    logging = ["--log-interval", "1", "--eval-iters", "32", "--eval-interval", "100", "--save-interval", "1000",
               "--log-throughput", "--ckpt-format", "torch_dist", "--save", checkpoints, "--load", checkpoints,
               "--tensorboard-dir", "tb"]
    return model + training + parallel + data + logging


def test_megatron_lm_llama_command_line_passes_validation(sp_model, tmp_path):
    from megatron_mile.arguments import parse_args, validate

    args = parse_args(megatron_lm_llama(sp_model, str(tmp_path)))
    validate(args, world_size=8)
    # The flags that mean something here took effect; the restated ones are only recorded.
    assert (args.tokenizer_type, args.make_vocab_size_divisible_by, args.data_cache_path) == ("sentencepiece", 128,
                                                                                              "cache")
    assert (args.distributed_timeout_minutes, args.bf16, args.sequence_parallel) == (60, True, True)
    assert args.megatron_lm_flags["--normalization"] == "RMSNorm" and "--swiglu" in args.megatron_lm_flags


def _one_line_failure(argv: list[str], world: int, monkeypatch, capsys) -> str:
    from megatron_mile import train

    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-mile-train: error: "), err
    return err[0]


REFUSED = [
    (["--normalization", "LayerNorm"], "--normalization LayerNorm contradicts this project: the norms are RMSNorm"),
    (["--position-embedding-type", "learned_absolute"], "--position-embedding-type learned_absolute contradicts"),
    (["--hidden-dropout", "0.1"], "--hidden-dropout 0.1 contradicts this project: there is no dropout"),
    (["--init-method-std", "0.02"], "--init-method-std 0.02 contradicts this project: weights start from N(0, 0.01)"),
    (["--max-position-embeddings", "4096"], "--max-position-embeddings 4096 contradicts this project: positions run "
                                            "up to --seq-length (--max-position-embeddings 128)"),
    (["--norm-epsilon", "tiny"], "argument --norm-epsilon: invalid float value: 'tiny'"),
    (["--context-parallel-size", "2"], "--context-parallel-size 2 contradicts this project"),
    (["--ckpt-format", "torch"], "--ckpt-format torch contradicts this project"),
    (["--fp16"], "--fp16 is not supported: fp16 needs loss scaling, which this trainer does not do; use --bf16"),
    (["--train-samples", "1000"], "--train-samples is not supported: use --train-iters"),
    (["--vocab-file", "gpt2-vocab.json"], "--vocab-file is not supported"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "argument --tokenizer-type: GPT2BPETokenizer is not supported: "
                                                "GPT-2 vocab/merges files"),
    (["--tokenizer-type", "NullTokenizer"], "NullTokenizer is not supported: there is no mock-data mode"),
    (["--tokenizer-type", "sentencepice"], "'sentencepice' is unknown; choose from sentencepiece, huggingface, "
                                           "GPTSentencePieceTokenizer"),
    (["--profile"], "unrecognized arguments: --profile"),
]


@pytest.mark.parametrize("flags,message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_megatron_lm_flags_that_contradict_the_project_are_refused_in_one_line(flags, message, monkeypatch, capsys):
    base = ["--train-iters", "10", "--lr-warmup-iters", "1", "--data-path", "x", "--tokenizer-model", __file__,
            "--seq-length", "128"]
    assert message in _one_line_failure(base + flags, 1, monkeypatch, capsys)


INTERLEAVING = [
    # Interleaving needs pipeline stages to interleave.
    ([], 1, "--num-layers-per-virtual-pipeline-stage 1 needs --pipeline-model-parallel-size > 1"),
    # 4 layers at PP=2 → 2 chunks per stage; megatron-core runs micro-batches in groups of PP.
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "1"], 2,
     "the interleaved schedule needs the micro-batches per step (1 = --global-batch-size 1 / (--micro-batch-size 1 "
     "× data-parallel size 1)) to be a multiple of --pipeline-model-parallel-size 2"),
    (["--pipeline-model-parallel-size", "2", "--global-batch-size", "3"], 2, "micro-batches per step (3 = "),
]


@pytest.mark.parametrize("flags,world,message", INTERLEAVING)
def test_interleaved_layouts_megatron_core_rejects_are_refused_before_any_work(flags, world, message, monkeypatch,
                                                                               capsys):
    base = ["--train-iters", "10", "--lr-warmup-iters", "1", "--data-path", "x", "--tokenizer-model", __file__,
            "--micro-batch-size", "1", "--num-layers-per-virtual-pipeline-stage", "1"]
    assert message in _one_line_failure(base + flags, world, monkeypatch, capsys)


def test_interleaved_layout_megatron_core_accepts_passes():
    from megatron_mile.arguments import parse_args, validate, virtual_pipeline_stages

    args = parse_args(["--train-iters", "10", "--lr-warmup-iters", "1", "--data-path", "x", "--tokenizer-model",
                       __file__, "--micro-batch-size", "1", "--global-batch-size", "4",
                       "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"])
    validate(args, world_size=2)
    assert virtual_pipeline_stages(args) == 2


# ------------------------------------------------------------------ tokenizer types


def test_megatron_lm_tokenizer_names_load_what_they_mean_here(sp_model, capsys):
    import sentencepiece

    from megatron_mile.data.tokenizer import build_tokenizer, resolve_tokenizer_type

    assert [resolve_tokenizer_type(n) for n in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                                                "Llama2Tokenizer", "HuggingFaceTokenizer", None)] == \
        ["sentencepiece", "sentencepiece", "sentencepiece", "huggingface", None]
    # Megatron-LM's GPTSentencePieceTokenizer: the model's own ids, no BOS/EOS added, EOD = the model's EOS.
    reference = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    text = "Document 3: alpha beta\n    indented line é"
    for name in ("GPTSentencePieceTokenizer", "SentencePieceTokenizer", "Llama2Tokenizer"):
        tok = build_tokenizer(sp_model, name)
        assert tok.tokenize(text) == reference.encode(text) and tok.eod == reference.eos_id()
        assert tok.vocab_size == reference.get_piece_size()

    # The preprocessing tool takes them too, and refuses the unsupported ones in one line.
    sys.path.insert(0, REPO)
    from tools import preprocess_data

    flags = ["--input", "c.jsonl", "--tokenizer-model", sp_model, "--output-prefix", "out", "--tokenizer-type"]
    assert preprocess_data.parse_args(flags + ["Llama2Tokenizer"]).tokenizer_type == "sentencepiece"
    with pytest.raises(SystemExit) as exit_info:
        preprocess_data.parse_args(flags + ["GPT2BPETokenizer"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and "GPT2BPETokenizer is not supported" in err[0]


def test_hf_exporter_takes_megatron_lm_tokenizer_names():
    sys.path.insert(0, REPO)
    from checkpoint_conversion import convert_to_hf

    parser = convert_to_hf.build_parser()
    args = parser.parse_args(["--load", "x", "--output", "y", "--tokenizer-type", "HuggingFaceTokenizer"])
    assert args.tokenizer_type == "huggingface"
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--load", "x", "--output", "y", "--tokenizer-type", "TikTokenizer"])
    assert exit_info.value.code == 2


# ------------------------------------------------------------------ --help and README


def _help_blocks(text: str) -> dict[str, str]:
    """Each option's help text in ``--help`` output, keyed by its first option string."""
    blocks: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-{1,2}[\w-]+)", line)
        if match:
            current = match.group(1)
            blocks[current] = line
        elif current and line.startswith("      "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return {k: re.sub(r"\s+", " ", v) for k, v in blocks.items()}


def test_help_shows_every_real_default_and_one_meaning_per_paired_flag():
    from megatron_mile.arguments import build_parser

    parser = build_parser()
    text = parser.format_help()
    blocks = _help_blocks(text)
    shown = 0
    for action in parser._actions:
        if not action.option_strings or action.help == "==SUPPRESS==" or action.dest == "help":
            continue
        block = blocks[action.option_strings[0]]
        if action.required or action.nargs == 0:
            continue  # a required value, or a switch whose help says what it does
        assert "(default: " in block, f"{action.option_strings[0]} shows no default: {block}"
        if action.default is not None:
            value = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert f"(default: {value})" in block, f"{action.option_strings[0]}: {block}"
            shown += 1
    assert shown >= 20
    for flag, default in (("--lr", "0.0003"), ("--lr-warmup-iters", "2000"), ("--micro-batch-size", "4"),
                          ("--global-batch-size", "8"), ("--eval-interval", "1000"), ("--loss", "mile")):
        assert f"(default: {default})" in blocks[flag]
    # A pair of switches for one setting: neither claims argparse's None as a default; one says
    # what happens without either.
    assert "(default" not in blocks["--no-distributed-optimizer"] + blocks["--use-distributed-optimizer"]
    assert "Without either flag: the distributed optimizer when DP > 1, the regular one at DP=1" in \
        " ".join(blocks["--use-distributed-optimizer"].split())
    # Written for users: no internal names.
    assert not re.search(r"ConfigError|validate\(|megatron_mile\.(?!train )|megatron_lm_flags|``", text)
    # The Megatron-LM compatibility table is summarised at the end.
    assert "--normalization RMSNorm" in text and "--fp16" in text


def _readme_section(title: str) -> str:
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    start = readme.index(f"\n## {title}\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end > 0 else None]


def test_readme_training_section_names_only_real_flags_and_lists_the_megatron_lm_table():
    """--help is the reference; the README's summary must not name a flag the trainer lacks, and it
    lists every Megatron-LM flag the trainer accepts or refuses by name."""
    import torch.distributed.run

    from megatron_mile import megatron_lm_flags
    from megatron_mile.arguments import build_parser

    trainer = {o for a in build_parser()._actions for o in a.option_strings}
    torchrun = {o for a in torch.distributed.run.get_args_parser()._actions for o in a.option_strings}
    section = _readme_section("Training")
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]", section))
    unknown = sorted(named - trainer - torchrun)
    assert not unknown, f"README's Training section names flags the trainer does not have: {unknown}"
    assert "--help" in section
    table = _readme_section("Megatron-LM compatibility")
    missing = [entry.flag for entry in megatron_lm_flags.FLAGS if f"`{entry.flag}" not in table]
    assert not missing, f"README's Megatron-LM table misses {missing}"
    assert len(named) > 30


def test_no_bias_swiglu_fusion_turns_the_gpu_fusion_off(monkeypatch):
    import torch

    from megatron_mile import model as mm
    from megatron_mile.arguments import parse_args

    # As on a GPU where megatron-core's compiled SwiGLU works.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mm, "fused_swiglu_compiles", lambda device, dtype: True)
    for flags, fused in (([], True), (["--no-bias-swiglu-fusion"], False)):
        args = parse_args(["--train-iters", "1", "--data-path", "d", "--tokenizer-model", "t", *flags])
        config = mm.build_transformer_config(mm.PRESETS["tiny"], bias_swiglu_fusion=args.bias_swiglu_fusion)
        assert config.bias_activation_fusion is fused
        # Unfused, megatron-mile's SwiGLU module takes the whole FC1 output (megatron_mile/swiglu.py).
        assert config.use_te_activation_func is not fused


def test_no_rope_fusion_keeps_megatron_cores_unfused_rope():
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_mile import model as mm
    from megatron_mile import rope
    from megatron_mile.arguments import parse_args

    for flags, fused in (([], True), (["--no-rope-fusion"], False)):
        args = parse_args(["--train-iters", "1", "--data-path", "d", "--tokenizer-model", "t", *flags])
        config = mm.build_transformer_config(mm.PRESETS["tiny"], rope_fusion=args.apply_rope_fusion)
        assert config.apply_rope_fusion is fused
        assert mm.optional_kernels(config)["RoPE"] == ("megatron-mile's, in place" if fused
                                                      else "megatron-core's unfused")
    # megatron-core's fused-RoPE dispatch reaches megatron_mile/rope.py (no Transformer Engine here).
    assert rope_utils.fused_apply_rotary_pos_emb is rope.apply_rotary_pos_emb
