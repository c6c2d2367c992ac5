"""tools/preprocess_data.py and the library behind it: exact ids, domains, workers, merging, bad input."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", module=r"megatron\.core")

from data_fixtures import DOMAINS, documents, jsonl_bytes, train_hf_tokenizer, train_sentencepiece, write
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_mile.data import build_tokenizer
from megatron_mile.data.preprocess import PreprocessConfig, PreprocessError, preprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    return train_sentencepiece(str(tmp_path_factory.mktemp("tok") / "sp.model"))


def read_docs(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def run(tmp_path, sp_model, inputs, name="out", **kw):
    config = PreprocessConfig(inputs=inputs, output_prefix=str(tmp_path / name / "pile"),
                              tokenizer_model=sp_model, quiet=True, **kw)
    return preprocess(config)


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.zst", ".jsonl.gz"])
def test_round_trip_exact_ids(tmp_path, sp_model, ext):
    records = documents(50)
    path = write(str(tmp_path / f"in{ext}"), jsonl_bytes(records))
    stats, written = run(tmp_path, sp_model, [path], append_eod=True, block_bytes=512)
    tok = build_tokenizer(sp_model)
    expected = [tok.tokenize(r["text"]) + [tok.eod] for r in records]
    assert read_docs(written[0]) == expected
    assert IndexedDataset(written[0]).index.dtype == np.uint16
    assert IndexedDataset(written[0]).document_indices.tolist() == list(range(51))
    assert (stats.documents, stats.tokens) == (50, sum(map(len, expected)))


def test_hf_tokenizer_directory_and_int32(tmp_path, sp_model, monkeypatch):
    tok_dir = train_hf_tokenizer(str(tmp_path / "hf"))
    records = documents(20)
    path = write(str(tmp_path / "in.jsonl"), jsonl_bytes(records))
    # A vocabulary over uint16's range must be stored as int32: pretend the tokenizer is that big.
    import megatron_mile.data.tokenizer as tokenizer_module

    monkeypatch.setattr(tokenizer_module.HuggingFaceTokenizer, "vocab_size", property(lambda self: 70000))
    config = PreprocessConfig(inputs=[path], output_prefix=str(tmp_path / "hf_out" / "x"),
                              tokenizer_model=tok_dir, append_eod=True, quiet=True)
    _, written = preprocess(config)
    tok = build_tokenizer(tok_dir)
    assert tok.eod == tok.vocab["</s>"]
    assert IndexedDataset(written[0]).index.dtype == np.int32
    assert read_docs(written[0]) == [tok.tokenize(r["text"]) + [tok.eod] for r in records]


def test_split_by_domain_and_manifest(tmp_path, sp_model):
    records = documents(40)
    path = write(str(tmp_path / "in.jsonl.zst"), jsonl_bytes(records))
    _, written = run(tmp_path, sp_model, [path], split_by_domain="meta.pile_set_name")
    tok = build_tokenizer(sp_model)
    manifest_path = str(tmp_path / "out" / "pile_text_manifest.json")
    assert manifest_path in written
    with open(manifest_path) as f:
        manifest = json.load(f)
    assert sorted(manifest["domains"]) == sorted(DOMAINS)
    assert manifest["domains"]["Gutenberg (PG-19)"]["prefix"] == "pile_Gutenberg_PG-19_text_document"
    for domain in DOMAINS:
        entry = manifest["domains"][domain]
        expected = [tok.tokenize(r["text"]) for r in records if r["meta"]["pile_set_name"] == domain]
        got = read_docs(str(tmp_path / "out" / entry["prefix"]))
        assert got == expected
        assert (entry["documents"], entry["tokens"]) == (20, sum(map(len, expected)))


def test_workers_and_partitions_give_identical_bytes(tmp_path, sp_model):
    records = documents(300)
    inputs = [write(str(tmp_path / f"in{i}.jsonl.zst"), jsonl_bytes(records[i::3])) for i in range(3)]
    common = dict(split_by_domain="meta.pile_set_name", append_eod=True, block_bytes=700)
    run(tmp_path, sp_model, inputs, name="w1", workers=1, **common)
    run(tmp_path, sp_model, inputs, name="w2", workers=2, **common)
    run(tmp_path, sp_model, inputs, name="p2", workers=2, partitions=2, **common)
    names = sorted(os.listdir(tmp_path / "w1"))
    assert len(names) == 5  # 2 domains x (.bin, .idx) + manifest
    for other in ("w2", "p2"):
        assert sorted(os.listdir(tmp_path / other)) == names
        match, mismatch, errors = filecmp.cmpfiles(tmp_path / "w1", tmp_path / other, names, shallow=False)
        assert (mismatch, errors) == ([], [])


def test_merge_datasets(tmp_path, sp_model):
    records = documents(30)
    a = write(str(tmp_path / "a.jsonl"), jsonl_bytes(records[:10]))
    b = write(str(tmp_path / "b.jsonl"), jsonl_bytes(records[10:]))
    _, [pa] = run(tmp_path, sp_model, [a], name="a")
    _, [pb] = run(tmp_path, sp_model, [b], name="b")
    _, [pab] = run(tmp_path, sp_model, [a, b], name="ab")
    from megatron_mile.data.indexed import merge_datasets

    writer = merge_datasets([pa, pb], str(tmp_path / "merged"))
    assert writer.documents == 30
    assert read_docs(str(tmp_path / "merged")) == read_docs(pab)
    assert filecmp.cmp(str(tmp_path / "merged.bin"), pab + ".bin", shallow=False)
    assert filecmp.cmp(str(tmp_path / "merged.idx"), pab + ".idx", shallow=False)


GOOD = {"text": "a good document", "meta": {"pile_set_name": "ArXiv"}}
BAD_LINES = {
    "not JSON": b'{"text": "unterminated',
    "not a JSON object": b'["text"]',
    "missing key": b'{"body": "x", "meta": {"pile_set_name": "ArXiv"}}',
    "non-string text": b'{"text": 42, "meta": {"pile_set_name": "ArXiv"}}',
    "empty document": b'{"text": "   ", "meta": {"pile_set_name": "ArXiv"}}',
    "invalid UTF-8": b'{"text": "caf\xe9", "meta": {"pile_set_name": "ArXiv"}}',
    "missing domain": b'{"text": "no domain here"}',
}


def _bad_file(tmp_path, reason: str) -> str:
    lines = [json.dumps(GOOD).encode()] * 3 + [BAD_LINES[reason]] + [json.dumps(GOOD).encode()] * 2
    return write(str(tmp_path / "bad.jsonl.zst"), b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("reason", sorted(BAD_LINES))
def test_bad_line_skip_and_fail(tmp_path, sp_model, reason):
    path = _bad_file(tmp_path, reason)
    stats, written = run(tmp_path, sp_model, [path], split_by_domain="meta.pile_set_name")
    assert stats.documents == 5
    assert dict(stats.skipped) == {reason: 1}
    assert stats.locations[0].startswith(f"{path}:4: ")
    assert len(read_docs(str(tmp_path / "out" / "pile_ArXiv_text_document"))) == 5
    with pytest.raises(PreprocessError, match=rf"^{path}:4: "):
        run(tmp_path, sp_model, [path], name="fail", split_by_domain="meta.pile_set_name", on_error="fail")
    leftovers = os.listdir(tmp_path / "fail") if os.path.exists(tmp_path / "fail") else []
    assert leftovers == []  # nothing left behind, not even partial files


@pytest.mark.parametrize("ext", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_stream(tmp_path, sp_model, ext):
    records = documents(3000)  # several 128 KiB zstd blocks, so half a file holds whole lines
    data = jsonl_bytes(records)
    full = write(str(tmp_path / f"full{ext}"), data)
    with open(full, "rb") as f:
        compressed = f.read()
    path = str(tmp_path / f"cut{ext}")
    with open(path, "wb") as f:
        f.write(compressed[: len(compressed) // 2])
    stats, [prefix] = run(tmp_path, sp_model, [path], block_bytes=16384)
    kept = read_docs(prefix)
    tok = build_tokenizer(sp_model)
    # Every complete line before the cut is kept, in order, and exactly one loss is reported.
    assert 500 < len(kept) < 3000
    assert kept == [tok.tokenize(r["text"]) for r in records[: len(kept)]]
    assert dict(stats.skipped) == {"truncated or corrupt stream": 1}
    assert stats.locations == [f"{path}:{len(kept) + 1}: truncated {ext.rsplit('.', 1)[1]} stream"]
    with pytest.raises(PreprocessError, match=rf"^{path}:{len(kept) + 1}: truncated"):
        run(tmp_path, sp_model, [path], name="fail", on_error="fail")


def test_cli_exit_codes_and_messages(tmp_path, sp_model):
    path = _bad_file(tmp_path, "not JSON")
    tool = [sys.executable, os.path.join(REPO, "tools", "preprocess_data.py")]
    base = ["--tokenizer-model", sp_model, "--output-prefix", str(tmp_path / "cli" / "x"), "--quiet"]
    ok = subprocess.run(tool + ["--input", path] + base, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "documents: 5" in ok.stdout and "not JSON: 1" in ok.stdout and f"{path}:4:" in ok.stdout
    bad = subprocess.run(tool + ["--input", path, "--on-error", "fail"] + base, capture_output=True, text=True)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: {path}:4: not JSON (Unterminated string starting at, column 10)"]
    missing = subprocess.run(tool + ["--input", str(tmp_path / "nope*.jsonl")] + base, capture_output=True, text=True)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"error: --input {tmp_path / 'nope*.jsonl'}: no such file"
    empty = subprocess.run(tool + ["--input", write(str(tmp_path / "empty.jsonl"), b"")] + base, capture_output=True,
                           text=True)
    assert (empty.returncode, empty.stdout, empty.stderr) == (1, "", "error: no documents written: the input is empty\n")
    directory = subprocess.run(tool + ["--input", str(tmp_path)] + base, capture_output=True, text=True)
    assert directory.returncode == 1
    assert directory.stderr.strip() == f"error: --input {tmp_path}: is a directory; pass a glob such as " \
                                       f"{tmp_path}/*.jsonl.zst"


@pytest.mark.parametrize("lines,why", [
    ([], "the input is empty"),
    ([b"", b"  "], "the input holds only blank lines"),
    ([BAD_LINES["missing key"], BAD_LINES["not JSON"], BAD_LINES["missing key"]],
     "every line was skipped (missing key: 2, not JSON: 1), the first at {path}:1: missing key 'text'"),
])
@pytest.mark.parametrize("domains", [None, "meta.pile_set_name"], ids=["plain", "by_domain"])
def test_no_document_written_is_an_error_and_leaves_nothing(tmp_path, sp_model, lines, why, domains):
    path = write(str(tmp_path / "in.jsonl"), b"".join(line + b"\n" for line in lines))
    with pytest.raises(PreprocessError) as err:
        run(tmp_path, sp_model, [path], split_by_domain=domains)
    assert str(err.value) == f"no documents written: {why.format(path=path)}"
    assert list(tmp_path.glob("out/*")) == []


def test_train_tokenizer_cli(tmp_path):
    corpus = write(str(tmp_path / "c.jsonl.zst"), jsonl_bytes(documents(300)))
    tool = [sys.executable, os.path.join(REPO, "tools", "train_tokenizer.py"), "--input", corpus,
            "--vocab-size", "320", "--threads", "1"]
    models = []
    for name in ("a", "b"):
        out = subprocess.run(tool + ["--model-prefix", str(tmp_path / name / "tok")], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        models.append(str(tmp_path / name / "tok.model"))
    assert filecmp.cmp(*models, shallow=False)  # deterministic, whatever the output directory
    tok = build_tokenizer(models[0])
    assert (tok.vocab_size, tok.bos, tok.eod) == (320, 1, 2)
    text = "code:\n    indented  twice\t1234 ünïcode ☃"
    assert tok.detokenize(tok.tokenize(text)) == text  # whitespace kept, unseen chars via byte fallback
    assert len(open(str(tmp_path / "a" / "tok.vocab"), encoding="utf-8").read().splitlines()) == 320
