"""Blends, weights, megatron-core datasets and tokenizer loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", module=r"megatron\.core")

from data_fixtures import documents, jsonl_bytes, train_hf_tokenizer, train_sentencepiece, write

from megatron_mile.data import build_pretraining_datasets, build_tokenizer, load_blend
from megatron_mile.data.blend import make_blend, write_blend
from megatron_mile.data.indexed import AtomicDatasetWriter
from megatron_mile.data.preprocess import PreprocessConfig, preprocess
from megatron_mile.data.tokenizer import HuggingFaceTokenizer, SentencePieceTokenizer, infer_tokenizer_type

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two preprocessed domains (600 documents each) with their manifest."""
    root = tmp_path_factory.mktemp("blend")
    sp = train_sentencepiece(str(root / "sp.model"))
    path = write(str(root / "in.jsonl.zst"), jsonl_bytes(documents(1200)))
    config = PreprocessConfig(inputs=[path], output_prefix=str(root / "pile"), tokenizer_model=sp,
                              split_by_domain="meta.pile_set_name", append_eod=True, quiet=True)
    preprocess(config)
    return root, sp, str(root / "pile_text_manifest.json")


def _weights(root, content: dict) -> str:
    path = str(root / "w.json")
    with open(path, "w") as f:
        json.dump(content, f)
    return path


def test_two_domain_blend_samples_in_configured_proportions(corpus, tmp_path, caplog):
    root, sp, manifest = corpus
    weights = _weights(tmp_path, {"train_domain_weights": {"ArXiv": 3.0, "Gutenberg (PG-19)": 1.0},
                                  "eval_domain_weights": {"ArXiv": 1.0, "Gutenberg (PG-19)": 1.0}})
    write_blend(make_blend(manifest, weights), str(tmp_path / "blend.json"))
    blend = load_blend([str(tmp_path / "blend.json")])
    assert blend.train_weights == pytest.approx([0.75, 0.25])
    assert sorted(blend.domains) == ["ArXiv", "Gutenberg (PG-19)"]
    tok = build_tokenizer(sp)
    ds = build_pretraining_datasets(blend, tok, seq_length=32, seed=7, train_samples=4000, valid_samples=200,
                                    test_samples=0, split="90,10,0")
    assert ds.test is None
    # dataset_index: which domain megatron-core's BlendedDataset draws each sample from.
    train_share = np.bincount(ds.train.dataset_index, minlength=2) / len(ds.train.dataset_index)
    valid_share = np.bincount(ds.valid.dataset_index, minlength=2) / len(ds.valid.dataset_index)
    assert train_share == pytest.approx([0.75, 0.25], abs=0.01)
    assert valid_share == pytest.approx([0.5, 0.5], abs=0.02)
    sample = ds.train[0]
    assert sample["tokens"].shape == (32,) and sample["labels"].shape == (32,)
    assert (sample["tokens"][1:] == sample["labels"][:-1]).all()
    assert set(ds.domain_valid) == {"ArXiv", "Gutenberg (PG-19)"}
    assert all(len(v) >= 200 for v in ds.domain_valid.values())
    # Same seed, same order; another seed, another order.
    again = build_pretraining_datasets(blend, tok, 32, 7, 4000, 200, 0, split="90,10,0")
    other = build_pretraining_datasets(blend, tok, 32, 8, 4000, 200, 0, split="90,10,0")
    first = [ds.train[i]["tokens"].tolist() for i in range(5)]
    assert first == [again.train[i]["tokens"].tolist() for i in range(5)]
    assert first != [other.train[i]["tokens"].tolist() for i in range(5)]
    # Built without a cache path, as a run without --save does: megatron-core's notice about it is
    # dropped (the trainer says it once, at INFO).
    assert "path_to_cache" not in caplog.text


def test_domain_validation_is_held_out_from_training(corpus):
    root, sp, _ = corpus
    prefix = str(root / "pile_ArXiv_text_document")
    blend = load_blend([prefix])
    ds = build_pretraining_datasets(blend, build_tokenizer(sp), 16, 1, 100, 10, 0, split="80,20,0")
    assert blend.domains == {}  # a plain list has no domains
    train_docs = set(ds.train.document_index.tolist())
    valid_docs = set(ds.valid.document_index.tolist())
    assert train_docs and valid_docs and not train_docs & valid_docs
    assert max(train_docs) < min(valid_docs) == 480


def test_megatron_list_parsing(corpus):
    root, _, _ = corpus
    a, b = str(root / "pile_ArXiv_text_document"), str(root / "pile_Gutenberg_PG-19_text_document")
    blend = load_blend(["0.3", a, "0.7", b])
    assert blend.train_prefixes == [a, b] and blend.train_weights == pytest.approx([0.3, 0.7])
    assert load_blend([a, b]).train_weights is None
    with pytest.raises(ValueError, match="weight prefix"):
        load_blend(["0.3", a, b])


def test_blend_errors_are_one_clear_line(corpus, tmp_path):
    root, _, manifest = corpus
    with pytest.raises(ValueError, match=r"^--data-path: dataset '.*nope' not found") as err:
        load_blend([str(root / "nope")])
    assert "\n" not in str(err.value)
    import megatron.core.datasets.indexed_dataset as idx  # an empty (zero-token) dataset

    writer = AtomicDatasetWriter(str(tmp_path / "empty"), np.uint16)
    writer.finalize()
    assert idx.IndexedDataset.exists(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="is empty"):
        load_blend([str(tmp_path / "empty")])
    with pytest.raises(ValueError, match=r"pile_sampling_rates.json: weights name domain\(s\) with no data in "
                                         r".*: BookCorpus2, Books3"):
        make_blend(manifest, "pile")


def test_unweighted_domain_gets_mean_weight(corpus, tmp_path, caplog):
    _, _, manifest = corpus
    blend = make_blend(manifest, _weights(tmp_path, {"ArXiv": 2.0}))
    assert blend["train"]["weights"] == pytest.approx([0.5, 0.5])
    # Once: the flat weights file leaves the domain out of the train and the eval blend alike.
    assert [r.getMessage() for r in caplog.records] == [f"{tmp_path}/w.json: no train or eval weight for "
                                                        "Gutenberg (PG-19); using the mean weight 2"]
    assert make_blend(manifest)["train"]["weights"] == pytest.approx([0.5, 0.5])


def test_pile_sampling_rates_config():
    with open(os.path.join(REPO, "megatron_mile", "configs", "pile_sampling_rates.json")) as f:
        rates = json.load(f)
    assert len(rates["train_domain_weights"]) == 22 == len(rates["eval_domain_weights"])
    assert rates["train_domain_weights"]["PubMed Central"] == pytest.approx(0.2823030650615692)
    assert rates["eval_domain_weights"]["Enron Emails"] == pytest.approx(0.0029569293837994337)


def test_tokenizer_type_inference_and_errors(corpus, tmp_path):
    _, sp, _ = corpus
    hf_dir = train_hf_tokenizer(str(tmp_path / "hf"))
    assert infer_tokenizer_type(sp) == "sentencepiece" and infer_tokenizer_type(hf_dir) == "huggingface"
    sp_tok, hf_tok = build_tokenizer(sp), build_tokenizer(hf_dir)
    assert isinstance(sp_tok, SentencePieceTokenizer) and isinstance(hf_tok, HuggingFaceTokenizer)
    assert (sp_tok.vocab_size, sp_tok.bos, sp_tok.eod) == (300, 1, 2)
    assert (hf_tok.bos, hf_tok.eod) == (0, 1) and hf_tok.vocab_size == len(hf_tok.vocab)
    text = "Document 3: alpha beta\n    indented line é"
    assert sp_tok.detokenize(sp_tok.tokenize(text)) == text
    assert hf_tok.detokenize(hf_tok.tokenize(text)) == text
    with pytest.raises(ValueError, match="tokenizer not found: '.*missing.model'"):
        build_tokenizer(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        build_tokenizer(os.path.join(hf_dir, "tokenizer_config.json"))
    with pytest.raises(ValueError, match="needs a .model file"):
        build_tokenizer(hf_dir, "sentencepiece")


def test_make_blend_cli(corpus, tmp_path):
    _, _, manifest = corpus
    tool = [sys.executable, os.path.join(REPO, "tools", "make_blend.py"), "--manifest", manifest]
    ok = subprocess.run(tool + ["--output", str(tmp_path / "b.json")], capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == str(tmp_path / "b.json"), ok.stderr
    with open(tmp_path / "b.json") as f:
        assert json.load(f)["train"]["prefixes"] == [os.path.relpath(
            os.path.join(os.path.dirname(manifest), p), tmp_path) for p in
            ["pile_ArXiv_text_document", "pile_Gutenberg_PG-19_text_document"]]
    bad = subprocess.run(tool + ["--weights", "pile", "--output", str(tmp_path / "c.json")], capture_output=True,
                         text=True)
    assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith("error: ") and not os.path.exists(tmp_path / "c.json")
