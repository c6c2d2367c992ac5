"""megatron-mile-eval on a TP=2 x PP=2 run: its numbers are lm-eval's own (the lm-eval CLI on the
converted directory), the conversion is cached, and bad input fails before any work, one line each.

One module fixture trains the run (the real trainer, 4 gloo ranks), writes a tiny local
multiple-choice task (pick a document's next word among other documents' words), builds
a random Hugging Face model, and runs megatron-mile-eval once on the run and the HF model, then
the lm-eval CLI once on the converted run; the tests share those results.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_fixtures import documents
from dist_utils import run_ranks
from training_utils import REPO, train, train_env

TASK = "tiny_continuation"
SEQ_LENGTH = "64"  # room for a one-shot prompt with the 300-piece test tokenizer
FLAGS = ["--tasks", TASK, "--num-fewshot", "1", "--batch-size", "4", "--device", "cpu"]


def _write_task(directory) -> str:
    """Each item: two words of an unseen document, its next word among two other documents' words."""
    directory.mkdir()
    docs = [d["text"].split(": ", 1)[1].split() for d in documents(1560)[1500:]]  # training used the first 1500
    items = []
    for i, words in enumerate(docs):
        others = [docs[(i + k) % len(docs)][2] for k in (1, 2)]
        choices = [" " + w for w in others]
        choices.insert(i % 3, " " + words[2])
        items.append({"context": " ".join(words[:2]), "choices": choices, "label": i % 3})
    for split, part in (("train", items[:10]), ("validation", items[10:])):
        with open(directory / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(item) + "\n" for item in part)
    (directory / f"{TASK}.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    train: {directory / "train.jsonl"}
    validation: {directory / "validation.jsonl"}
output_type: multiple_choice
training_split: train
validation_split: validation
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return str(directory)


def _random_hf_model(directory, tokenizer: str, vocab_size: int) -> str:
    """A randomly initialised Llama with the run's tokenizer, saved as an HF directory."""
    sys.path.insert(0, REPO)
    from checkpoint_conversion import hf_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    directory.mkdir()
    bos, eos = hf_tokenizer.export_tokenizer(tokenizer, None, str(directory), int(SEQ_LENGTH))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=int(SEQ_LENGTH), bos_token_id=bos,
                         eos_token_id=eos)
    LlamaForCausalLM(config).save_pretrained(str(directory))
    return str(directory)


def _env() -> dict[str, str]:
    return {**train_env(), "PYTHONPATH": REPO, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def evaluated(demo, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval")
    run = str(root / "run")
    train(demo, root, "run", 4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
          "--seq-length", SEQ_LENGTH, save=run)
    tasks = _write_task(root / "tasks")
    hf = _random_hf_model(root / "random_hf", demo["tokenizer"], vocab_size=300)
    out = str(root / "out")
    ours = subprocess.run([sys.executable, "-m", "megatron_mile.eval", run, hf, "--labels", "tp2pp2", "random",
                           *FLAGS, "--include-path", tasks, "--offline", "--output-dir", out],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert ours.returncode == 0, ours.stdout[-3000:] + ours.stderr[-5000:]
    converted = os.path.join(run, "hf", "iter_0000005")
    reference_out = str(root / "lm_eval_cli")
    theirs = subprocess.run([sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args",
                             f"pretrained={converted},dtype=auto", "--tasks", TASK, "--include_path", tasks,
                             "--num_fewshot", "1", "--batch_size", "4", "--device", "cpu",
                             "--output_path", reference_out], capture_output=True, text=True, env=_env(), timeout=600)
    assert theirs.returncode == 0, theirs.stderr[-5000:]
    [reference_file] = glob.glob(os.path.join(reference_out, "**", "results_*.json"), recursive=True)
    with open(reference_file) as f:
        reference = json.load(f)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    return {"run": run, "hf": hf, "tasks": tasks, "out": out, "converted": converted, "stdout": ours.stdout,
            "stderr": ours.stderr, "results": results, "reference": reference}


def test_scores_are_lm_eval_cli_scores(evaluated):
    reference = evaluated["reference"]["results"][TASK]
    ours = evaluated["results"]["runs"]["tp2pp2"][TASK]
    expected = {key.split(",")[0]: value for key, value in reference.items() if key.endswith(",none")}
    assert set(expected) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert ours == expected  # the same floats, not merely close
    assert evaluated["reference"]["n-shot"][TASK] == 1
    with open(os.path.join(evaluated["out"], "lm_eval", "tp2pp2.json")) as f:
        assert json.load(f)["results"][TASK] == reference  # lm-eval's full JSON, per model
    # The random model is scored too, and the average row is the task's headline metric.
    random = evaluated["results"]["runs"]["random"][TASK]
    assert set(random) == set(expected)
    with open(os.path.join(evaluated["out"], "results.csv")) as f:
        rows = {row["task"]: row for row in csv.DictReader(f)}
    assert rows[TASK]["metric"] == "acc_norm" and float(rows[TASK]["tp2pp2"]) == expected["acc_norm"]
    assert float(rows["average"]["random_stderr"]) == random["acc_norm_stderr"]
    table = open(os.path.join(evaluated["out"], "results.md")).read()
    assert f"| {TASK} | acc_norm | {expected['acc_norm']:.4f} ± {expected['acc_norm_stderr']:.4f} |" in table
    with open(os.path.join(evaluated["out"], "results.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_progress_shows_conversion_then_lm_eval_per_model(evaluated):
    lines = evaluated["stdout"].splitlines()
    order = [next(i for i, line in enumerate(lines) if text in line) for text in
             ("[1/2] tp2pp2", "tp2pp2: converting", "tp2pp2: converted", "[1/2] tp2pp2: lm-eval",
              "[2/2] random: lm-eval")]
    assert order == sorted(order)
    assert "Running loglikelihood requests" in evaluated["stderr"]  # lm-eval's own progress bar


def _megatron_logits(rank: int, world_size: int, save: str, sequences: list[list[int]]) -> list[np.ndarray]:
    from test_convert_to_hf import _megatron_logits as reference

    return reference(rank, world_size, save, "float32", sequences)


def test_tp2_pp2_conversion_matches_megatron(evaluated):
    from transformers import LlamaForCausalLM

    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 300, size=n).tolist() for n in (64, 9)]
    want = run_ranks(_megatron_logits, 1, evaluated["run"], sequences)[0]
    model = LlamaForCausalLM.from_pretrained(evaluated["converted"], dtype=torch.float32).eval()
    with torch.no_grad():
        for seq, expected in zip(sequences, want):
            np.testing.assert_allclose(model(torch.tensor([seq])).logits[0].numpy(), expected, atol=1e-4, rtol=1e-4)


def test_second_call_converts_nothing(evaluated, tmp_path):
    """The Python API, on the run alone: the cached conversion is reused as is."""
    from megatron_mile.evaluation.downstream import HarnessOptions, evaluate_downstream

    weights = os.path.join(evaluated["converted"], "model.safetensors")
    before = os.stat(weights).st_mtime_ns
    log: list[str] = []
    summary = evaluate_downstream([evaluated["run"]], TASK, str(tmp_path), labels=["again"], offline=True,
                                  options=HarnessOptions(num_fewshot=1, batch_size=4, device="cpu",
                                                         include_path=evaluated["tasks"]), log=log.append)
    assert any("using the conversion" in line for line in log) and not any("converting" in line for line in log)
    assert os.stat(weights).st_mtime_ns == before
    assert summary["runs"]["again"] == evaluated["results"]["runs"]["tp2pp2"]


def _errors(capsys, argv: list[str]) -> list[str]:
    """megatron-mile-eval's main in this process: exit code 2 and its stderr lines."""
    from megatron_mile.eval import main

    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert all(line.startswith("megatron-mile-eval: error: ") for line in err), err
    return [line.removeprefix("megatron-mile-eval: error: ") for line in err]


def test_bad_inputs_fail_first_one_line_each(evaluated, tmp_path, capsys):
    small = tmp_path / "small_vocab"
    small.mkdir()
    for name in os.listdir(evaluated["hf"]):
        os.link(os.path.join(evaluated["hf"], name), small / name)
    config = json.loads((small / "config.json").read_text())
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps({**config, "vocab_size": 200}))
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "out")
    common = ["--include-path", evaluated["tasks"], "--output-dir", out]

    errors = _errors(capsys, [str(empty), str(small), evaluated["run"], "--labels", "a", "b",
                              "--tasks", f"{TASK},hellaswg", *common])
    assert len(errors) == 4, errors
    assert errors[0] == "--labels: 2 labels for 3 models"
    assert errors[1].startswith(f"{empty}: neither a megatron-mile run")
    assert errors[2].startswith("--tasks: unknown task 'hellaswg'; close: hellaswag")
    assert errors[3] == f"{small}: the tokenizer has 300 tokens, more than the model's vocab_size 200 (config.json)"

    assert _errors(capsys, [evaluated["run"], evaluated["hf"], "--labels", "x", "x", "--tasks", TASK, *common]) == \
        ["--labels: labels must be unique, got x, x"]
    assert _errors(capsys, [evaluated["run"], "--tasks", TASK, "--batch-size", "0", *common]) == \
        ["argument --batch-size: expected a positive integer or auto[:N], got '0' (see --help)"]
    assert not os.path.exists(out)


def test_table_rows_headline_metric_and_average():
    from megatron_mile.evaluation.report import comparison_rows, markdown_table

    runs = {"a": {"t1": {"acc": 0.5, "acc_stderr": 0.1},
                  "t2": {"acc": 0.3, "acc_stderr": 0.05, "acc_norm": 0.25, "acc_norm_stderr": 0.2}},
            "b": {"t1": {"acc": 0.75, "acc_stderr": None}}}
    rows = {row.task: row for row in comparison_rows(runs)}
    assert [rows["t1"].metric, rows["t2"].metric] == ["acc", "acc_norm"]
    assert rows["average"].cells["a"] == pytest.approx((0.375, (0.1 ** 2 + 0.2 ** 2) ** 0.5 / 2), rel=1e-15)
    assert rows["average"].cells["b"] == (None, None)  # t2 missing: no average
    assert "| t1 | acc | 0.5000 ± 0.1000 | 0.7500 |" in markdown_table(runs)
    assert "| t2 | acc_norm | 0.2500 ± 0.2000 | - |" in markdown_table(runs)


def test_damaged_checkpoint_fails_in_one_line(evaluated, tmp_path, capsys):
    """A shard missing from the checkpoint surfaces from the conversion process as one line."""
    import shutil

    from megatron_mile.eval import main

    run = tmp_path / "damaged"
    shutil.copytree(evaluated["run"], run, ignore=shutil.ignore_patterns("hf", "tensorboard"))
    os.remove(run / "iter_0000005" / "__0_0.distcp")
    argv = [str(run), "--tasks", TASK, "--include-path", evaluated["tasks"], "--output-dir", str(tmp_path / "out")]
    assert main(argv) == 1
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"megatron-mile-eval: error: {run / 'iter_0000005'}: cannot load the model (")
    assert "__0_0.distcp" in error
    assert not os.path.exists(run / "hf" / "iter_0000005")


def test_iteration_applies_to_the_runs_among_the_models(evaluated):
    from megatron_mile.evaluation.sources import HF, RUN, SourceError, resolve_sources

    run, hf = resolve_sources([evaluated["run"], evaluated["hf"]], iteration=5)
    assert (run.kind, run.iteration, hf.kind) == (RUN, 5, HF)
    assert run.checkpoint == os.path.join(evaluated["run"], "iter_0000005")
    with pytest.raises(SourceError, match="no complete checkpoint at .*iter_0000003"):
        resolve_sources([evaluated["run"], evaluated["hf"]], iteration=3)
