"""The pretraining loop: megatron-core schedules over a TP/PP/DP GPTModel, with MiLe/focal/CE.

One iteration consumes one global batch: each data-parallel rank takes its contiguous
slice of the batch's samples and runs it as micro-batches through megatron-core's
pipeline schedule (1F1B, or interleaved with virtual stages). The loss runs in the last
stage on the vocab-sharded logits, which are never gathered.

MiLe's alpha is normalised per micro-batch over the data-parallel group. So DP=2 with one
micro-batch per rank and DP=1 with two accumulated micro-batches normalise over different
token sets, and their MiLe losses differ slightly by design; with cross-entropy (alpha=1)
they are identical.
"""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial
from typing import Any, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mile import checkpointing, interrupts, metrics, multi_tensor, optim, run_dir, runtime
from megatron_mile.arguments import model_shape, virtual_pipeline_stages
from megatron_mile.checkpointing import TrainingState
from megatron_mile.data import build_pretraining_datasets, build_tokenizer, load_blend
from megatron_mile.data.errors import DataError
from megatron_mile.loss import weighted_lm_loss
from megatron_mile.model import (build_model_chunks, build_transformer_config, count_parameters, optional_kernels,
                                 padded_vocab_size)

STAT_KEYS = ("loss", "ce", "entropy", "alpha")

log = logging.getLogger(__name__)


class TrainingAborted(RuntimeError):
    """The run cannot go on (e.g. repeated non-finite steps); the message is one line."""


# ------------------------------------------------------------------------- batches


def micro_batches(dataset, first_sample: int, global_batch_size: int, micro_batch_size: int, vocab_size: int,
                  ) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of the global batch starting at ``first_sample``.

    Token ids must be below ``vocab_size``: data preprocessed with another tokenizer is
    refused here, on every rank, before the model sees it.
    """
    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = global_batch_size // dp_size
    start = first_sample + dp_rank * per_rank
    batches = []
    for offset in range(0, per_rank, micro_batch_size):
        samples = [dataset[(start + offset + i) % len(dataset)] for i in range(micro_batch_size)]
        batch = {key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                 for key in ("tokens", "labels", "loss_mask", "position_ids")}
        top = int(torch.maximum(batch["tokens"].max(), batch["labels"].max()))
        if top >= vocab_size:
            raise DataError(f"--data-path holds token id {top}, but --tokenizer-model has {vocab_size} tokens: "
                            "the data was preprocessed with another tokenizer")
        batches.append(batch)
    return batches


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device``. To a GPU through pinned memory and without blocking: a copy from
    pageable memory would first wait for all the GPU work queued so far (the previous step's
    optimizer), so the host could not queue this step's forward pass ahead of the GPU."""
    if device.type != "cuda":
        return batch
    return {key: value.pin_memory().to(device, non_blocking=True) for key, value in batch.items()}


def _data_iterators(batches: list[dict[str, torch.Tensor]], num_chunks: int) -> Iterator | list[Iterator]:
    """The interleaved schedule takes one iterator per model chunk, each over every micro-batch."""
    if num_chunks == 1:
        return iter(batches)
    return [iter(batches) for _ in range(num_chunks)]


# ------------------------------------------------------------------------- steps


class Trainer:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        # Before any process group exists, like every check that reads only the flags and the disk.
        self.start = run_dir.plan_start(args)
        self.exits = interrupts.ExitConditions(args.exit_signal if args.exit_signal_handler else None,
                                               args.exit_duration_in_mins)
        self.rt = runtime.initialize(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                     virtual_pipeline_stages(args), args.seed,
                                     timeout_minutes=args.distributed_timeout_minutes)
        self.shape = model_shape(args)
        self.tokenizer = build_tokenizer(args.tokenizer_model, args.tokenizer_type)
        self.vocab_size = self.tokenizer.vocab_size
        self.num_microbatches = args.global_batch_size // (args.micro_batch_size * self.rt.dp)
        self._build_data()
        self.config = build_transformer_config(
            self.shape, tp=self.rt.tp, pp=self.rt.pp, vp=self.rt.vp, sequence_parallel=args.sequence_parallel,
            bf16=args.bf16, recompute_activations=args.recompute_activations,
            bias_swiglu_fusion=args.bias_swiglu_fusion, rope_fusion=args.apply_rope_fusion)
        self.chunks = build_model_chunks(self.config, self.vocab_size, self.shape.seq_length, args.seed,
                                         self.rt.device, vocab_divisible_by=args.make_vocab_size_divisible_by,
                                         rotary_base=self.shape.rotary_base)
        loads_optimizer = self.start.load and not self.start.weights_only and not args.no_load_optim
        saved_format = checkpointing.saved_optimizer_format(self.start.load) if loads_optimizer else None
        distributed, note = optim.choose_distributed_optimizer(args.use_distributed_optimizer, self.rt.dp, saved_format)
        if note and self.rt.is_logging_rank:
            log.info(note)
        self.settings = optim.OptimSettings.from_args(args, use_distributed_optimizer=distributed)
        self.model = optim.wrap_data_parallel(self.config, self.chunks, self.settings)
        self.optimizer = optim.build_optimizer(self.model, self.settings, args.bf16)
        kernels = {**optional_kernels(self.config), "optimizer": optim.adam_implementation(),
                   "grad norm and clipping": multi_tensor.implementation()}
        log.info("kernels: %s", " | ".join(f"{part} {kind}" for part, kind in kernels.items()))
        self.scheduler = optim.build_scheduler(self.optimizer, self.settings, args.train_iters)
        self.state = TrainingState()
        if self.start.overwrite:
            # Only now, with the configuration checked and the data and model built.
            removed = run_dir.remove_earlier_run(args) if self.rt.rank == 0 else None
            if removed:
                print(removed, flush=True)
            dist.barrier()
        if self.start.notice:
            self._log(self.start.notice)
        if self.start.weights_only:
            # Iteration 0, with this run's fresh optimizer, schedule, RNG and data position.
            path = checkpointing.find_checkpoint(self.start.load)
            checkpointing.load_model_weights(path, self.chunks, self.vocab_size)
            self.optimizer.reload_model_params()
            self._log(f"loaded the model weights of {path} alone: starting at iteration 0")
        elif self.start.load:
            self.state = checkpointing.load_checkpoint(self.start.load, self.chunks, self.optimizer, self.scheduler,
                                                       self.vocab_size, load_optimizer=not args.no_load_optim)
            self._log(f"resumed from {self.start.load} at iteration {self.state.iteration}")
        self.last_checkpoint = checkpointing.latest_iteration(args.save) if args.save else None
        self.logger = metrics.MetricsLogger(
            enabled=self.rt.is_logging_rank, metrics_file=run_dir.metrics_file(args),
            tensorboard_dir=run_dir.tensorboard_dir(args), wandb_project=args.wandb_project,
            wandb_name=args.wandb_exp_name, config=vars(args),
            resumed_at=self.state.iteration if self.start.resume else None)
        tokens_per_iter = args.global_batch_size * self.shape.seq_length
        self.throughput = metrics.Throughput(tokens_per_iter, metrics.flops_per_token(self.shape, self.vocab_size),
                                             self.rt.world_size, args.train_iters)

    def _build_data(self) -> None:
        args = self.args
        blend = load_blend(args.data_path)
        gbs = args.global_batch_size
        cache = args.data_cache_path or (os.path.join(args.save, "data_cache") if args.save else None)
        if cache is None:
            log.info("no --save or --data-cache-path: the blend's sample indexes are built again at every start")
        datasets = build_pretraining_datasets(
            blend, self.tokenizer, self.shape.seq_length, args.seed,
            train_samples=args.train_iters * gbs, valid_samples=args.eval_iters * gbs, test_samples=0,
            split=args.split, path_to_cache=cache)
        self.train_data = datasets.train
        self.valid_data = datasets.valid
        self.domain_valid = datasets.domain_valid

    def _log(self, message: str) -> None:
        if self.rt.is_logging_rank:
            print(message, flush=True)

    def _loss_func(self, labels: torch.Tensor, loss_mask: torch.Tensor, logits: torch.Tensor):
        args = self.args
        loss, stats = weighted_lm_loss(
            logits, labels, loss_mask, kind=args.loss, gamma=args.mile_gamma, sigma=args.mile_sigma,
            alpha_mode=args.mile_alpha_mode, vocab_size=self.vocab_size, label_smoothing=args.label_smoothing,
            # The logits are not needed after the loss: let it reuse their buffer.
            inplace=True)
        return loss, {"loss": loss.detach().clone(), **{k: stats[k] for k in ("ce", "entropy", "alpha")}}

    def _forward_step(self, data_iterator, model):
        batch = _to_device(next(data_iterator), self.rt.device)
        labels = batch["labels"]
        # Given labels, the model returns [s, b, V/tp] logits without a transposing copy
        # (model.LoopLossGPTModel): the loss takes labels and mask in that order too.
        logits = model(batch["tokens"], batch["position_ids"], None, labels=labels)
        return logits, partial(self._loss_func, labels.t(), batch["loss_mask"].t())

    def _run_schedule(self, batches: list[dict[str, torch.Tensor]], forward_only: bool) -> torch.Tensor:
        """Forward (and backward) over the micro-batches: the ``STAT_KEYS`` statistics averaged over
        micro-batches and DP, as one float64 tensor left on the device (reading it would make the
        host wait for the backward pass)."""
        outputs = get_forward_backward_func()(
            forward_step_func=self._forward_step,
            data_iterator=_data_iterators(batches, len(self.model)),
            model=self.model,
            num_microbatches=len(batches),
            seq_length=self.shape.seq_length,
            micro_batch_size=self.args.micro_batch_size,
            forward_only=forward_only,
        )
        # Only the last pipeline stage has losses; broadcast-free: the logging rank is in it.
        values = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.rt.device)
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for out in outputs:
                values += torch.stack([torch.as_tensor(out[k], dtype=torch.float64, device=self.rt.device)
                                       for k in STAT_KEYS])
            values /= max(len(outputs), 1)
            dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
            values /= parallel_state.get_data_parallel_world_size()
        return values

    def train_step(self) -> tuple[torch.Tensor, float | None]:
        """One global batch. Returns the statistics (on the device, as ``_run_schedule``) and the
        grad norm (None when the step was skipped)."""
        for ddp in self.model:
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = micro_batches(self.train_data, self.state.consumed_samples, self.args.global_batch_size,
                                self.args.micro_batch_size, self.vocab_size)
        stats = self._run_schedule(batches, forward_only=False)
        self.state.consumed_samples += self.args.global_batch_size
        self.state.iteration += 1
        grad_norm = optim.step_if_finite(self.optimizer, stats)
        if grad_norm is not None:
            self.scheduler.step(increment=1)
        return stats, grad_norm

    # --------------------------------------------------------------------- evaluation

    @torch.no_grad()
    def _eval_dataset(self, dataset) -> dict[str, float]:
        for ddp in self.model:
            ddp.eval()
        totals = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.rt.device)
        gbs = self.args.global_batch_size
        for i in range(self.args.eval_iters):
            totals += self._run_schedule(micro_batches(dataset, i * gbs, gbs, self.args.micro_batch_size,
                                                       self.vocab_size), forward_only=True)
        for ddp in self.model:
            ddp.train()
        return dict(zip(STAT_KEYS, (totals / self.args.eval_iters).tolist()))

    def evaluate(self) -> None:
        """Log-ppl (mean NLL, never label-smoothed) on the blended validation set and every domain's."""
        record: dict[str, Any] = {"iteration": self.state.iteration,
                                  "consumed_tokens": self.state.consumed_samples * self.shape.seq_length}
        if self.valid_data is not None:
            overall = self._eval_dataset(self.valid_data)
            record["eval_loss"] = overall["ce"]
            record["eval_objective"] = overall["loss"]
        domains = {name: self._eval_dataset(ds)["ce"] for name, ds in sorted(self.domain_valid.items())}
        record["domains"] = domains
        line = f"eval iter {self.state.iteration} | log-ppl {record.get('eval_loss', float('nan')):.4f}"
        if domains:
            record["domain_avg"] = sum(domains.values()) / len(domains)
            record["domain_worst"] = max(domains.values())
            line += f" | domain avg {record['domain_avg']:.4f} | worst {record['domain_worst']:.4f} | " + \
                ", ".join(f"{k} {v:.3f}" for k, v in domains.items())
        self._log(line)
        self.logger.record("eval", record, self.state.iteration)

    # --------------------------------------------------------------------- loop

    def save(self) -> None:
        if not self.args.save:
            return
        path = checkpointing.save_checkpoint(self.args.save, self.chunks, self.optimizer, self.scheduler,
                                             self.state, self.vocab_size, run_args=vars(self.args),
                                             fully_reshardable=self.args.dist_ckpt_optim_fully_reshardable)
        self._log(f"saved checkpoint {path}")
        self.last_checkpoint = self.state.iteration

    def train(self) -> None:
        args = self.args
        params = count_parameters(self.shape, self.vocab_size)
        padded = padded_vocab_size(self.vocab_size, self.rt.tp, args.make_vocab_size_divisible_by)
        self._log(f"training {params / 1e6:.1f}M parameters {self.shape} | vocab {self.vocab_size} (padded "
                  f"{padded}) | TP {self.rt.tp} PP {self.rt.pp} "
                  f"DP {self.rt.dp} VP {self.rt.vp} | micro-batches {self.num_microbatches} | loss {args.loss}")
        skipped_in_a_row = 0
        window = torch.zeros(len(STAT_KEYS), dtype=torch.float64, device=self.rt.device)  # read when logged
        window_steps = 0
        last_norm = float("nan")
        self.throughput.restart()
        while self.state.iteration < args.train_iters:
            stats, grad_norm = self.train_step()
            self.throughput.step()
            if grad_norm is None:
                skipped_in_a_row += 1
                self._log(f"warning: iteration {self.state.iteration}: non-finite loss or gradient, step skipped "
                          f"({skipped_in_a_row} in a row)")
            else:
                skipped_in_a_row = 0
                last_norm = grad_norm
                window += stats
                window_steps += 1
            if self.state.iteration % args.log_interval == 0:
                self._log_window(window, window_steps, last_norm, skipped_in_a_row)
                window, window_steps = torch.zeros_like(window), 0
            if skipped_in_a_row >= args.max_skipped_iters:
                raise TrainingAborted(f"{skipped_in_a_row} consecutive non-finite iterations "
                                      f"(--max-skipped-iters {args.max_skipped_iters}); stopping at iteration "
                                      f"{self.state.iteration}, last checkpoint is the last good state")
            if args.eval_interval and self.state.iteration % args.eval_interval == 0:
                self.evaluate()
                self.throughput.restart()
            if args.save_interval and self.state.iteration % args.save_interval == 0:
                self.save()
                self.throughput.restart()
            stop = self._stop_reason()
            if stop:
                self._log(f"exiting at iteration {self.state.iteration}: {stop}")
                break
        if args.save and self.last_checkpoint != self.state.iteration:
            self.save()

    def _stop_reason(self) -> str | None:
        """Why the run stops after this iteration, short of --train-iters; None to go on."""
        if self.args.exit_interval and self.state.iteration % self.args.exit_interval == 0:
            return f"--exit-interval {self.args.exit_interval}"
        return self.exits.reason(self.rt.device)

    def interrupt_message(self) -> str:
        return interrupts.interrupt_message(self.state.iteration, self.args.save, self.last_checkpoint)

    def _log_window(self, window: torch.Tensor, steps: int, grad_norm: float, skipped: int) -> None:
        values: dict[str, Any] = {"iteration": self.state.iteration,
                                  "consumed_tokens": self.state.consumed_samples * self.shape.seq_length}
        values.update(zip(STAT_KEYS, (window / steps).tolist() if steps else [float("nan")] * len(STAT_KEYS)))
        values.update(lr=self.optimizer.param_groups[0]["lr"], grad_norm=grad_norm, skipped=skipped)
        values.update(self.throughput.window(self.state.iteration))
        self._log(metrics.console_line(self.state.iteration, self.args.train_iters, values))
        self.logger.record("train", values, self.state.iteration)


def pretrain(args: argparse.Namespace) -> None:
    """Build and train; Ctrl-C raises ``interrupts.Interrupted`` with the line to print.

    The caller shuts the process group down (``runtime.shutdown``), after reporting any error.
    """
    trainer = None
    try:
        trainer = Trainer(args)
        interrupts.describe_interrupt_with(trainer.interrupt_message)
        trainer.train()
    except KeyboardInterrupt:
        if trainer is None:
            last = checkpointing.latest_iteration(args.save) if args.save else None
            raise interrupts.Interrupted(interrupts.interrupt_message(None, args.save, last)) from None
        raise interrupts.Interrupted(trainer.interrupt_message()) from None
    finally:
        if trainer is not None:
            trainer.logger.close()
