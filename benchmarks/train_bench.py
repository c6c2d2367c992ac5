"""Training throughput: MiLe against cross-entropy, or megatron-mile against Hugging Face.

    python benchmarks/train_bench.py                 # CPU: tiny preset, CE vs MiLe, demo data
    python benchmarks/train_bench.py --against-hf    # CPU: vs LlamaForCausalLM, sequence 256 and 1024
    python benchmarks/train_bench.py --preset 468M --bf16 --micro-batch-size 8 --global-batch-size 8 \\
        --iters 30 --against-hf                      # one GPU: tokens/s and MFU, side by side

Each megatron-mile case is a real ``python -m megatron_mile.train`` run (one process, a world
of one on 127.0.0.1, default flags) on the demo corpus, built on the first call by
``examples/prepare_demo_data.sh``; its number is the median tokens/s of its logging windows
after the first (warm-up).

Default mode: CE and MiLe alternate (CE, MiLe, CE, MiLe, ...) so that drift on a shared
machine hits both alike; each loss's figure is the median over its rounds, MiLe as a ratio
to CE.

``--against-hf``: each megatron-mile case is paired with ``benchmarks/hf_llama_train.py``,
Hugging Face's ``LlamaForCausalLM`` (SDPA attention, ``torch.optim.AdamW``, random tokens) at
the same shape, micro-batch and thread count, for CE and for MiLe (on the Hugging Face side,
the original MiLe computation on its logits), at every ``--seq-lengths``. Without
``--preset`` the shape is hidden 256, 4 layers, 4 heads, FFN 704, vocabulary 4096 (the demo
tokenizer's), micro-batch 4; a preset brings its own shape. The cases alternate
(HF, megatron-mile, HF, megatron-mile, ...) and every row is a median over ``--rounds``,
with megatron-mile's tokens/s as a ratio to Hugging Face's for the same loss and length, and
the range of the per-round ratios (each megatron-mile run against the Hugging Face run just
before it), which shows how far the machine's noise alone moves one comparison.
On a GPU both sides also report model TFLOP/s and MFU by ``megatron_mile.metrics``; the
megatron-mile side then runs megatron-core's local spec with SDPA attention unless
Transformer Engine is installed.

Every run's result is printed as it finishes. A run that fails or exceeds ``--run-timeout``
(its whole process group is killed) stops the benchmark with its complete output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The side-by-side shape (the demo tokenizer gives the vocabulary: 4096).
HF_SHAPE = {"num-layers": 4, "hidden-size": 256, "num-attention-heads": 4, "ffn-hidden-size": 704}
HF_SHAPE_FLAGS = ["--model-preset", "tiny", *[f for k, v in HF_SHAPE.items() for f in (f"--{k}", str(v))],
                  "--seq-length", "256", "--micro-batch-size", "4", "--global-batch-size", "4"]


class RunFailed(RuntimeError):
    """A benchmark run failed or timed out; the message carries its whole output."""


def prepare_demo(data_dir: str) -> tuple[str, str]:
    out = subprocess.run(["bash", os.path.join(REPO, "examples", "prepare_demo_data.sh"), data_dir],
                         env={**os.environ, "PYTHON": sys.executable}, check=True, capture_output=True, text=True)
    blend, tokenizer = out.stdout.strip().splitlines()[-2:]
    return blend, tokenizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_captured(name: str, cmd: list[str], env: dict[str, str], timeout: float) -> str:
    """Run ``cmd`` in its own process group; its output, or RunFailed with all of it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except BaseException as err:  # the timeout, or an interrupt of the benchmark itself
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        if not isinstance(err, subprocess.TimeoutExpired):
            raise
        raise RunFailed(f"{name}: timed out after {timeout:.0f} s (--run-timeout); its output:\n{output}")
    if proc.returncode:
        raise RunFailed(f"{name}: exit code {proc.returncode}; its output:\n{output}")
    return output


def _window_medians(windows: list[dict]) -> dict[str, float]:
    if len(windows) < 2:
        raise RunFailed("--iters must cover at least two --log-interval windows")
    kept = windows[1:]
    result = {"tokens_per_sec": statistics.median(w["tokens_per_sec"] for w in kept)}
    if "mfu" in kept[0]:
        result["mfu"] = statistics.median(w["mfu"] for w in kept)
        result["tflops_per_gpu"] = statistics.median(w["tflops_per_gpu"] for w in kept)
    return result


def megatron_mile_run(args: argparse.Namespace, loss: str, seq_length: int, blend: str, tokenizer: str,
                      ) -> dict[str, float]:
    iters, log_interval = _iters_for(args, seq_length)
    with tempfile.TemporaryDirectory() as save:
        cmd = [sys.executable, "-m", "megatron_mile.train", *_shape_flags(args), "--loss", loss,
               "--seq-length", str(seq_length), "--micro-batch-size", str(args.micro_batch_size),
               "--global-batch-size", str(args.global_batch_size), "--train-iters", str(iters),
               "--lr-warmup-iters", "1", "--log-interval", str(log_interval), "--eval-interval", str(10 * iters),
               "--eval-iters", "1", "--data-path", blend, "--tokenizer-model", tokenizer,
               "--metrics-file", f"{save}/metrics.jsonl", "--tensorboard-dir", f"{save}/tb"]
        if args.bf16:
            cmd.append("--bf16")
        env = {**_env(args), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
        run_captured(f"megatron-mile {loss} seq {seq_length}", cmd, env, args.run_timeout)
        with open(f"{save}/metrics.jsonl") as f:
            return _window_medians([r for r in map(json.loads, f) if r["type"] == "train"])


def hf_run(args: argparse.Namespace, loss: str, seq_length: int, vocab_size: int) -> dict[str, float]:
    iters, log_interval = _iters_for(args, seq_length)
    shape = _shape(args)
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "hf_llama_train.py"), "--loss", loss,
           *[f for k in HF_SHAPE for f in (f"--{k}", str(shape[k]))], "--vocab-size", str(vocab_size),
           "--seq-length", str(seq_length), "--micro-batch-size", str(args.micro_batch_size),
           "--iters", str(iters), "--log-interval", str(log_interval)]
    if args.bf16:
        cmd.append("--bf16")
    output = run_captured(f"hf {loss} seq {seq_length}", cmd, _env(args), args.run_timeout)
    (result,) = [line.removeprefix("RESULT ") for line in output.splitlines() if line.startswith("RESULT ")]
    return json.loads(result)


def _env(args: argparse.Namespace) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1"}


def _shape(args: argparse.Namespace) -> dict[str, int]:
    """The model shape: the preset's, or without --preset the side-by-side shape."""
    from megatron_mile.model import PRESETS

    if args.preset is None:
        return HF_SHAPE
    preset = PRESETS[args.preset]
    return {"num-layers": preset.num_layers, "hidden-size": preset.hidden_size,
            "num-attention-heads": preset.num_attention_heads, "ffn-hidden-size": preset.ffn_hidden_size}


def _shape_flags(args: argparse.Namespace) -> list[str]:
    if args.preset is not None:
        return ["--model-preset", args.preset]
    return ["--model-preset", "tiny", *[f for k, v in HF_SHAPE.items() for f in (f"--{k}", str(v))]]


def _iters_for(args: argparse.Namespace, seq_length: int) -> tuple[int, int]:
    """--iters and --log-interval hold for the shortest length; longer sequences get
    proportionally fewer iterations (at least 4 windows of 2), so every case trains about as
    many tokens."""
    scale = max(1, seq_length // min(args.seq_lengths))
    log_interval = max(2, args.log_interval // scale)
    return max(4 * log_interval, args.iters // scale), log_interval


def _device(args: argparse.Namespace) -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads)"


def _fmt(result: dict[str, float]) -> str:
    text = f"{result['tokens_per_sec']:,.0f} tokens/s"
    if "mfu" in result:
        text += f", {result['tflops_per_gpu']:.1f} TFLOP/s, MFU {100 * result['mfu']:.1f}%"
    return text


def _mfu(results: list[dict[str, float]]) -> str:
    return f"{100 * statistics.median(r['mfu'] for r in results):.1f}%" if "mfu" in results[0] else "n/a"


def _tps(results: list[dict[str, float]]) -> float:
    return statistics.median(r["tokens_per_sec"] for r in results)


def per_round_ratios(baseline: list[dict[str, float]], runs: list[dict[str, float]]) -> str:
    """``min-max (median m)`` of ``runs[i] / baseline[i]`` tokens/s, round by round."""
    ratios = [run["tokens_per_sec"] / base["tokens_per_sec"] for base, run in zip(baseline, runs, strict=True)]
    return f"{min(ratios):.2f}-{max(ratios):.2f} (median {statistics.median(ratios):.2f})"


def mile_vs_ce(args: argparse.Namespace, blend: str, tokenizer: str) -> None:
    runs: dict[str, list[dict[str, float]]] = {"ce": [], "mile": []}
    for round_index in range(args.rounds):
        for loss in runs:
            runs[loss].append(megatron_mile_run(args, loss, args.seq_length, blend, tokenizer))
            print(f"round {round_index + 1} {loss}: {_fmt(runs[loss][-1])}", flush=True)
    print(f"device: {_device(args)}; load average {os.getloadavg()[0]:.1f}")
    print(f"config: preset {args.preset or 'side-by-side shape'}, seq {args.seq_length}, micro-batch "
          f"{args.micro_batch_size}, global batch {args.global_batch_size}, {args.iters} iters x {args.rounds} rounds"
          f"{', bf16' if args.bf16 else ''}")
    print("| loss | tokens/s (median) | ratio to CE | MFU |")
    print("|---|---|---|---|")
    ce_tps = _tps(runs["ce"])
    for loss, results in runs.items():
        print(f"| {loss} | {_tps(results):,.0f} | {_tps(results) / ce_tps:.3f}x | {_mfu(results)} |")


def against_hf(args: argparse.Namespace, blend: str, tokenizer: str) -> None:
    # megatron-core warns at import about CUDA extensions that this process does not use.
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).* not installed")
    from megatron_mile.data import build_tokenizer

    vocab_size = build_tokenizer(tokenizer, None).vocab_size
    cases = [(seq, loss) for seq in args.seq_lengths for loss in ("ce", "mile")]
    runs: dict[tuple[int, str, str], list[dict[str, float]]] = {}
    print(f"device: {_device(args)}; load average {os.getloadavg()[0]:.1f} at the start", flush=True)
    for round_index in range(args.rounds):
        for seq, loss in cases:
            for system in ("hf", "megatron-mile"):
                result = (hf_run(args, loss, seq, vocab_size) if system == "hf"
                          else megatron_mile_run(args, loss, seq, blend, tokenizer))
                runs.setdefault((seq, loss, system), []).append(result)
                print(f"round {round_index + 1} seq {seq} {loss} {system}: {_fmt(result)} "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    shape = _shape(args)
    print(f"\nconfig: hidden {shape['hidden-size']}, {shape['num-layers']} layers, {shape['num-attention-heads']} heads, "
          f"FFN {shape['ffn-hidden-size']}, vocabulary {vocab_size}, micro-batch {args.micro_batch_size} (megatron-mile "
          f"global batch {args.global_batch_size}), {args.rounds} rounds{', bf16' if args.bf16 else ''}; "
          f"load average {os.getloadavg()[0]:.1f} at the end")
    print("| seq | loss | HF tokens/s | megatron-mile tokens/s | megatron-mile / HF | per round | HF MFU "
          "| megatron-mile MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for seq, loss in cases:
        hf, mm = runs[(seq, loss, "hf")], runs[(seq, loss, "megatron-mile")]
        print(f"| {seq} | {loss} | {_tps(hf):,.0f} | {_tps(mm):,.0f} | {_tps(mm) / _tps(hf):.2f}x "
              f"| {per_round_ratios(hf, mm)} | {_mfu(hf)} | {_mfu(mm)} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", help="a megatron-mile preset (default: tiny; with --against-hf, the side-by-side "
                                    "shape above)")
    p.add_argument("--seq-length", type=int, default=256)
    p.add_argument("--seq-lengths", type=int, nargs="+",
                   help="--against-hf's lengths (default: 256 and 1024 without --preset, else the preset's); "
                        "--iters holds for the shortest")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--global-batch-size", type=int, help="megatron-mile's (default: --micro-batch-size with "
                                                         "--against-hf, like the HF loop; else 8)")
    p.add_argument("--iters", type=int, help="iterations per run at --seq-length (default 40; 20 with --against-hf)")
    p.add_argument("--log-interval", type=int, default=None, help="default 10; 5 with --against-hf")
    p.add_argument("--rounds", type=int, help="default 3; 2 with --against-hf")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of every run")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--against-hf", action="store_true", help="compare with Hugging Face's LlamaForCausalLM")
    p.add_argument("--run-timeout", type=float, default=600, help="seconds one run may take")
    p.add_argument("--data-dir", default=os.path.join(REPO, "data", "demo"))
    args = p.parse_args()
    hf = args.against_hf
    args.global_batch_size = args.global_batch_size or (args.micro_batch_size if hf else 8)
    args.iters = args.iters or (20 if hf else 40)
    args.log_interval = args.log_interval or (5 if hf else 10)
    args.rounds = args.rounds or (2 if hf else 3)
    if not hf:
        args.preset = args.preset or "tiny"
        args.seq_lengths = [args.seq_length]
    elif args.seq_lengths is None:
        from megatron_mile.model import PRESETS

        args.seq_lengths = [256, 1024] if args.preset is None else [PRESETS[args.preset].seq_length]

    blend, tokenizer = prepare_demo(args.data_dir)
    try:
        (against_hf if hf else mile_vs_ce)(args, blend, tokenizer)
    except RunFailed as err:
        sys.exit(f"train_bench: {err}")


if __name__ == "__main__":
    main()
