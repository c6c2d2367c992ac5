"""megatron-mile-buckets: token counts and buckets on hand-written data whose buckets are known, then
two tiny runs scored against a float64 reference computed here from their Hugging Face exports.

The reference never calls the analysis' counting or scoring code: it counts the training split
document by document, buckets with the rule written out below, takes the validation samples from
the trainer's own dataset builder and computes CE and entropy from transformers' logits in float64.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from training_utils import REPO, train_command, train_env

from megatron_mile.data import build_pretraining_datasets, build_tokenizer, load_blend
from megatron_mile.evaluation import frequency
from megatron_mile.evaluation.bucket_analysis import training_counts

BUCKETS = ("high", "medium", "low", "unseen")
CONVERTER = os.path.join(REPO, "checkpoint_conversion", "convert_to_hf.py")
SEQ = 32  # training_utils' --seq-length
MAX_TOKENS = 256  # 8 samples per validation set: fewer than the demo's validation splits hold
SEED = 11  # training_utils' --seed


def _write_dataset(prefix: str, documents: list[list[int]]) -> str:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for doc in documents:
        builder.add_document(np.array(doc, dtype=np.uint16), [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix


def _documents(train_counts: dict[int, int], lengths: list[int], held_out: list[list[int]]) -> list[list[int]]:
    """Training documents holding exactly ``train_counts`` (shuffled, cut at ``lengths``), then ``held_out``."""
    tokens = np.random.default_rng(0).permutation([t for t, n in train_counts.items() for _ in range(n)]).tolist()
    assert sum(lengths) == len(tokens)
    cuts = np.cumsum([0] + lengths)
    return [tokens[a:b] for a, b in zip(cuts[:-1], cuts[1:])] + held_out


# Two domains of 10 documents; --split 8,2,0 trains on the first 8 of each. Tokens 14 and 15 occur
# only in the held-out documents, so they are unseen in training.
VOCAB = 16
TRAIN_A = {3: 40, 5: 40, 1: 10, 7: 5, 2: 3, 9: 2}
TRAIN_B = {4: 50, 6: 50}
DOCS_A = _documents(TRAIN_A, [20, 5, 15, 10, 12, 8, 18, 12], held_out=[[15, 15, 3], [15]])
DOCS_B = _documents(TRAIN_B, [30, 10, 10, 10, 10, 10, 10, 10], held_out=[[14, 4], [14]])


def reference_frequencies(documents_per_domain: list[list[list[int]]], train_documents: list[int],
                          weights: list[float] | None, vocab_size: int) -> np.ndarray:
    """float64 ``Σ_d w_d c_d / N_d`` from a plain loop over the training documents; raw shares without weights."""
    counts = np.zeros((len(documents_per_domain), vocab_size))
    for d, documents in enumerate(documents_per_domain):
        for doc in documents[: train_documents[d]]:
            for token in doc:
                counts[d, token] += 1
    if weights is None:
        return counts.sum(0) / counts.sum()
    return sum(w * c / c.sum() for w, c in zip(weights, counts)) / sum(weights)


def reference_buckets(freq: np.ndarray, cutoffs: tuple[float, float]) -> np.ndarray:
    """The documented rule, class by class: S = share of strictly more frequent tokens;
    high S < c1, medium S < c2, low otherwise, unseen f = 0 (1e-9 tolerance at the cutoffs)."""
    buckets = np.full(len(freq), 3)
    before = 0.0
    for value in sorted(set(freq[freq > 0].tolist()), reverse=True):
        members = freq == value
        buckets[members] = 0 if before < cutoffs[0] - 1e-9 else 1 if before < cutoffs[1] - 1e-9 else 2
        before += freq[members].sum()
    return buckets


def _ids(buckets: np.ndarray) -> dict[str, list[int]]:
    return {name: np.flatnonzero(buckets == b).tolist() for b, name in enumerate(BUCKETS)}


def test_counts_and_buckets_of_known_data(tmp_path):
    a = _write_dataset(str(tmp_path / "a"), DOCS_A)
    b = _write_dataset(str(tmp_path / "b"), DOCS_B)
    spans = [frequency.dataset_span(p, frequency.split_bounds("8,2,0", 0)) for p in (a, b)]
    assert [(s.begin, s.end, s.tokens) for s in spans] == [(0, 8, 100), (0, 8, 100)]
    # Blocks of 16 and chunks of 7 tokens put boundaries inside documents; 2 shards are summed.
    counts = sum(frequency.count_tokens(spans, VOCAB, shard=(r, 2), block_tokens=16, chunk_tokens=7) for r in (0, 1))
    assert counts[:, VOCAB].tolist() == [0, 0]  # no id outside the vocabulary
    assert dict(zip(*np.nonzero(counts[0, :VOCAB]), counts[0][counts[0] > 0])) == TRAIN_A
    np.testing.assert_array_equal(frequency.count_tokens(spans, VOCAB, workers=2, block_tokens=16), counts)

    # Blend-weighted: f = 0.3 (3, 5), 0.125 (4, 6), 0.075 (1), 0.0375 (7), 0.0225 (2), 0.015 (9).
    weighted = load_blend(["3", a, "1", b])
    freq = frequency.blend_frequencies(counts[:, :VOCAB], weighted.train_weights)
    np.testing.assert_allclose(freq, reference_frequencies([DOCS_A, DOCS_B], [8, 8], [3, 1], VOCAB), rtol=1e-15)
    got = frequency.assign_buckets(freq, (0.80, 0.95))
    assert _ids(got) == {"high": [3, 4, 5, 6], "medium": [1, 7], "low": [2, 9],
                         "unseen": [0, 8, 10, 11, 12, 13, 14, 15]}
    np.testing.assert_array_equal(got, reference_buckets(freq, (0.80, 0.95)))
    # Classes ending exactly on a cutoff: S(4, 6) = 0.6 and S(1) = 0.85 open the next bucket.
    got = frequency.assign_buckets(freq, (0.60, 0.85))
    assert _ids(got)["high"] == [3, 5] and _ids(got)["medium"] == [4, 6] and _ids(got)["low"] == [1, 2, 7, 9]
    np.testing.assert_array_equal(got, reference_buckets(freq, (0.60, 0.85)))
    table = frequency.bucket_table(freq, frequency.assign_buckets(freq, (0.80, 0.95)))
    assert {k: v["ids"] for k, v in table.items()} == {"high": 4, "medium": 2, "low": 2, "unseen": 8}
    np.testing.assert_allclose([table[k]["share"] for k in BUCKETS], [0.85, 0.1125, 0.0375, 0.0], rtol=1e-12)

    # No weights (Megatron-LM's plain list): raw occurrences. 4 and 6 (0.25 each) and 3 and 5 (0.2)
    # are high although 80% is reached inside the 3/5 class; S(7) = 0.95 exactly makes 7 low.
    freq = frequency.blend_frequencies(counts[:, :VOCAB], load_blend([a, b]).train_weights)
    np.testing.assert_allclose(freq, reference_frequencies([DOCS_A, DOCS_B], [8, 8], None, VOCAB), rtol=1e-15)
    got = frequency.assign_buckets(freq, (0.80, 0.95))
    assert _ids(got)["high"] == [3, 4, 5, 6] and _ids(got)["medium"] == [1] and _ids(got)["low"] == [2, 7, 9]
    np.testing.assert_array_equal(got, reference_buckets(freq, (0.80, 0.95)))


def test_counts_cache_is_hit_then_invalidated_by_the_split(tmp_path):
    a = _write_dataset(str(tmp_path / "a"), DOCS_A)
    span = frequency.dataset_span(a, frequency.split_bounds("8,2,0", 0))
    first = training_counts([span], VOCAB, "tok", str(tmp_path / "cache"))[0]
    assert dict(zip(*np.nonzero(first), first[first > 0])) == TRAIN_A
    key = frequency.cache_key(span, VOCAB, "tok")
    path = frequency.cache_path(span, key, str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]
    # Doctor the cached counts: the second call must return them, so it read the cache.
    frequency.save_counts(path, key, first + 1)
    np.testing.assert_array_equal(training_counts([span], VOCAB, "tok", str(tmp_path / "cache"))[0], first + 1)
    # Another split is another sequence range: recounted (all 10 documents), cached beside it.
    whole = frequency.dataset_span(a, frequency.split_bounds("10,0,0", 0))
    counted = training_counts([whole], VOCAB, "tok", str(tmp_path / "cache"))[0]
    assert counted[15] == 3 and counted[3] == TRAIN_A[3] + 1 and counted.sum() == 104
    # So is another tokenizer.
    assert frequency.cache_path(span, frequency.cache_key(span, VOCAB, "other"), None) != path
    assert len(os.listdir(tmp_path / "cache")) == 2


# ------------------------------------------------------------------ two tiny runs


def _buckets_command(*args: str, nproc: int = 0) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc else [sys.executable]
    return [*launcher, "-m", "megatron_mile.buckets", *args]


def _run_all(commands: dict[str, list[str]]) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands side by side (the machine has two cores) and check that every one succeeds."""
    procs = {name: subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=train_env())
             for name, cmd in commands.items()}
    done = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{name} failed:\n{stdout[-3000:]}\n{stderr[-5000:]}"
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return done


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def scored(demo, tmp_path_factory) -> dict:
    """A CE and a MiLe run (4 steps at a large constant lr, so the models are far from uniform),
    both converted to HF, then scored single-process (with the MiLe export as a third model) and
    under torchrun at TP=2."""
    root = tmp_path_factory.mktemp("buckets")
    fast = ("--lr", "0.02", "--min-lr", "0.02", "--lr-decay-style", "constant")
    runs = {loss: str(root / loss) for loss in ("ce", "mile")}
    hf = {loss: str(root / f"hf_{loss}") for loss in runs}
    _run_all({loss: train_command(demo, 1, save, "--loss", loss, *fast, iters=4) for loss, save in runs.items()})
    _run_all({loss: [sys.executable, CONVERTER, "--load", runs[loss], "--output", hf[loss]] for loss in runs})
    data = ("--data-path", demo["blend"], "--tokenizer-model", demo["tokenizer"], "--max-tokens", str(MAX_TOKENS))
    out = {"single": str(root / "out"), "tp2": str(root / "out_tp2")}
    done = _run_all({
        # 3 per micro-batch: the 8 samples end in a padded micro-batch whose padding must not count.
        "single": _buckets_command(runs["ce"], runs["mile"], hf["mile"], "--labels", "ce", "mile", "hf_mile", *data,
                                   "--micro-batch-size", "3", "--output-dir", out["single"]),
        # Its own counts cache, so the two ranks share the counting (one dataset each).
        "tp2": _buckets_command(runs["ce"], runs["mile"], "--labels", "ce", "mile", *data,
                                "--tensor-model-parallel-size", "2", "--counts-cache-dir", str(root / "counts_tp2"),
                                "--output-dir", out["tp2"], nproc=2),
    })
    return {**runs, "hf": hf, "out": out["single"], "root": root, "stdout": done["single"].stdout,
            "result": _read_json(os.path.join(out["single"], "buckets.json")),
            "tp2": _read_json(os.path.join(out["tp2"], "buckets.json"))}


@pytest.fixture(scope="module")
def reference_buckets_of_demo(demo) -> tuple[np.ndarray, dict]:
    """float64 bucket of every token id and the bucket table, from the demo's training split."""
    with open(demo["blend"]) as f:
        weights = json.load(f)["train"]["weights"]
    documents = []
    for prefix in load_blend([demo["blend"]]).train_prefixes:
        dataset = IndexedDataset(prefix)
        documents.append([dataset[i].tolist() for i in range(len(dataset))])
    train_docs = [round(0.969 * len(docs)) for docs in documents]  # --split 969,30,1, megatron's rounding
    freq = reference_frequencies(documents, train_docs, weights, build_tokenizer(demo["tokenizer"]).vocab_size)
    buckets = reference_buckets(freq, (0.80, 0.95))
    table = {name: {"ids": int((buckets == b).sum()), "share": float(freq[buckets == b].sum())}
             for b, name in enumerate(BUCKETS)}
    return buckets, table


def _reference_scores(demo, buckets: np.ndarray, hf_dir: str) -> dict:
    """float64 per-bucket scores of an HF model on the trainer's validation samples (blend, then domains)."""
    from transformers import LlamaForCausalLM

    tokenizer = build_tokenizer(demo["tokenizer"])
    samples = MAX_TOKENS // SEQ
    sets = build_pretraining_datasets(load_blend([demo["blend"]]), tokenizer, SEQ, SEED, 0, samples, 0,
                                      split="969,30,1", domain_valid_samples=samples)
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()

    def score(dataset) -> dict:
        ce_sum, h_sum, n = np.zeros(4), np.zeros(4), np.zeros(4)
        with torch.no_grad():
            for i in range(samples):
                sample = dataset[i]
                logits = model(input_ids=torch.as_tensor(sample["tokens"])[None]).logits[0, :, :tokenizer.vocab_size]
                log_p = torch.log_softmax(logits, -1)
                labels = torch.as_tensor(sample["labels"])
                ce = -log_p[torch.arange(SEQ), labels].numpy()
                entropy = -(log_p.exp() * log_p).sum(-1).numpy()
                for target, c, h in zip(labels.tolist(), ce, entropy):
                    b = buckets[target]
                    ce_sum[b] += c
                    h_sum[b] += h
                    n[b] += 1
        out = {"overall": {"ppl": math.exp(ce_sum.sum() / n.sum()), "tokens": int(n.sum())}}
        for b, name in enumerate(BUCKETS):
            out[name] = {"ppl": math.exp(ce_sum[b] / n[b]) if n[b] else None, "tokens": int(n[b]),
                         "entropy": h_sum[b] / n[b] if n[b] else None}
        return out

    return {"overall": score(sets.valid), **{d: score(ds) for d, ds in sets.domain_valid.items()}}


def _assert_scores_close(got: dict, want: dict, rtol: float) -> None:
    for row in ("overall", *BUCKETS):
        assert got[row]["tokens"] == want[row]["tokens"], row
        for stat in ("ppl", "entropy"):
            if stat in want[row] and want[row][stat] is None:
                assert got[row][stat] is None, (row, stat)
            elif stat in want[row]:
                np.testing.assert_allclose(got[row][stat], want[row][stat], rtol=rtol, err_msg=f"{row} {stat}")


def _assert_runs_close(got: dict, want: dict, rtol: float) -> None:
    _assert_scores_close(got, want, rtol)
    assert sorted(got["domains"]) == sorted(want["domains"])
    for domain, scores in want["domains"].items():
        _assert_scores_close(got["domains"][domain], scores, rtol)


def test_two_runs_match_a_float64_reference(demo, scored, reference_buckets_of_demo):
    result = scored["result"]
    assert list(result["runs"]) == ["ce", "mile", "hf_mile"]
    buckets, table = reference_buckets_of_demo
    for name in BUCKETS:
        assert result["buckets"][name]["ids"] == table[name]["ids"], name
        np.testing.assert_allclose(result["buckets"][name]["share"], table[name]["share"], rtol=1e-12)
    assert table["unseen"]["ids"] > 0 and table["low"]["ids"] > 0
    for label in ("ce", "mile"):
        reference = _reference_scores(demo, buckets, scored["hf"][label])
        run = result["runs"][label]
        assert run["overall"]["tokens"] == MAX_TOKENS
        _assert_runs_close(run, {**reference.pop("overall"), "domains": reference}, rtol=2e-6)
        # Trained away from uniform, so the buckets' perplexities differ widely.
        assert run["high"]["ppl"] < 0.5 * run["low"]["ppl"]
    assert abs(result["runs"]["ce"]["overall"]["ppl"] / result["runs"]["mile"]["overall"]["ppl"] - 1) > 1e-5
    for name in ("buckets.json", "buckets.md", "buckets.png"):
        assert os.path.getsize(os.path.join(scored["out"], name)) > 0
    assert "| high |" in scored["stdout"] and "mile vs ce" in scored["stdout"]


def test_hf_directory_scores_like_its_run(scored):
    runs = scored["result"]["runs"]
    _assert_runs_close(runs["hf_mile"], runs["mile"], rtol=1e-5)


def test_tensor_parallel_scoring_equals_single_process(scored):
    tp2, single = scored["tp2"], scored["result"]
    assert tp2["buckets"] == single["buckets"]  # counted by two ranks, one dataset each, and summed
    assert len(os.listdir(scored["root"] / "counts_tp2")) == 2
    for label in ("ce", "mile"):
        _assert_runs_close(tp2["runs"][label], single["runs"][label], rtol=1e-5)


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def bad_inputs(demo, scored) -> dict[str, str]:
    """A dataset with ids past the demo tokenizer, and an HF directory whose tokenizer is another one."""
    from data_fixtures import train_hf_tokenizer

    root = scored["root"] / "bad"
    root.mkdir()
    wide = _write_dataset(str(root / "wide"), [[5, 1000, 7]] * 40)
    other_hf = train_hf_tokenizer(str(root / "other_hf"))
    with open(os.path.join(other_hf, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "vocab_size": 400, "max_position_embeddings": SEQ}, f)
    return {"wide": wide, "other_hf": other_hf}


BAD_INPUTS = [
    (lambda s, b: [str(s["root"] / "missing")], "missing: no such directory"),
    (lambda s, b: [s["ce"], "--labels", "a", "b"], "--labels: 2 labels for 1 models"),
    (lambda s, b: [s["ce"], "--cutoffs", "0.95,0.80"], "--cutoffs: need two shares 0 < high < high+medium < 1"),
    (lambda s, b: [s["ce"], "--cutoffs", "most"], "--cutoffs: expected two comma-separated shares"),
    (lambda s, b: [s["ce"], "--max-tokens", "16"], "--max-tokens 16 is less than one sequence of 32 tokens"),
    (lambda s, b: [s["ce"], "--split", "90,10,0"], "--split 90,10,0: ce was trained with --split 969,30,1"),
    (lambda s, b: [s["ce"], "--tensor-model-parallel-size", "2"],
     "1 processes do not divide into --tensor-model-parallel-size 2"),
    (lambda s, b: [s["ce"], "--data-path", str(s["root"] / "nothing")], "nothing' not found"),
    (lambda s, b: [s["ce"], "--data-path", b["wide"]], "wide.bin: 40 token ids >= the tokenizer's vocabulary size 300"),
    (lambda s, b: [b["other_hf"]], "its tokenizer does not match --tokenizer-model (token 0 is"),
    (lambda s, b: [s["ce"], "--tokenizer-model", b["other_hf"]],
     "trained with a 300-token vocabulary, but --tokenizer-model has"),
    (lambda s, b: [s["ce"], "--output-dir", s["ce"] + "/latest_checkpointed_iteration.txt"],
     "exists and is not a directory"),
]


@pytest.mark.parametrize("make_args,message", BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_fails_in_one_line(demo, scored, bad_inputs, make_args, message, capsys):
    from megatron_mile.buckets import main

    args = make_args(scored, bad_inputs)
    defaults = {"--data-path": demo["blend"], "--tokenizer-model": demo["tokenizer"],
                "--output-dir": str(scored["root"] / "never")}
    args += [item for flag, value in defaults.items() if flag not in args for item in (flag, value)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megatron-mile-buckets: error: ") and message in err[0], err
    assert not os.path.exists(scored["root"] / "never")
