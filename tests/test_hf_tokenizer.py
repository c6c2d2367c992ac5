"""checkpoint_conversion/hf_tokenizer.py: the exported fast tokenizer gives the training ids.

Five tokenizers are trained here on real text (standard-library source lines) and exported;
transformers' ``AutoTokenizer`` on the export must return exactly the ids of the library that
trained them (``sentencepiece``, or ``tokenizers`` for an HF directory) on the exporter's probe
texts (whitespace runs, tabs, newlines, NFKC-sensitive and unknown characters, emoji, spelled
special tokens) and on held-out corpus lines.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from data_fixtures import jsonl_bytes, source_lines, train_hf_tokenizer, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from checkpoint_conversion import hf_tokenizer  # noqa: E402

TRAIN_LINES, HELD_OUT_LINES = 600, 300
# User-defined and control symbols of the LLaMA-like tokenizer, spelled in text.
SYMBOL_TEXTS = ("a <sep> b<sep>c", "<sep>", "x <ctl> y", "<sep><ctl> <s>")
LLAMA_SETTINGS = dict(model_type="bpe", normalization_rule_name="identity", remove_extra_whitespaces=False,
                      byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True)


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str]]:
    lines = source_lines(TRAIN_LINES + HELD_OUT_LINES)
    return lines[:TRAIN_LINES], lines[TRAIN_LINES:]


def _train_sentencepiece(path: str, lines: list[str], **settings) -> str:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model, vocab_size=400,
                                             minloglevel=2, num_threads=1, **settings)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def _build(kind: str, root, lines: list[str]) -> str:
    if kind == "sentencepiece_default_bpe":  # the library's defaults: nmt_nfkc, extra whitespace removed
        return _train_sentencepiece(str(root / "default_bpe.model"), lines, model_type="bpe")
    if kind == "sentencepiece_default_unigram":
        return _train_sentencepiece(str(root / "default_unigram.model"), lines, hard_vocab_limit=False)
    if kind == "demo":  # exactly what `make demo` trains
        corpus = write(str(root / "corpus.jsonl"), jsonl_bytes([{"text": line} for line in lines]))
        subprocess.run([sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
                        "--model-prefix", str(root / "demo"), "--vocab-size", "400", "--threads", "1"],
                       check=True, capture_output=True)
        return str(root / "demo.model")
    if kind == "llama_like":
        return _train_sentencepiece(str(root / "llama.model"), lines, user_defined_symbols=["<sep>"],
                                    control_symbols=["<ctl>"], **LLAMA_SETTINGS)
    assert kind == "hf_byte_level"
    return train_hf_tokenizer(str(root / "hf"), lines)


def _reference_ids(path: str):
    """The training library itself, not the project's wrapper."""
    if os.path.isdir(path):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=path)
    return processor.encode


@pytest.fixture(scope="module", params=["sentencepiece_default_bpe", "sentencepiece_default_unigram", "demo",
                                        "llama_like", "hf_byte_level"])
def exported(request, corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp(request.param)
    source = _build(request.param, root, corpus[0])
    out = root / "export"
    out.mkdir()
    hf_tokenizer.export_tokenizer(source, None, str(out), max_length=128)
    return {"kind": request.param, "source": source, "out": str(out)}


def test_exported_tokenizer_gives_training_ids(exported, corpus):
    from transformers import AutoTokenizer

    held_out = corpus[1]
    texts = [*hf_tokenizer.PROBES, *SYMBOL_TEXTS, *held_out, "\n".join(held_out[:40])]
    want = _reference_ids(exported["source"])
    tokenizer = AutoTokenizer.from_pretrained(exported["out"])
    for text in texts:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == want(text), repr(text)
    # The probes reach what they are meant to: NFKC rewrites, unknown characters, byte fallback.
    probe_ids = {i for text in hf_tokenizer.PROBES for i in want(text)}
    if exported["kind"].startswith("sentencepiece_default"):
        assert tokenizer.unk_token_id in probe_ids
    if exported["kind"] in ("demo", "llama_like"):
        assert tokenizer.convert_tokens_to_ids("<0xF0>") in probe_ids  # a 4-byte emoji
    hf_tokenizer.verify(exported["source"], None, exported["out"], texts)  # the conversion's own gate


def test_exported_tokenizer_settings(exported):
    """No BOS/EOS added (training never adds them); special tokens named for lm-eval."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(exported["out"])
    assert tokenizer("Hello world")["input_ids"] == tokenizer("Hello world", add_special_tokens=False)["input_ids"]
    assert tokenizer.eos_token == "</s>" and tokenizer.model_max_length == 128
    if not exported["kind"].startswith("hf"):
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(exported["source"], "rb") as f:
            proto.ParseFromString(f.read())
        spec = proto.normalizer_spec
        default = exported["kind"].startswith("sentencepiece_default")
        assert (spec.name, spec.remove_extra_whitespaces) == (("nmt_nfkc", True) if default else ("identity", False))
        assert spec.add_dummy_prefix and proto.trainer_spec.byte_fallback != default


def test_verify_refuses_an_unfaithful_export(tmp_path, corpus):
    """The earlier exporter's pipeline (identity normalisation, whitespace kept) on a default
    SentencePiece model: refused in one line naming the probe."""
    from tokenizers import Tokenizer, normalizers

    source = _build("sentencepiece_default_bpe", tmp_path, corpus[0])
    out = tmp_path / "export"
    out.mkdir()
    hf_tokenizer.export_tokenizer(source, None, str(out), max_length=128)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tokenizer.save(str(out / "tokenizer.json"))
    with pytest.raises(hf_tokenizer.TokenizerExportError) as err:
        hf_tokenizer.verify(source, None, str(out))
    message = str(err.value)
    assert "\n" not in message and "differs from the training tokenizer on ' leading space'" in message


def test_bad_sentencepiece_settings_are_refused(tmp_path, corpus):
    source = _train_sentencepiece(str(tmp_path / "suffix.model"), corpus[0], model_type="bpe",
                                  treat_whitespace_as_suffix=True)
    with pytest.raises(hf_tokenizer.TokenizerExportError, match="treat_whitespace_as_suffix"):
        hf_tokenizer.export_tokenizer(source, None, str(tmp_path), max_length=128)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"\xff\xfe not a model")
    with pytest.raises(hf_tokenizer.TokenizerExportError, match="not a SentencePiece model"):
        hf_tokenizer.export_tokenizer(str(garbage), None, str(tmp_path), max_length=128)
