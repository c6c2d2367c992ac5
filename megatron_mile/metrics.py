"""Throughput, model FLOPs, and where the numbers go: console, metrics.jsonl, TensorBoard, wandb.

Model FLOPs per trained token (the PaLM / Megatron convention; recomputation not counted):

    6 * N  +  12 * L * s * h

where N = L * (2 h^2 + 2 h g d + 3 h f) + V h counts the weights that take part in matmuls
(the attention projections: Q and O are h x h, K and V h x g d with g key/value groups of
d = h / heads, so 4 h^2 without grouped-query attention; the SwiGLU MLP and the output
layer; the embedding lookup is a gather), and 12 L s h is the attention score and value
products (forward 4 L s h per token, times 3 for forward + backward; every query head
still attends, so grouping does not change it). MFU = achieved model FLOP/s per GPU
divided by the GPU's dense bf16 peak.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Iterator

import torch

from megatron_mile.arguments import ConfigError
from megatron_mile.model import ModelShape, attention_weights

# Dense bf16 tensor-core peaks, FLOP/s.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(shape: ModelShape, vocab_size: int) -> float:
    h, f, layers, s = shape.hidden_size, shape.ffn_hidden_size, shape.num_layers, shape.seq_length
    matmul_params = layers * (attention_weights(shape) + 3 * h * f) + vocab_size * h
    return 6.0 * matmul_params + 12.0 * layers * s * h


def peak_flops() -> float | None:
    """This GPU's dense bf16 peak, or None on CPU or an unknown card (then no MFU is shown)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, peak in PEAK_BF16_FLOPS.items():
        if key in name:
            return peak
    return None


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_tokens(tokens: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.2f}{unit}"
    return str(int(tokens))


@contextlib.contextmanager
def _output(flag: str, path: str) -> Iterator[None]:
    """An output path that cannot be written is a configuration error, named by its flag."""
    try:
        yield
    except OSError as err:
        raise ConfigError(f"{flag} {path}: cannot write there ({err.strerror or err})") from None


def truncate_records(path: str, last_iteration: int) -> int:
    """Drop the records of ``path`` (metrics.jsonl) logged after ``last_iteration``; returns how many.

    A run resumed from the checkpoint at ``last_iteration`` logs the later iterations again, so the
    records the earlier run wrote for them (and a line cut short by a kill) must go. The file is
    replaced atomically: a kill during the rewrite leaves the old one.
    """
    if not os.path.isfile(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("iteration", 0) <= last_iteration:
            kept.append(line)
    if len(kept) == len(lines):
        return 0
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    return len(lines) - len(kept)


class MetricsLogger:
    """Writes on the logging rank only; every other rank gets a logger that does nothing.

    ``resumed_at``: the iteration a resumed run starts after. metrics.jsonl keeps its records up
    to it (``truncate_records``) and is appended to; TensorBoard hides the earlier run's events
    after it (SummaryWriter's ``purge_step``), so neither mixes the two runs' later steps.
    """

    def __init__(self, enabled: bool, metrics_file: str | None, tensorboard_dir: str | None,
                 wandb_project: str | None, wandb_name: str | None, config: dict[str, Any],
                 resumed_at: int | None = None):
        self.enabled = enabled
        self._jsonl = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        if metrics_file:
            with _output("--metrics-file", metrics_file):
                os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
                if resumed_at is not None:
                    truncate_records(metrics_file, resumed_at)
                self._jsonl = open(metrics_file, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            with _output("--tensorboard-dir", tensorboard_dir):
                self._tb = SummaryWriter(log_dir=tensorboard_dir,
                                         purge_step=None if resumed_at is None else resumed_at + 1)
        if wandb_project:
            import wandb

            self._wandb = wandb.init(project=wandb_project, name=wandb_name, config=config, resume="allow")

    def record(self, kind: str, values: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        if self._jsonl:
            self._jsonl.write(json.dumps({"type": kind, **values}, allow_nan=True) + "\n")
        scalars = {}
        for key, value in values.items():
            if isinstance(value, dict):
                scalars.update({f"{key}/{k}": v for k, v in value.items()})
            elif isinstance(value, (int, float)) and key != "iteration":
                scalars[key] = value
        if self._tb:
            for key, value in scalars.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb:
            self._wandb.log({f"{kind}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()
        if self._wandb:
            self._wandb.finish()


class Throughput:
    """Tokens/s, model TFLOP/s per GPU, MFU and ETA over the last logging window."""

    def __init__(self, tokens_per_iter: int, flops_per_token: float, world_size: int, train_iters: int):
        self.tokens_per_iter = tokens_per_iter
        self.flops_per_token = flops_per_token
        self.world_size = world_size
        self.train_iters = train_iters
        self.peak = peak_flops()
        self._start = time.perf_counter()
        self._iters = 0

    def restart(self) -> None:
        """Drop the time spent outside training steps (evaluation, checkpoints) from the window."""
        self._start = time.perf_counter()
        self._iters = 0

    def step(self) -> None:
        self._iters += 1

    def window(self, iteration: int) -> dict[str, float]:
        elapsed = time.perf_counter() - self._start
        iters = max(self._iters, 1)
        tokens_per_sec = self.tokens_per_iter * iters / elapsed
        tflops = tokens_per_sec * self.flops_per_token / self.world_size / 1e12
        out = {
            "tokens_per_sec": tokens_per_sec,
            "iter_time_s": elapsed / iters,
            "tflops_per_gpu": tflops,
            "eta_s": elapsed / iters * (self.train_iters - iteration),
        }
        if self.peak:
            out["mfu"] = tflops * 1e12 / self.peak
        self.restart()
        return out


def console_line(iteration: int, train_iters: int, values: dict[str, float]) -> str:
    parts = [f"iter {iteration}/{train_iters}", f"tokens {format_tokens(values['consumed_tokens'])}"]
    for key in ("loss", "ce", "entropy", "alpha"):
        if key in values and values[key] is not None and not math.isnan(values[key]):
            parts.append(f"{key} {values[key]:.4f}")
    parts += [f"lr {values['lr']:.3e}", f"grad-norm {values['grad_norm']:.3f}",
              f"tokens/s {values['tokens_per_sec']:.0f}"]
    if torch.cuda.is_available():
        parts.append(f"TFLOP/s/GPU {values['tflops_per_gpu']:.1f}")
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    if values.get("skipped"):
        parts.append(f"skipped {values['skipped']}")
    parts.append(f"ETA {format_duration(values['eta_s'])}")
    return " | ".join(parts)
