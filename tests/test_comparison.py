"""The loss comparison (megatron-mile-compare, make demo, examples/compare_losses.sh) and its held-out task.

One module corpus: two domains of multi-line documents (so that documents have next lines to ask
for), tokenized with the trainer's 300-piece test tokenizer, with one validation document that is
a copy of a training document.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

import data_fixtures
from training_utils import REPO

DOMAINS = ("Manuals", "Recipes")
PER_DOMAIN = 200
COPY = (10, 195)  # in the first domain, document 195 (held out) repeats document 10 (training)
SPLIT = "969,30,1"  # the trainer's default: documents 194-199 of each domain are held out
SEQ_LENGTH = 64


def _documents() -> list[dict]:
    """Alternating domains; document i of a domain has 3-7 lines naming it, so no two lines repeat."""
    words = data_fixtures.WORDS
    docs = []
    for i in range(PER_DOMAIN):
        for d, domain in enumerate(DOMAINS):
            n = COPY[0] if (d, i) == (0, COPY[1]) else i
            lines = [f"{domain} entry {n}"] + [f"  step {k}: {words[(n + 3 * k + d) % len(words)]} "
                                               f"{words[(2 * n + k) % len(words)]} for {n}" for k in range(2 + n % 5)]
            docs.append({"text": "\n".join(lines), "meta": {"pile_set_name": domain}})
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("comparison_data")
    path = data_fixtures.write(str(root / "corpus.jsonl"), data_fixtures.jsonl_bytes(_documents()))
    tokenizer = data_fixtures.train_sentencepiece(str(root / "tok.model"))
    prefix = str(root / "docs")
    subprocess.run([sys.executable, f"{REPO}/tools/preprocess_data.py", "--input", path, "--output-prefix", prefix,
                    "--tokenizer-model", tokenizer, "--split-by-domain", "meta.pile_set_name", "--append-eod",
                    "--quiet"], check=True)
    blend = str(root / "blend.json")
    subprocess.run([sys.executable, f"{REPO}/tools/make_blend.py", "--manifest", f"{prefix}_text_manifest.json",
                    "--output", blend], check=True)
    return {"blend": blend, "tokenizer": tokenizer, "root": str(root)}


def _training_texts(corpus) -> dict[str, dict[int, str]]:
    """Per domain dataset: {document index: text} of the training split, as the trainer's datasets hold it."""
    from megatron_mile.data import build_pretraining_datasets, build_tokenizer, load_blend

    tokenizer = build_tokenizer(corpus["tokenizer"])
    datasets = build_pretraining_datasets(load_blend([corpus["blend"]]), tokenizer, SEQ_LENGTH, seed=1,
                                          train_samples=8, valid_samples=0, test_samples=0, split=SPLIT)
    out = {}
    for dataset in datasets.train.datasets:  # one GPTDataset per domain
        out[dataset.dataset_path] = {int(d): tokenizer.detokenize(dataset.dataset[int(d)][:-1])
                                     for d in dataset.indices}
    return out


def test_heldout_task_is_deterministic_held_out_and_states_chance(corpus, tmp_path):
    from megatron_mile.comparison.heldout_task import TASK, TaskSettings, write_task

    settings = TaskSettings(split=SPLIT, seq_length=SEQ_LENGTH, items_per_domain=12, choices=3, seed=5)
    info = write_task(str(tmp_path / "a"), corpus["blend"], corpus["tokenizer"], settings)
    write_task(str(tmp_path / "b"), corpus["blend"], corpus["tokenizer"], settings)
    items = [json.loads(line) for line in open(tmp_path / "a" / f"{TASK}.jsonl")]
    assert open(tmp_path / "b" / f"{TASK}.jsonl").read() == open(tmp_path / "a" / f"{TASK}.jsonl").read()
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]  # no staging directory left behind

    # Chance accuracy is 1/choices, and the true line sits at every position about equally often.
    assert info["chance_accuracy"] == pytest.approx(1 / 3) and info["items"] == len(items) == 24
    assert "chance accuracy 0.3333" in open(tmp_path / "a" / f"{TASK}.yaml").read()
    assert all(len(item["choices"]) == 3 and len(set(item["choices"])) == 3 for item in items)
    assert {item["label"] for item in items} == {0, 1, 2}

    # Held out: no document of the training split, and no item that is training text.
    training = _training_texts(corpus)
    by_domain = {os.path.basename(info["domains"][d]["dataset"]): d for d in DOMAINS}
    for path, texts in training.items():
        domain = by_domain[os.path.basename(path)]
        used = {item["document"] for item in items if item["domain"] == domain}
        assert used and not used & set(texts)
        for item in (i for i in items if i["domain"] == domain):
            answer = item["choices"][item["label"]]
            assert not any(item["context"] + answer in text for text in texts.values())
    assert info["domains"][DOMAINS[0]]["dropped_copies_of_training_documents"] == 1
    assert COPY[1] not in info["domains"][DOMAINS[0]]["documents_used"]

    # Each item: whole lines of its document, then its true next line; distractors are lines of
    # other held-out documents of the same domain.
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron_mile.data import build_tokenizer

    tokenizer = build_tokenizer(corpus["tokenizer"])
    held_out = {}
    for domain in DOMAINS:
        dataset = IndexedDataset(info["domains"][domain]["dataset"])
        held_out[domain] = {d: tokenizer.detokenize(dataset[d][:-1]).split("\n") for d in range(194, 200)}
    for item in items:
        lines = held_out[item["domain"]][item["document"]]
        first = item["first_line"]
        end = first + item["context"].count("\n")
        assert item["context"] == "\n".join(lines[first:end]) + "\n"
        assert item["choices"][item["label"]] == lines[end]
        for k, choice in enumerate(item["choices"]):
            if k != item["label"]:
                assert any(choice in other for d, other in held_out[item["domain"]].items() if d != item["document"])


def test_unigram_validation_ce_against_float64_reference(corpus):
    """p(t) = mean over the two (equally weighted) domains of (c_d(t) + 1) / (N_d + V), on documents 194-199."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_mile.comparison.unigram import validation_cross_entropy

    got = validation_cross_entropy([corpus["blend"]], corpus["tokenizer"], SPLIT)
    vocab = 300
    prefixes = {d: os.path.join(corpus["root"], f"docs_{d}_text_document") for d in DOMAINS}

    def counts(prefix: str, documents: range) -> np.ndarray:
        dataset = IndexedDataset(prefix)
        return np.bincount(np.concatenate([dataset[i] for i in documents]), minlength=vocab).astype(np.float64)

    train = {d: counts(p, range(0, 194)) for d, p in prefixes.items()}  # 969/1000 of 200 documents
    valid = {d: counts(p, range(194, 200)) for d, p in prefixes.items()}
    p = sum(0.5 * (c + 1) / (c.sum() + vocab) for c in train.values())
    expected = {d: float(-(n * np.log(p)).sum() / n.sum()) for d, n in valid.items()}
    assert got == pytest.approx({"valid_logppl": sum(expected.values()) / 2,
                                 **{f"valid_logppl/{d}": v for d, v in expected.items()}}, rel=1e-12)

# --------------------------------------------------------------------------- the demo and the reproduction

ITERS = "2"
# The launchers' tiny settings, shrunk to a few iterations on the test corpus (later flags win):
# one evaluation and one checkpoint per run.
TRAINER_OVERRIDES = ("--seq-length 64 --micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --lr-warmup-iters 1 "
                     "--log-interval 1 --eval-interval 2 --eval-iters 1 --save-interval 2")
COMPARE_OVERRIDES = "--task-items-per-domain 4 --eval-batch-size 8 --buckets-max-tokens 2048"


def _launch(script: str, corpus, out: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": REPO, "PYTHONWARNINGS": "ignore",
                   "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                   "DATA": corpus["blend"], "TOKENIZER": corpus["tokenizer"], "OUT": out, "ITERS": ITERS,
                   "EXTRA_ARGS": TRAINER_OVERRIDES, "COMPARE_ARGS": COMPARE_OVERRIDES, **env}
    done = subprocess.run(["bash", os.path.join(REPO, "examples", script)], capture_output=True, text=True,
                          env=environment, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return done


def _mtimes(root: str) -> dict[str, int]:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, files in os.walk(root) for f in files}


@pytest.fixture(scope="module")
def demo(corpus, tmp_path_factory) -> dict:
    """examples/demo.sh twice on the test corpus; the second run should only reuse."""
    out = str(tmp_path_factory.mktemp("compare") / "demo")
    first = _launch("demo.sh", corpus, out)
    before = _mtimes(out)
    second = _launch("demo.sh", corpus, out)
    return {"out": out, "first": first.stdout, "second": second.stdout, "before": before, "after": _mtimes(out)}


def _table(markdown: str) -> tuple[list[str], dict[str, list[str]]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return header, rows


def _numbers(cell: str) -> list[float]:
    return [float(part) for part in cell.replace("(one seed)", "").replace("(within seed spread)", "").split("±")
            if part.strip()]


def test_demo_table_pictures_and_numbers(demo):
    out = demo["out"]
    header, rows = _table(open(os.path.join(out, "comparison.md")).read())
    assert header == ["metric", "CE", "focal", "MiLe", "unigram", "MiLe − CE"]
    expected = ["final training CE", "validation log-ppl", *(f"validation log-ppl, {d}" for d in DOMAINS),
                "ppl, high-frequency tokens", "mean entropy, high-frequency tokens",
                "task heldout_next_line acc", "task heldout_next_line acc_norm"]
    assert set(expected) <= set(rows), list(rows)
    for name, cells in rows.items():
        for cell in cells[:3] + cells[4:]:
            values = _numbers(cell)
            assert values and all(math.isfinite(v) for v in values), (name, cell)
        assert bool(cells[3]) == name.startswith("validation log-ppl")  # the unigram column
    # Cells come from the trainer's log and lm-eval's own results file.
    with open(os.path.join(out, "runs", "ce_seed1234", "metrics.jsonl")) as f:
        last_eval = [r for r in map(json.loads, f) if r["type"] == "eval"][-1]
    assert last_eval["iteration"] == int(ITERS)
    assert _numbers(rows["validation log-ppl"][0]) == [pytest.approx(last_eval["eval_loss"], rel=1e-3)]
    with open(os.path.join(out, "lm_eval", "mile_seed1234", "lm_eval", "mile_seed1234.json")) as f:
        lm_eval = json.load(f)["results"]["heldout_next_line"]
    assert _numbers(rows["task heldout_next_line acc"][2]) == [pytest.approx(lm_eval["acc,none"], abs=5e-5),
                                                               pytest.approx(lm_eval["acc_stderr,none"], abs=5e-5)]
    for png in ("compare.png", "lm_eval.png", os.path.join("buckets", "buckets.png")):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", png
    # Two runs at TP=2 and focal at PP=2, as the trainer logged them.
    layouts = {label: json.load(open(os.path.join(out, "runs", label, "compare_run.json")))["layout"]
               for label in ("ce_seed1234", "focal_seed1234", "mile_seed1234")}
    assert layouts == {"ce_seed1234": "tp", "focal_seed1234": "pp", "mile_seed1234": "tp"}
    assert "TP 1 PP 2" in demo["first"] and "TP 2 PP 1" in demo["first"]


def test_second_demo_reuses_every_step(demo):
    steps = ["task", *(f"{step} {loss}_seed1234" for step in ("train", "convert", "lm-eval", "buckets")
                       for loss in ("ce", "focal", "mile")), "unigram"]
    for step in steps:
        assert f"[{step}] done in" in demo["first"], step
        assert f"[{step}] done before" in demo["second"] and f"[{step}] done in" not in demo["second"], step
    assert "M parameters" not in demo["second"] and "converting" not in demo["second"]
    # Nothing a step made was written again: checkpoints, conversions, lm-eval results, markers.
    made = {p: t for p, t in demo["before"].items() if os.sep + "steps" + os.sep in p or os.sep + "runs" + os.sep in p
            or os.sep + "lm_eval" + os.sep in p or os.sep + "task" + os.sep in p}
    assert made and all(demo["after"][p] == t for p, t in made.items())


def test_reproduction_mean_and_std_over_seeds(demo, corpus):
    """compare_losses.sh, 2 losses x 2 seeds (the demo's seed-1234 CE and MiLe runs are reused)."""
    import numpy as np

    done = _launch("compare_losses.sh", corpus, demo["out"], LOSSES="ce mile", SEEDS="1234 1235", LAYOUT="tp",
                   NPROC="2")
    assert "[train ce_seed1234] done before" in done.stdout and "[train ce_seed1235] done in" in done.stdout
    out = demo["out"]
    results = {}
    for loss in ("ce", "mile"):
        for seed in (1234, 1235):
            with open(os.path.join(out, "results", f"{loss}_seed{seed}.json")) as f:
                results[loss, seed] = json.load(f)["metrics"]
    with open(os.path.join(out, "comparison.json")) as f:
        summary = json.load(f)
    assert summary["losses"] == ["ce", "mile"] and summary["seeds"] == [1234, 1235]
    metrics = [m for m in results["ce", 1234] if not m.endswith("_stderr")]
    assert set(summary["by_loss"]) == set(metrics)
    for metric in metrics:
        for loss in ("ce", "mile"):
            values = np.array([results[loss, seed][metric] for seed in (1234, 1235)], dtype=np.float64)
            cell = summary["by_loss"][metric][loss]
            assert cell["n"] == 2
            assert cell["mean"] == pytest.approx(values.mean(), rel=1e-12, abs=1e-15)
            assert cell["std"] == pytest.approx(values.std(ddof=1), rel=1e-9, abs=1e-15)
        paired = np.array([results["mile", s][metric] - results["ce", s][metric] for s in (1234, 1235)])
        diff = summary["mile_minus_ce"][metric]
        assert diff["mean"] == pytest.approx(paired.mean(), rel=1e-12, abs=1e-15)
        assert diff["std"] == pytest.approx(paired.std(ddof=1), rel=1e-9, abs=1e-15)
    # The table shows the same numbers, and says when a difference is within the seed spread.
    header, rows = _table(open(os.path.join(out, "comparison.md")).read())
    assert header == ["metric", "CE", "MiLe", "unigram", "MiLe − CE"]
    for metric, label in (("train_ce", "final training CE"), ("valid_logppl", "validation log-ppl")):
        ce = summary["by_loss"][metric]["ce"]
        assert _numbers(rows[label][0]) == [pytest.approx(ce["mean"], rel=1e-3), pytest.approx(ce["std"], rel=1e-3)]
        diff = summary["mile_minus_ce"][metric]
        assert rows[label][3].endswith("(within seed spread)") == (abs(diff["mean"]) <= diff["std"])
    assert "sample standard deviation (ddof=1)" in open(os.path.join(out, "comparison.md")).read()
