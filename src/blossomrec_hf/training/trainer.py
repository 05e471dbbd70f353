"""The training loop behind ``scripts/train.py``: ``train()`` runs it from parsed arguments, ``Trainer`` is one run.

A step is split so that each later change has one place: ``compute_loss`` (batch -> loss), ``training_step``
(forward, backward, optimizer step) and ``_after_optimizer_step`` (log, evaluate, checkpoint as due).

Several processes (``accelerate launch --multi_gpu --num_processes N``): an optimizer step trains on
``N x --gradient_accumulation_steps`` batches of one global sequence (``batching.StepBatchSampler``, the same
sequence whatever N), and each batch's mean loss is scaled so that the step's gradient is the mean over all the
step's next-item targets, every process together (``PlannedBatch.loss_scale``: the count is known on every process
without communication). So N processes give the gradients of one process accumulating N batches (to float rounding),
and a checkpoint resumes on any split of the same batches per step.

``--torch_compile`` compiles the model in place (``nn.Module.compile``, so parameter names, checkpoints and
``unwrap_model`` stay as they are) with ``fullgraph=True``: the forward and backward of the training step and the
evaluation forward, each one graph with no host sync. The data loaders then give batches of static shapes, so the
graphs are compiled once, not once per batch size. Unset, it is on where one process trains on a CUDA GPU, and
the whole optimizer step is then captured in one CUDA graph (``--cuda_graph_step``, step_graph.py): no host work
per step beyond copying the batch in. ``--cuda_graph_step false`` leaves torch's mode
reduce-overhead there, forward and backward replayed from CUDA graphs of their own (``default_compilation``).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import sys
import time
from pathlib import Path

import torch
from accelerate.utils import send_to_device, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..batching import training_dataloader
from ..checkpointing import (STATE_FILE, OutputWriteError, TrainerState, check_same_run, load_checkpoint,
                             save_checkpoint, step_dirs, write_json_atomic, write_or_stop)
from ..data import check_trainable, prepare_data
from ..errors import InputErrors, user_input_errors
from ..evaluation import RankingEvaluator
from ..metrics import format_metrics_table
from ..model import BlossomRecForSequentialRecommendation
from ..training_args import build_model_config, model_config_fields
from .logging_window import LoggingWindow, NonFiniteLoss
from .plot import PLOT_FILE, plot_training_curves
from .run_directory import TRAINING_ARGS_FILE, prepare_output_dir, save_best_model, write_training_args
from .signals import StopSignals
from .step_graph import CudaGraphStep, make_capturable, optimizer_settings, restore_optimizer_settings

EARLY_STOPPING_METRIC = "ndcg@10"
STEP_INPUTS = ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "max_length_q", "loss_scale")  # optimizer_step's
METRICS_FILE = "metrics.json"


def train(accelerator, data_args, eval_args, args, model_overrides: dict) -> int:
    """The whole run; returns the exit status: 0, 1 after a non-finite loss or a failed write (e.g. a full disk),
    128 + the signal after a stop signal.

    Bad input (flags, data, output folder, checkpoint to resume) exits with status 2 on every process, after one
    ``error:`` line from the main process.
    """
    stop_signals = StopSignals(announce=accelerator.is_main_process)
    output_dir, resume_dir = prepare_output_dir(accelerator, args, data_args.dataset)
    set_seed(args.seed)
    data, windows = load_training_data(accelerator, data_args, args.max_seq_length)
    with user_input_errors("model config", accelerator):
        config = build_model_config(args, model_overrides, data.vocab.n_items)
    run_config = describe_run(data_args, args, config, accelerator.num_processes)
    if resume_dir is not None:
        with user_input_errors("--resume_from_checkpoint", accelerator):
            check_same_run(resume_dir, TrainerState.load(resume_dir / STATE_FILE).run_config, run_config,
                           defaults=model_config_fields())
    trainer = Trainer(accelerator, args, eval_args, output_dir, data, windows, config, stop_signals)
    args = trainer.args  # --torch_compile decided
    if resume_dir is not None:
        trainer.resume(resume_dir)
    trainer.state.run_config = run_config
    try:
        write_or_stop(accelerator, output_dir / TRAINING_ARGS_FILE, lambda: write_training_args(
            output_dir, accelerator, (data_args, eval_args, args), model_overrides), main_process_only=True)
        if args.report_to != "none":
            accelerator.init_trackers("runs", config={k: v for k, v in dataclasses.asdict(args).items()
                                                      if isinstance(v, (int, float, str, bool))})
        trainer.print_summary(data_args.dataset)
        status = trainer.train()
        if status == 0:
            trainer.finish(data_args.dataset)
    except NonFiniteLoss as error:
        accelerator.print(f"error: {error}: stopped without saving the weights it produced; "
                          f"{_last_checkpoint(output_dir)}", file=sys.stderr)
        return 1
    except OutputWriteError as error:
        accelerator.print(f"error: {error}; stopped; {_last_checkpoint(output_dir)}", file=sys.stderr)
        return 1
    return status


def _last_checkpoint(output_dir: Path) -> str:
    saved = step_dirs(output_dir)
    return f"the last good checkpoint, {saved[-1]}, is intact" if saved else "no checkpoint was saved"


def load_training_data(accelerator, data_args, max_seq_length: int):
    """The leave-one-out splits and the training windows; the main process goes first so caches are written once.

    Data that cannot be trained on (unreadable, no user with a validation and a test target, no training window)
    exits with status 2 on every process, after one ``error:`` line from the main process.
    """
    errors = InputErrors(f"dataset {data_args.dataset!r}")
    # The error is caught inside the block, so every process leaves it normally (none dies at its barrier).
    with accelerator.main_process_first(), errors:
        data = prepare_data(data_args.dataset, max_seq_length=max_seq_length, k_core=data_args.k_core,
                            min_history_length=data_args.min_history_length, **data_args.reader_kwargs())
        windows = check_trainable(data, max_seq_length)
    errors.exit_if_any(accelerator)
    return data, windows


def describe_run(data_args, args, config, num_processes: int) -> dict:
    """What a checkpoint must share with the run that resumes it: the model's shape, the data and its order."""
    model = {name: getattr(config, name)
             for name in (*model_config_fields(), "n_items", "max_position_embeddings", "attention_type")}
    return {**dataclasses.asdict(data_args), "max_seq_length": args.max_seq_length,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "max_tokens_per_batch": args.tokens_per_batch,
            "batches_per_step": num_processes * args.gradient_accumulation_steps, "seed": args.seed,
            # how the batches of a step are split; a resumed run may split them otherwise (checkpointing.SPLIT_SETTINGS)
            "num_processes": num_processes, "gradient_accumulation_steps": args.gradient_accumulation_steps, **model}


def ranking_evaluator(accelerator, data, split: str, max_seq_length: int, eval_args,
                      static_shapes: bool = False) -> RankingEvaluator:
    return RankingEvaluator(data.splits[split], data.splits["train"], n_items=data.vocab.n_items,
                            max_seq_length=max_seq_length, accelerator=accelerator,
                            batch_size=eval_args.per_device_eval_batch_size, mode=eval_args.eval_mode,
                            exclude_history=eval_args.exclude_history, seed=eval_args.eval_seed,
                            static_shapes=static_shapes)


def peak_gpu_memory_mib(device: torch.device) -> float | None:
    """The allocator's peak on this process's GPU so far (training and evaluation), None off CUDA."""
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def use_tf32(accelerator, tf32: bool | None) -> bool:
    """``--tf32``: torch's "high" float32 matmul precision (TF32) where a CUDA GPU of compute capability 8.0+ trains,
    unless turned off; exact float32 otherwise. Returns whether TF32 is on."""
    device = accelerator.device
    capable = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8
    if tf32 and not capable:
        raise ValueError(f"--tf32 needs a CUDA GPU of compute capability 8.0 or newer; this run trains on {device}")
    enabled = capable if tf32 is None else tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    return enabled


def default_compilation(args, accelerator):
    """``args`` with what was left unset decided: ``--torch_compile`` on where one process trains on a CUDA GPU, off
    elsewhere; there a compiled step is captured whole in one CUDA graph (``--cuda_graph_step``, the model compiled in
    torch's default mode), or, where a step graph is turned off or cannot run, compiled in mode reduce-overhead
    (forward and backward replayed from CUDA graphs of their own).
    On an H100 the step graph took the host's time per step from ~2.5 to ~0.1 ms and ML-100K's training step from 3.7
    to 2.3 ms against reduce-overhead, which trained BlossomRec 1.4-4.5x faster than eager (benchmarks/README.md);
    tests check the captured step against the uncaptured compiled one, with and without gradient accumulation
    (tests/test_cuda_graph_step.py, on a GPU), and the compiled model against eager. Several processes keep torch's
    default mode and, unless asked, eager steps: DDP's gradient hooks are not measured under CUDA graphs here; so does
    gradient accumulation without a step graph (gradients summed across torch's own graph replays are not measured).
    Without Triton, which inductor needs for a GPU's kernels, the default is eager."""
    one_gpu = accelerator.device.type == "cuda" and accelerator.num_processes == 1
    compiled = one_gpu and triton_installed() if args.torch_compile is None else args.torch_compile
    graph_step = decide_cuda_graph_step(args, accelerator, one_gpu=one_gpu, compiled=compiled)
    mode = args.torch_compile_mode or ("reduce-overhead" if compiled and one_gpu and uses_inductor(args)
                                       and args.gradient_accumulation_steps == 1 and not graph_step else None)
    return dataclasses.replace(args, torch_compile=compiled, torch_compile_mode=mode, cuda_graph_step=graph_step)


GRAPHED_COMPILE_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that make CUDA graphs themselves
GRAPHED_BACKENDS = ("cudagraphs",)  # torch.compile backends that do


def decide_cuda_graph_step(args, accelerator, *, one_gpu: bool, compiled: bool) -> bool:
    """``--cuda_graph_step`` as given (a ValueError naming what it needs and is missing), or unset: on wherever it
    can run with inductor."""
    missing = cuda_graph_step_missing(args, accelerator, one_gpu=one_gpu, compiled=compiled)
    if args.cuda_graph_step is None:
        return missing is None and uses_inductor(args)
    if args.cuda_graph_step and missing:
        raise ValueError(f"--cuda_graph_step needs {missing}")
    return args.cuda_graph_step


def cuda_graph_step_missing(args, accelerator, *, one_gpu: bool, compiled: bool) -> str | None:
    """What a captured step needs and this run lacks, or None."""
    return ("one process on a CUDA GPU" if not one_gpu else
            "--torch_compile (the eager model checks its input on the host)" if not compiled else
            f"a --torch_compile_mode without CUDA graphs of its own, not {args.torch_compile_mode}"
            if args.torch_compile_mode in GRAPHED_COMPILE_MODES else
            f"a --torch_compile_backend without CUDA graphs of its own, not {args.torch_compile_backend}"
            if args.torch_compile_backend in GRAPHED_BACKENDS else
            "bf16 or float32, not fp16 (its loss scaler decides on the host whether a step is taken)"
            if getattr(accelerator, "mixed_precision", "no") == "fp16" else None)


def uses_inductor(args) -> bool:
    """Whether torch.compile takes its default backend, inductor (other backends take other modes, or none)."""
    return args.torch_compile_backend in (None, "inductor")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def compile_model(model, args, mode: str | None) -> None:
    """``--torch_compile``: compile ``model`` in place, the whole forward as one graph (and its backward)."""
    model.compile(fullgraph=True, backend=args.torch_compile_backend or "inductor", mode=mode)


def compiled_graphs() -> int:
    """Graphs torch.compile has captured in this process (each distinct shape or mode of a step is one)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only, not on biases and norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


class Trainer:
    """One run: the prepared model, optimizer and schedule, the evaluators, the state, and the loop over them."""

    def __init__(self, accelerator, args, eval_args, output_dir: Path, data, windows, config, stop_signals):
        with user_input_errors("arguments", accelerator):
            args = default_compilation(args, accelerator)
        self.accelerator, self.args, self.eval_args, self.output_dir = accelerator, args, eval_args, output_dir
        self.data, self.config, self.stop_signals = data, config, stop_signals
        self.num_windows = len(windows)
        with user_input_errors("arguments", accelerator):
            self.tf32 = use_tf32(accelerator, args.tf32)
        on_cuda = accelerator.device.type == "cuda"
        # on the device before the optimizer is made (a fused AdamW checks where its parameters are)
        model = BlossomRecForSequentialRecommendation(config).to(accelerator.device)
        # Evaluation scores an unprepared float32 copy: bf16 scores would tie often, and ties favour the target.
        self.eval_model = copy.deepcopy(model)
        if args.torch_compile:
            # a captured step needs a model without CUDA graphs of its own; evaluation still replays them
            compile_model(model, args, args.torch_compile_mode)
            compile_model(self.eval_model, args, args.torch_compile_mode or
                          ("reduce-overhead" if args.cuda_graph_step and uses_inductor(args) else None))
        with user_input_errors("arguments", accelerator):
            # This process's batches, dealt by the loader's own batch sampler: not prepared (Accelerate would shard
            # them again); `epoch_batches` moves them to the device.
            self.dataloader = training_dataloader(
                windows, args.max_seq_length, args.per_device_train_batch_size, args.seed,
                args.dataloader_num_workers, args.tokens_per_batch, static_shapes=args.torch_compile,
                num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                accumulation_steps=args.gradient_accumulation_steps, pin_memory=on_cuda)
            self.evaluators = {split: ranking_evaluator(accelerator, data, split, args.max_seq_length, eval_args,
                                                        static_shapes=args.torch_compile)
                               for split in ("validation", "test")}
        self.sampler = self.dataloader.batch_sampler  # the epoch's order and each step's batches
        # fused: one kernel per step on a GPU instead of a few per parameter (host time, once the model's step is a
        # CUDA graph replay); not under fp16, whose loss scaler would then run every step and hide skipped ones from
        # Accelerate (the schedule would advance on them)
        fused = on_cuda and accelerator.mixed_precision != "fp16"
        optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate,
                                      fused=fused or None)
        if args.cuda_graph_step:
            make_capturable(optimizer)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.graph_step = CudaGraphStep(self.optimizer_step, self.optimizer,
                                        accumulation_steps=args.gradient_accumulation_steps) \
            if args.cuda_graph_step else None
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * self.steps_per_epoch
        # A prepared scheduler steps once per process at every optimizer step.
        self.scheduler = accelerator.prepare(get_scheduler(
            args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
            num_training_steps=self.total_steps * accelerator.num_processes))
        self.state = TrainerState()
        self.window = LoggingWindow(accelerator.device)
        self.progress = None

    def resume(self, path: Path) -> None:
        settings = optimizer_settings(self.optimizer.optimizer)
        self.state = load_checkpoint(self.accelerator, path)
        restore_optimizer_settings(self.optimizer.optimizer, settings)
        # The checkpoint's position in the epoch, in steps, as this run's batches per process (it may split the
        # batches of a step otherwise: more processes, less accumulation).
        saved_accumulation = (self.state.run_config or {}).get("gradient_accumulation_steps") or 1
        steps_in_epoch = self.state.batches_in_epoch // saved_accumulation
        self.state.batches_in_epoch = steps_in_epoch * self.args.gradient_accumulation_steps
        self.accelerator.print(f"resumed from {path} at step {self.state.global_step} (epoch {self.state.epoch})")

    def print_summary(self, dataset: str) -> None:
        data, config, accelerator = self.data, self.config, self.accelerator
        accelerator.print(
            f"{dataset}: {data.vocab.n_items} items, {len(data.splits['test'])} users, "
            f"{self.num_windows} training windows; {config.attention_type} attention "
            f"({config._attn_implementation}), {sum(p.numel() for p in self.model.parameters()):,} parameters; "
            f"{accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}"
            f"{', TF32 matmuls' if self.tf32 else ''}, {self._step_mode()}; "
            f"{self.total_steps} steps of {self.steps_per_epoch} per epoch, {self.sampler.batches_per_step} "
            f"batch(es) per step")

    def _step_mode(self) -> str:
        args = self.args
        if not args.torch_compile:
            return "eager steps (--torch_compile to compile them)"
        mode = args.torch_compile_mode or "default"
        if args.cuda_graph_step:
            return (f"torch.compile mode {mode}, the whole step replayed from one CUDA graph (--cuda_graph_step false "
                    f"for compiled steps, --torch_compile false for eager ones)")
        graphs = self.accelerator.device.type == "cuda" and mode in GRAPHED_COMPILE_MODES
        graphs = " with CUDA graphs" if graphs else ""
        return f"torch.compile mode {mode}{graphs} (--torch_compile false for eager steps)"

    def compute_loss(self, batch: dict) -> torch.Tensor:
        """The training loss of one batch: the mean over its targets (static batches also give their histories'
        boundaries)."""
        return self.model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch.get("position_ids"),
                          cu_seq_lens_q=batch.get("cu_seq_lens_q"), max_length_q=batch.get("max_length_q")).loss

    def epoch_batches(self, epoch: int, start_step: int = 0):
        """This process's batches of ``epoch`` from its optimizer step ``start_step`` on, on the device, each with
        ``loss_scale`` (the factor that makes its step's gradient the mean over the step's targets, all processes
        together; 0 for a padding batch) and ``padding``; a padding batch's ``num_targets`` is 0."""
        self.sampler.set_epoch(epoch, start_step)
        plan = self.sampler.plan()
        num_processes, accumulation = self.accelerator.num_processes, self.args.gradient_accumulation_steps
        for planned, batch in zip(plan, self.dataloader, strict=True):
            if batch["num_targets"] != planned.targets:  # the loader iterates the same plan
                raise RuntimeError(f"batch of {batch['num_targets']} targets where the plan has {planned.targets}")
            # from page-locked memory on a GPU: queued behind the running step instead of waiting for it
            batch = send_to_device(batch, self.accelerator.device, non_blocking=self.accelerator.device.type == "cuda")
            batch["loss_scale"] = planned.loss_scale(num_processes, accumulation)
            batch["padding"] = planned.padding
            if planned.padding:
                batch["num_targets"] = 0
            yield batch

    def training_step(self, batch: dict) -> bool:
        """Forward and backward on one batch of `epoch_batches`, and the optimizer step where gradient accumulation
        allows one (from the captured graph with ``--cuda_graph_step``); returns whether an optimizer step was
        taken."""
        with self.accelerator.accumulate(self.model):
            if self.graph_step is not None:  # the captured step zeroes the gradients itself (or writes them afresh)
                loss = self.graph_step({key: batch[key] for key in STEP_INPUTS if key in batch},
                                       optimizer_step=self.accelerator.sync_gradients)
                self.scheduler.step()
            else:
                loss = self.optimizer_step(batch)
                self.scheduler.step()
                self.optimizer.zero_grad()
        self.state.batches_in_epoch += 1
        if not batch["padding"]:
            self.window.add(loss, batch["num_targets"])
        return self.accelerator.sync_gradients

    def optimizer_step(self, batch: dict) -> torch.Tensor:
        """Forward, backward, clipping and the optimizer step (where gradient accumulation allows one); the loss."""
        loss = self.compute_loss(batch)
        # loss_scale: a Python float (no host sync; a compiled model's graph does not see it), a device scalar in a
        # captured step
        self.accelerator.backward(loss * batch["loss_scale"])
        if self.accelerator.sync_gradients and self.args.max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.optimizer.step()
        return loss

    def train(self) -> int:
        """Train to the last step or early stopping; 0, or 128 + the signal number when a stop signal cut it short.

        Raises ``NonFiniteLoss`` before anything of the diverged weights is evaluated or saved.
        """
        self.progress = tqdm(total=self.total_steps, initial=self.state.global_step, dynamic_ncols=True,
                             disable=not self.accelerator.is_local_main_process, desc="training")
        self.model.train()
        outcome = None
        with self.progress:
            if self.state.evaluation_pending:  # the run stopped by a signal skipped it; same weights now
                self.state.evaluation_pending = False
                self.evaluate()
            while outcome is None and self.state.global_step < self.total_steps and not self.state.stopped_early:
                outcome = self._train_epoch()
            if outcome != "stop" and self.state.best_step is None:  # resumed past the end before any evaluation
                self.evaluate()
        if outcome == "stop":
            self.accelerator.print(f"stopped by signal at step {self.state.global_step}; resume with "
                                   f"--resume_from_checkpoint latest")
            return self.stop_signals.exit_code
        return 0

    def _epoch_batches(self):
        """The batches of the current epoch not yet trained on: the order depends only on seed + epoch."""
        steps_done = self.state.batches_in_epoch // self.args.gradient_accumulation_steps
        return self.epoch_batches(self.state.epoch, steps_done)

    def _train_epoch(self) -> str | None:
        """The rest of the current epoch; "stop" (a stop signal), "done" (last step, early stopping) or None."""
        step_start = time.perf_counter()
        for batch in self._epoch_batches():
            if not self.training_step(batch):
                continue
            self.state.global_step += 1
            self.state.train_seconds += time.perf_counter() - step_start
            end_of_epoch = self.state.batches_in_epoch == len(self.dataloader)
            if end_of_epoch:
                self.state.epoch, self.state.batches_in_epoch = self.state.epoch + 1, 0
            self.progress.update(1)
            outcome = self._after_optimizer_step(end_of_epoch)
            if outcome is not None:
                return outcome
            step_start = time.perf_counter()
        return None

    def _after_optimizer_step(self, end_of_epoch: bool) -> str | None:
        """Log, evaluate and checkpoint as due at this step; "stop", "done" or None as in ``_train_epoch``."""
        state, args = self.state, self.args
        finished = state.global_step >= self.total_steps
        log_now = state.global_step % args.logging_steps == 0 or finished
        evaluate_now = (state.global_step % args.eval_steps == 0 if args.eval_steps else end_of_epoch) or finished
        stop = self.stop_signals.requested(self.accelerator, state.global_step)
        save_now = evaluate_now or stop or bool(args.save_steps and state.global_step % args.save_steps == 0)
        if log_now or save_now:
            self.window.fold(self.accelerator, state)
        if log_now:
            self._log()
        if evaluate_now and stop:
            # Save now: a launcher may kill the run soon after the signal (accelerate launch: after 5 s). The weights
            # are in the checkpoint, so the resumed run evaluates them first.
            state.evaluation_pending = True
        elif evaluate_now:
            self.evaluate()
        if save_now:
            if self.graph_step is not None:
                # the scheduler keeps copies of the device learning rates; as floats, the checkpoint loads anywhere
                self.scheduler.scheduler._last_lr = [float(lr) for lr in self.scheduler.get_last_lr()]
            save_checkpoint(self.accelerator, self.output_dir, state, args.save_total_limit)
        if stop:
            return "stop"
        return "done" if finished or state.stopped_early else None

    def _log(self) -> None:
        logs = LoggingWindow.close(self.state, float(self.scheduler.get_last_lr()[0]))
        self.state.log_history.append({"step": self.state.global_step, **logs})
        self.accelerator.log(logs, step=self.state.global_step)
        self.progress.set_postfix(loss=f"{logs['train/loss']:.4f}",
                                  items_per_s=f"{logs['train/items_per_second']:,.0f}")

    def evaluate(self) -> None:
        """Validation metrics of the current weights; keeps the best model in output_dir and counts patience."""
        state, accelerator = self.state, self.accelerator
        self.eval_model.load_state_dict(accelerator.unwrap_model(self.model).state_dict())
        metrics = self.evaluators["validation"].evaluate_model(self.eval_model)
        epoch = round(state.epoch + state.batches_in_epoch / len(self.dataloader), 4)
        state.log_history.append({"step": state.global_step, "epoch": epoch,
                                  **{f"validation/{k}": v for k, v in metrics.items()}})
        accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state.global_step)
        improved = state.best_metric is None or metrics[EARLY_STOPPING_METRIC] > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.best_epoch = metrics[EARLY_STOPPING_METRIC], \
                state.global_step, epoch
            state.best_train_seconds, state.best_validation = state.train_seconds, metrics
            state.evaluations_without_improvement = 0
            write_or_stop(accelerator, f"the best model to {self.output_dir}",
                          lambda: save_best_model(self.eval_model, self.data.vocab, self.output_dir),
                          main_process_only=True)
        else:
            state.evaluations_without_improvement += 1
        patience = self.args.early_stopping_patience
        state.stopped_early = patience > 0 and state.evaluations_without_improvement >= patience
        if accelerator.is_main_process:
            self.progress.write(f"step {state.global_step} (epoch {epoch:.2f}): validation {EARLY_STOPPING_METRIC} "
                                f"{metrics[EARLY_STOPPING_METRIC]:.4f}, recall@10 {metrics['recall@10']:.4f}"
                                f"{' (best)' if improved else ''}")
            if state.stopped_early:
                self.progress.write(f"early stopping: no better validation {EARLY_STOPPING_METRIC} in {patience} "
                                    f"evaluations (best at step {state.best_step})")

    def finish(self, dataset: str) -> None:
        """Test the best model (as saved) next to the popularity baseline (unless --do_predict false); write metrics.json, the final state and
        the plot; push to the Hub if asked."""
        self.accelerator.wait_for_everyone()
        results = self._final_results(dataset)
        output_dir = self.output_dir

        def write_results():
            write_json_atomic(output_dir / METRICS_FILE, results)
            self.state.save(output_dir / STATE_FILE)
            return plot_training_curves(self.state.log_history, output_dir / PLOT_FILE)

        plot = write_or_stop(self.accelerator, f"the results to {output_dir}", write_results, main_process_only=True)
        if not self.accelerator.is_main_process:
            return
        self._print_test(results)
        print(f"saved to {self.output_dir}")
        if self.args.torch_compile:
            print(f"torch.compile: {compiled_graphs()} graphs captured (training step and evaluation)")
        print(f"training curves: {plot}" if plot else
              'training curves not drawn: matplotlib is not installed (pip install -e ".[plot]")')
        if self.args.push_to_hub:
            from ..hub import push_to_hub

            print(f"pushed to {push_to_hub(str(self.output_dir), self.args.hub_model_id)}")

    def _print_test(self, results: dict) -> None:
        best = f"best validation at step {self.state.best_step}, {self.state.best_train_seconds:.1f} s of training"
        if "test" not in results:
            print(f"\n{best}; test split not ranked (--do_predict false)")
            return
        name = "BlossomRec" if self.config.attention_type == "blossom" else "dense (SASRec)"
        print(f"\ntest ({self.eval_args.eval_mode} ranking, {results['test']['model']['num_users']} users), {best}:")
        print(format_metrics_table({name: results["test"]["model"], "popularity": results["test"]["popularity"]}))

    def _final_results(self, dataset: str) -> dict:
        state, evaluators = self.state, self.evaluators
        results = {
            "dataset": dataset,
            "attention_type": self.config.attention_type,
            "eval_mode": self.eval_args.eval_mode,
            "exclude_history": self.eval_args.exclude_history,
            "n_items": self.data.vocab.n_items,
            "best_step": state.best_step,
            "best_epoch": state.best_epoch,
            "train_seconds_to_best": round(state.best_train_seconds, 2),
            "train_seconds": round(state.train_seconds, 2),
            "train_items_per_second": round(state.train_targets / max(state.train_seconds, 1e-9), 1),
            "global_step": state.global_step,
            "stopped_early": state.stopped_early,
            "num_processes": self.accelerator.num_processes,
            "peak_gpu_memory_mib": peak_gpu_memory_mib(self.accelerator.device),
            "validation": {"model": state.best_validation,
                           "popularity": evaluators["validation"].evaluate_popularity()},
        }
        if self.args.do_predict:
            best_model = BlossomRecForSequentialRecommendation.from_pretrained(
                self.output_dir, attn_implementation=self.config._attn_implementation).to(self.accelerator.device)
            results["test"] = {"model": evaluators["test"].evaluate_model(best_model),
                               "popularity": evaluators["test"].evaluate_popularity()}
        return results
