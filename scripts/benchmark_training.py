"""Training throughput, packed vs padded batches: whole training steps and epochs of BlossomRec and dense SASRec.

    PYTHONPATH=src python scripts/benchmark_training.py --data_dir .device/data
    PYTHONPATH=src python scripts/benchmark_training.py --datasets beauty50 --models blossom   # a subset
    PYTHONPATH=src python scripts/benchmark_training.py --datasets beauty50 longtail16k --layouts packed \
        --multi_gpu 1 2 4 8 --output benchmarks/results/training_scaling                      # several GPUs

What users get from the training loop of ``scripts/train.py``: each configuration builds the model config as
train.py does (same defaults: hidden 128, 2 layers, ...), the real ``Trainer`` (Accelerate-prepared model, AdamW,
scheduler, data loader; bf16 autocast on CUDA) and times its ``training_step`` (forward with labels = the model's own
loss, backward, gradient clipping, optimizer step) over the batches of its data loader, data loading included.

Rows: datasets x models x layouts.
- datasets: ``beauty50`` / ``beauty200`` (Amazon Beauty, --max_seq_length 50 / 200), ``ml100k200`` (MovieLens 100K,
  200), ``longtail16k`` (a seeded synthetic log whose trained histories are log-uniform in length over 1..16,384,
  --max_seq_length 16,384); ``longtail<N>`` (or ``longtail<N>k``) is the same log at max length N (N x 1024).
- models: ``blossom`` (``--blossom_implementation``, default blossom_triton; it falls back to the PyTorch path with a
  warning on CPU) and ``dense`` (``--dense_implementation``, default sdpa).
- layouts: ``padded`` (``TrainingCollator``: --per_device_train_batch_size windows, left-padded [B, L+1]) and
  ``packed`` (``PackedTrainingCollator`` + ``TokenBudgetBatchSampler``: [1, T] with position_ids, at most
  --max_tokens_per_batch items, raised to max length + 1 where that is larger).

Per row, after --warmup_steps untimed steps (epoch 0), one timed epoch (epoch 1; more whole epochs while fewer than
--min_timed_steps steps are timed): next-item targets per second (the collators' ``num_targets``), the epoch's wall
time, the mean / median step time and the peak GPU memory (``torch.cuda.max_memory_allocated``, reset per row; model,
optimizer and the trainer's evaluation copy included) with the allocator's peak reservation beside it
(``max_memory_reserved``: tensors that a CUDA graph's replays reuse from its pool are not allocated again, so only the
reservation shows what graphs hold after their capture).
An epoch of more than --max_steps batches, or one that passes --max_seconds, is timed over its first batches and its
time extrapolated from the targets per second ("~" in the table, ``epoch_extrapolated`` in the JSON). A row that runs
out of GPU memory is recorded as OOM and the next one runs.

Writes ``<output>.json`` (device, versions, command, settings, rows, ratios, targets), ``<output>.txt`` (the table)
and ``<output>.png``; prints the table, the ratios packed/padded and blossom/dense, and the issue's targets.

Several processes (``--multi_gpu 1 2 4 8``): for each count N the script launches itself through
``accelerate launch --num_processes N`` (DDP, one GPU per process; gloo processes on the CPU) and runs every row
there: the same Trainer, each process training its own batch of ``--max_tokens_per_batch`` items per step (the
global batch grows with N, as with ``train.py --multi_gpu``). items/s counts every process's targets over the main
process's wall time between barriers; a step is an optimizer step (one batch per process). The scaling efficiency of
a row is its items/s per process over the one-process row's items/s (target: >= 90 % on 2 processes, >= 85 % on 8).
The JSON adds ``runs`` (each launch) and ``scaling``; the text a scaling table; the plot shows items/s and the
efficiency against the number of processes. Launch it as a plain ``python`` command (it launches the processes).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import math
import os
import platform
import re
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from blossomrec_hf.data import (PreparedData, build_histories, check_trainable, leave_one_out, one_line_data_warnings,
                                prepare_data)
from blossomrec_hf.data.tables import make_table
from blossomrec_hf.model.blossom_attention_triton import triton_unavailable_reason
from blossomrec_hf.training.trainer import GRAPHED_COMPILE_MODES, Trainer
from blossomrec_hf.training_args import EvaluationArguments, TrainingArguments, build_model_config, model_config_fields

DEFAULT_DATASETS = ["beauty50", "beauty200", "ml100k200", "longtail16k"]
MODELS = ("blossom", "dense")
LAYOUTS = ("padded", "packed")
# name -> (file under --data_dir, max_seq_length, windows per batch, what it is); the batch sizes are those of
# benchmark_quality.py's runs
REAL_DATASETS = {
    "beauty50": ("Beauty.txt", 50, 256, "Amazon Beauty"),
    "beauty200": ("Beauty.txt", 200, 256, "Amazon Beauty"),
    "ml100k200": ("ml-100k.inter", 200, 128, "MovieLens 100K"),
}
# the synthetic logs' default batch: this many items (a GPU-sized batch at every length)
LONG_TAIL_BATCH_ITEMS = 131072
BEAUTY_FILE = "Beauty.txt"


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    max_seq_length: int
    file: str | None  # under --data_dir; None: the synthetic long-tail log
    description: str
    batch_size: int  # windows per batch unless --per_device_train_batch_size is given


def dataset_spec(name: str) -> DatasetSpec:
    """The dataset behind a row name; a ValueError for unknown names."""
    if name in REAL_DATASETS:
        file, max_seq_length, batch_size, description = REAL_DATASETS[name]
        return DatasetSpec(name, max_seq_length, file, description, batch_size)
    match = re.fullmatch(r"longtail(\d+)(k?)", name)
    if match and int(match[1]) > 0:
        max_seq_length = int(match[1]) * (1024 if match[2] else 1)
        return DatasetSpec(name, max_seq_length, None,
                           f"synthetic, trained histories log-uniform over 1..{max_seq_length:,}",
                           max(1, LONG_TAIL_BATCH_ITEMS // (max_seq_length + 1)))
    raise ValueError(f"unknown dataset {name!r}: choose among {', '.join(REAL_DATASETS)} or longtail<N>[k]")


# ---------------------------------------------------------------------------------------------------------------- data


def long_tail_interactions(*, num_users: int, max_length: int, num_items: int, seed: int):
    """Events (user, item, timestamp) of users whose trained histories are log-uniform in length over 1..max_length.

    Each user gets 2 more events, the validation and test targets of the leave-one-out split, so the training history
    is the drawn length and the longest fill a whole window. Items are uniform over ``num_items``: only the lengths
    matter for throughput.
    """
    rng = np.random.default_rng(seed)
    trained = np.floor(np.exp(rng.uniform(0.0, math.log(max_length + 1), size=num_users))).astype(np.int64)
    lengths = trained.clip(1, max_length) + 2
    user = np.repeat(np.arange(num_users), lengths)
    item = rng.integers(num_items, size=int(lengths.sum()))
    user_names = np.array([f"u{u}" for u in range(num_users)], dtype=object)
    item_names = np.array([f"i{i}" for i in range(num_items)], dtype=object)
    return make_table({"user": user_names[user], "item": item_names[item],
                       "timestamp": np.arange(len(item), dtype=np.float64)})


def long_tail_data(*, num_users: int, max_length: int, num_items: int, seed: int) -> PreparedData:
    events = long_tail_interactions(num_users=num_users, max_length=max_length, num_items=num_items, seed=seed)
    histories, vocab = build_histories(events)
    info = {"source": "synthetic long tail", "users": num_users, "items": vocab.n_items, "seed": seed}
    return PreparedData(leave_one_out(histories), vocab, info)


def load_dataset(spec: DatasetSpec, args) -> tuple[PreparedData, object]:
    """The prepared splits and the training windows, as train.py reads them (default filters)."""
    if spec.file is None:
        data = long_tail_data(num_users=args.longtail_users, max_length=spec.max_seq_length,
                              num_items=args.longtail_items, seed=args.seed)
    else:
        data = prepare_data(str(Path(args.data_dir) / spec.file), max_seq_length=spec.max_seq_length)
    return data, check_trainable(data, spec.max_seq_length)


def window_lengths(windows, max_seq_length: int) -> np.ndarray:
    return np.array([min(len(window), max_seq_length + 1) for window in windows["input_ids"]], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------ configuration


def windows_per_batch(spec: DatasetSpec, args) -> int:
    """The padded batches' size: --per_device_train_batch_size or the dataset's default."""
    return args.per_device_train_batch_size or spec.batch_size


def token_budget(spec: DatasetSpec, args) -> int:
    """The packed batches' item budget: --max_tokens_per_batch, else train.py's default (the padded batch's
    capacity, windows x (max length + 1)); at least one whole window."""
    budget = args.max_tokens_per_batch or windows_per_batch(spec, args) * (spec.max_seq_length + 1)
    return max(budget, spec.max_seq_length + 1)


def implementation(model: str, args) -> str:
    return args.blossom_implementation if model == "blossom" else args.dense_implementation


def attention_path(attn_implementation: str, device: torch.device) -> str:
    """What runs the attention: blossom_triton on CPU tensors takes the PyTorch path unless Triton interprets."""
    if attn_implementation == "blossom_triton" and device.type == "cpu" and \
            os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        return "blossom_torch (blossom_triton falls back on CPU)"
    return attn_implementation


def training_arguments(spec: DatasetSpec, *, model: str, layout: str, args) -> TrainingArguments:
    """train.py's arguments for this row (its defaults for everything not benchmarked)."""
    return TrainingArguments(
        output_dir=str(result_path(args.output, ".json").parent),  # nothing is written there: no save, no eval
        max_seq_length=spec.max_seq_length, attention_type=model, attn_implementation=implementation(model, args),
        per_device_train_batch_size=windows_per_batch(spec, args),
        max_tokens_per_batch=token_budget(spec, args) if layout == "packed" else 0,
        seed=args.seed, dataloader_num_workers=args.dataloader_num_workers, torch_compile=args.torch_compile,
        torch_compile_mode=args.torch_compile_mode, cuda_graph_step=args.cuda_graph_step, tf32=args.tf32)


def build_trainer(accelerator, *, data, windows, training_args: TrainingArguments, model_overrides: dict) -> Trainer:
    config = build_model_config(training_args, model_overrides, data.vocab.n_items)
    trainer = Trainer(accelerator, training_args, EvaluationArguments(), Path(training_args.output_dir), data, windows,
                      config, stop_signals=None)
    trainer.model.train()
    return trainer


# ------------------------------------------------------------------------------------------------------------ timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepClock:
    """Marks at step boundaries: CUDA events on the GPU (no sync per step), host time on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self) -> list[float]:
        """Milliseconds between consecutive marks (call after a device sync)."""
        pairs = zip(self.marks, self.marks[1:])
        if self.cuda:
            return [start.elapsed_time(end) for start, end in pairs]
        return [(end - start) * 1e3 for start, end in pairs]


def epoch_batches(trainer: Trainer, epoch: int):
    """An iterator over this process's batches of the epoch, in the order training gives them (seed + epoch), on the
    device and with their loss scale."""
    return trainer.epoch_batches(epoch)


def close(batches) -> None:
    """End an epoch's iterator early (a generator: its prefetched batch is let go now)."""
    if hasattr(batches, "close"):
        batches.close()


def warm_up(trainer: Trainer, steps: int) -> int:
    """``steps`` untimed training steps from epoch 0 on; returns the first epoch not touched."""
    epoch, done = 0, 0
    while done < steps:
        batches = epoch_batches(trainer, epoch)
        for batch in batches:
            trainer.training_step(batch)
            done += 1
            if done == steps:
                break
        close(batches)
        epoch += 1
    return epoch


# With several processes the time limit is agreed on (a collective, so a device sync) every this many steps: a
# process that stopped alone would leave the others waiting in DDP's gradient all-reduce.
TIME_CHECK_EVERY = 10


def out_of_time(accelerator, steps: int, start: float, max_seconds: float) -> bool:
    """Whether the timed epoch has passed ``max_seconds`` after ``steps`` steps, the same answer on every process."""
    if accelerator.num_processes == 1:
        return time.perf_counter() - start >= max_seconds
    if steps % TIME_CHECK_EVERY:
        return False
    late = torch.tensor([time.perf_counter() - start >= max_seconds], dtype=torch.int32, device=accelerator.device)
    return bool(accelerator.reduce(late, reduction="max").item())


def timed_epoch(trainer: Trainer, *, epoch: int, device: torch.device, max_steps: int, max_seconds: float) -> dict:
    """One epoch of training steps (at most ``max_steps``, stopping after the step that passes ``max_seconds``).

    With several processes every process takes the same steps (each one batch of its own, DDP in lockstep); the time
    is the main process's, from a barrier to a barrier, and ``targets`` counts every process's."""
    accelerator = trainer.accelerator
    clock = StepClock(device)
    steps, targets = 0, 0
    synchronize(device)
    accelerator.wait_for_everyone()
    start = time.perf_counter()
    clock.mark()
    batches = epoch_batches(trainer, epoch)
    for batch in batches:
        trainer.training_step(batch)
        clock.mark()
        steps += 1
        targets += int(batch["num_targets"])
        if steps >= max_steps or out_of_time(accelerator, steps, start, max_seconds):
            break
    synchronize(device)
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - start
    close(batches)
    if accelerator.num_processes > 1:
        targets = int(accelerator.reduce(torch.tensor([targets], device=device), reduction="sum").item())
    return {"steps": steps, "targets": targets, "seconds": seconds, "step_ms": clock.step_ms()}


def peak_memory_gib(accelerator, device: torch.device) -> dict:
    """The most GPU memory any process allocated, and the most its allocator reserved (None on the CPU)."""
    if device.type != "cuda":
        return {"peak_memory_gib": None, "peak_reserved_gib": None}
    peaks = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)],
                         dtype=torch.float64, device=device)
    allocated, reserved = (accelerator.reduce(peaks, reduction="max") / 2**30).tolist()
    return {"peak_memory_gib": allocated, "peak_reserved_gib": reserved}


def timed_epochs(trainer: Trainer, *, first_epoch: int, device: torch.device, args) -> dict:
    """One epoch timed as `timed_epoch` does (within --max_steps and --max_seconds); a whole epoch of fewer than
    --min_timed_steps steps (a packed epoch can be 3) is followed by more whole epochs while fewer than that many steps
    are timed, another fits within --max_steps and --max_seconds have not passed. `epochs` counts the whole epochs
    timed (0: the first was cut short)."""
    timed = timed_epoch(trainer, epoch=first_epoch, device=device, max_steps=args.max_steps,
                        max_seconds=args.max_seconds)
    if timed["steps"] < trainer.steps_per_epoch:  # cut short: the row is extrapolated from its steps
        return {**timed, "epochs": 0}
    total, epoch = {**timed, "epochs": 1}, first_epoch + 1
    while total["steps"] < args.min_timed_steps and total["steps"] + trainer.steps_per_epoch <= args.max_steps \
            and total["seconds"] < args.max_seconds:
        more = timed_epoch(trainer, epoch=epoch, device=device, max_steps=trainer.steps_per_epoch,
                           max_seconds=float("inf"))
        for key in ("steps", "targets", "seconds", "step_ms"):
            total[key] += more[key]
        total["epochs"] += 1
        epoch += 1
    return total


def measure(trainer: Trainer, *, device: torch.device, epoch_targets: int, args) -> dict:
    """Warm up, time whole epochs (or the first one's first steps, then extrapolate); the row's measured fields. A
    step is one optimizer step: one batch per process."""
    first_epoch = warm_up(trainer, args.warmup_steps)
    timed = timed_epochs(trainer, first_epoch=first_epoch, device=device, args=args)
    items_per_s = timed["targets"] / timed["seconds"]
    step_ms = np.array(timed["step_ms"])
    return {
        "items_per_s": items_per_s,
        "epoch_s": timed["seconds"] / timed["epochs"] if timed["epochs"] else epoch_targets / items_per_s,
        "epoch_extrapolated": not timed["epochs"],
        "timed_epochs": timed["epochs"],
        "timed_steps": timed["steps"],
        "timed_targets": timed["targets"],
        "timed_seconds": timed["seconds"],
        "mean_step_ms": float(step_ms.mean()),
        "median_step_ms": float(np.median(step_ms)),
        "targets_per_step": timed["targets"] / timed["steps"],
        **peak_memory_gib(trainer.accelerator, device),
    }


def kernel_profile(trainer: Trainer, *, device: torch.device, steps: int, rows: int = 12) -> dict:
    """Where ``steps`` training steps (after the timed ones) spend the device's time: milliseconds per step of the
    busiest kernels (torch.profiler; on the CPU, its operators' own time), their total and the step's wall time."""
    cuda = device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    batches = epoch_batches(trainer, 0)
    synchronize(device)
    start, done = time.perf_counter(), 0
    with torch.profiler.profile(activities=[activity]) as profiler:
        for done, batch in enumerate(batches, start=1):
            trainer.training_step(batch)
            if done == steps:
                break
        synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / max(done, 1)
    close(batches)
    if not done:  # an epoch of no batches
        return {"steps": 0, "device_ms_per_step": None, "wall_ms_per_step": None, "kernels": []}
    busy = [(event.device_time_total if cuda else event.self_cpu_time_total, event)
            for event in profiler.key_averages()]
    busy = sorted(((us, event) for us, event in busy if us > 0), key=lambda pair: pair[0], reverse=True)
    return {"steps": done, "device_ms_per_step": sum(us for us, _ in busy) / 1e3 / done, "wall_ms_per_step": wall_ms,
            "kernels": [{"name": event.key[:90], "ms_per_step": us / 1e3 / done, "calls_per_step": event.count / done}
                        for us, event in busy[:rows]]}


class _HostClock:
    """Host seconds spent inside the wrapped callables, by phase name."""

    def __init__(self):
        self.seconds = collections.Counter()

    def wrap(self, name: str, call):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed


def host_phases(trainer: Trainer, *, device: torch.device, steps: int) -> dict:
    """Host milliseconds per step by phase, with no sync between steps: "batch" (the loader's next batch, moved to the
    device), "forward" (``compute_loss``), "backward" and "rest" (clipping, AdamW, schedule, bookkeeping). With the
    GPU busy, the host's phases overlap its work; a phase that waits for the GPU (a sync, a blocking copy) takes that
    wait. Their sum against the step's kernel time says whether the host bounds the step."""
    clock = _HostClock()
    saved = trainer.compute_loss, trainer.accelerator.backward
    trainer.compute_loss = clock.wrap("forward", trainer.compute_loss)
    trainer.accelerator.backward = clock.wrap("backward", trainer.accelerator.backward)
    batches, done = epoch_batches(trainer, 0), 0
    try:
        synchronize(device)
        while done < steps:
            start = time.perf_counter()
            batch = next(batches, None)
            clock.seconds["batch"] += time.perf_counter() - start
            if batch is None:
                break
            clock.wrap("step", trainer.training_step)(batch)
            done += 1
        synchronize(device)
    finally:
        trainer.compute_loss, trainer.accelerator.backward = saved
        close(batches)
    if not done:
        return {}
    ms = {name: seconds * 1e3 / done for name, seconds in clock.seconds.items()}
    forward, backward = ms.get("forward", 0.0), ms.get("backward", 0.0)  # neither runs in a replayed step graph
    return {"batch": ms["batch"], "forward": forward, "backward": backward, "rest": ms["step"] - forward - backward}


def profile_lines(rows) -> list[str]:
    lines = []
    for row in rows:
        profile = row.get("profile")
        if profile and profile["steps"]:
            lines.append(f"{row['dataset']} {row['model']} {row['layout']}: {profile['device_ms_per_step']:.2f} ms of "
                         f"kernels in a {profile['wall_ms_per_step']:.2f} ms step (profiled), the busiest:")
            lines += [f"  {kernel['ms_per_step']:8.3f} ms {kernel['calls_per_step']:6.1f}x  {kernel['name']}"
                      for kernel in profile["kernels"]]
            host = profile.get("host_ms_per_step")
            if host:
                lines.append("  host ms per step: " + ", ".join(f"{name} {ms:.2f}" for name, ms in host.items()))
    return lines


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower())


def first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def release(accelerator, device: torch.device) -> None:
    """Drop the accelerator's references to the last row's model, optimizer and loaders, and the allocator's cache."""
    accelerator.free_memory()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_row(accelerator, *, spec: DatasetSpec, data, windows, model: str, layout: str, args,
            model_overrides: dict) -> dict:
    """One (dataset, model, layout): its settings and measurements; status "ok", "OOM" or "error"."""
    device = accelerator.device
    lengths = window_lengths(windows, spec.max_seq_length)
    training_args = training_arguments(spec, model=model, layout=layout, args=args)
    row = {"dataset": spec.name, "source": spec.file or "synthetic", "max_seq_length": spec.max_seq_length,
           "model": model, "layout": layout, "attn_implementation": implementation(model, args),
           "batch": (f"{training_args.max_tokens_per_batch:,} tokens" if layout == "packed"
                     else f"{training_args.per_device_train_batch_size} windows"),
           "max_tokens_per_batch": training_args.max_tokens_per_batch or None,
           "per_device_train_batch_size": None if layout == "packed" else training_args.per_device_train_batch_size,
           "windows": len(lengths), "epoch_targets": int(lengths.sum() - len(lengths)),
           "num_processes": accelerator.num_processes}
    release(accelerator, device)
    set_seed(args.seed)
    trainer = None
    try:
        trainer = build_trainer(accelerator, data=data, windows=windows, training_args=training_args,
                                model_overrides=model_overrides)
        row["attn_implementation"] = trainer.config._attn_implementation
        row["attention_path"] = attention_path(row["attn_implementation"], device)
        row["torch_compile"], row["torch_compile_mode"] = trainer.args.torch_compile, trainer.args.torch_compile_mode
        row["cuda_graph_step"] = trainer.args.cuda_graph_step
        row["batches_per_epoch"] = trainer.steps_per_epoch  # optimizer steps: one batch per process each
        row.update(measure(trainer, device=device, epoch_targets=row["epoch_targets"], args=args))
        if args.profile_steps:
            row["profile"] = kernel_profile(trainer, device=device, steps=args.profile_steps)
            row["profile"]["host_ms_per_step"] = host_phases(trainer, device=device, steps=args.profile_steps)
        row["status"] = "ok"
    except Exception as error:  # noqa: BLE001 -- one row's failure is recorded; the others still run
        if is_out_of_memory(error):
            row.update(status="OOM", error=first_line(error))
        else:
            traceback.print_exc()
            # the rest of the message names what failed (e.g. the operator an inductor lowering error was in)
            row.update(status="error", error=f"{type(error).__name__}: {first_line(error)}",
                       error_detail=str(error)[:4000])
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    finally:
        trainer = None
    if row.get("torch_compile"):
        torch._dynamo.reset()  # the next row's model compiles afresh, and this row's CUDA graphs free their pools
    release(accelerator, device)
    return row


# ------------------------------------------------------------------------------------------------ ratios and targets


def find_row(rows, **fields) -> dict | None:
    return next((row for row in rows if all(row.get(key) == value for key, value in fields.items())), None)


def ok(row) -> bool:
    return row is not None and row.get("status") == "ok"


def compute_ratios(rows) -> dict:
    """Packed/padded epoch speedup per (dataset, model); blossom/dense items/s and peak memory per (dataset, layout)."""
    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    speedups, blossom_vs_dense = [], []
    for dataset in datasets:
        for model in MODELS:
            padded, packed = (find_row(rows, dataset=dataset, model=model, layout=layout) for layout in LAYOUTS)
            if padded and packed:
                speedups.append({"dataset": dataset, "model": model, "max_seq_length": packed["max_seq_length"],
                                 "source": packed["source"],
                                 "padded_epoch_s": padded.get("epoch_s"), "packed_epoch_s": packed.get("epoch_s"),
                                 "padded_status": padded["status"], "packed_status": packed["status"],
                                 "ratio": (padded["epoch_s"] / packed["epoch_s"] if ok(padded) and ok(packed)
                                           else None)})
        for layout in LAYOUTS:
            blossom, dense = (find_row(rows, dataset=dataset, model=model, layout=layout) for model in MODELS)
            if blossom and dense:
                both = ok(blossom) and ok(dense)
                memory = both and blossom["peak_memory_gib"] is not None and dense["peak_memory_gib"]
                blossom_vs_dense.append({
                    "dataset": dataset, "layout": layout, "max_seq_length": blossom["max_seq_length"],
                    "blossom_status": blossom["status"], "dense_status": dense["status"],
                    "items_per_s_ratio": blossom["items_per_s"] / dense["items_per_s"] if both else None,
                    "peak_memory_ratio": blossom["peak_memory_gib"] / dense["peak_memory_gib"] if memory else None,
                    "blossom_peak_memory_gib": blossom.get("peak_memory_gib"),
                    "dense_peak_memory_gib": dense.get("peak_memory_gib")})
    return {"packed_over_padded_epoch_speedup": speedups, "blossom_over_dense": blossom_vs_dense}


def target(name: str, value: float | None, bound: float, *, at_most: bool = False, why_missing: str = "") -> dict:
    if value is None:
        status = "not measured"
    else:
        status = "met" if (value <= bound if at_most else value >= bound) else "missed"
    return {"target": name, "bound": f"{'<=' if at_most else '>='} {bound:g}", "measured": value, "status": status,
            **({"note": why_missing} if value is None and why_missing else {})}


def why_not(entry: dict, *statuses: str) -> str:
    return ", ".join(f"{entry[s]} ({s.removesuffix('_status')})" for s in statuses if entry[s] != "ok")


def compute_targets(ratios: dict) -> list[dict]:
    """The issue's targets: Beauty epoch >= 4x faster packed than padded; BlossomRec packed >= 1.0x dense packed
    items/s at max length 200 and >= 3x at 16,384; BlossomRec packed peak memory at 16,384 <= dense packed."""
    results = []
    beauty = [s for s in ratios["packed_over_padded_epoch_speedup"] if s["source"] == BEAUTY_FILE]
    for s in beauty:
        results.append(target(f"Beauty epoch packed / padded ({s['dataset']}, {s['model']})", s["ratio"], 4.0,
                              why_missing=why_not(s, "padded_status", "packed_status")))
    if not beauty:
        results.append(target("Beauty epoch packed / padded", None, 4.0, why_missing="no Beauty rows in both layouts"))
    packed = [r for r in ratios["blossom_over_dense"] if r["layout"] == "packed"]
    for length, bound in ((200, 1.0), (16384, 3.0)):
        at_length = [r for r in packed if r["max_seq_length"] == length]
        for r in at_length:
            results.append(target(f"blossom / dense packed items/s at L={length} ({r['dataset']})",
                                  r["items_per_s_ratio"], bound,
                                  why_missing=why_not(r, "blossom_status", "dense_status")))
        if not at_length:
            results.append(target(f"blossom / dense packed items/s at L={length}", None, bound,
                                  why_missing=f"no packed rows of both models at max length {length}"))
    at_16k = [r for r in packed if r["max_seq_length"] == 16384]
    for r in at_16k:
        results.append(target(f"blossom / dense packed peak memory at L=16384 ({r['dataset']})",
                              r["peak_memory_ratio"], 1.0, at_most=True,
                              why_missing=why_not(r, "blossom_status", "dense_status") or "no GPU memory on CPU"))
    if not at_16k:
        results.append(target("blossom / dense packed peak memory at L=16384", None, 1.0, at_most=True,
                              why_missing="no packed rows of both models at max length 16384"))
    return results


# ------------------------------------------------------------------------------------------------------------ output


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table_lines(rows) -> list[str]:
    header = (f"{'dataset':<12} {'L':>6} {'model':<8} {'layout':<7} {'procs':>5} {'batch':>15} {'steps':>7} "
              f"{'timed':>5} {'items/s':>10} {'epoch s':>9} {'step ms':>8} {'median':>8} {'peak GiB':>8} "
              f"{'reserved':>8}  attention")
    lines = [header, "-" * len(header)]
    for row in rows:
        if row["status"] == "ok":
            epoch = ("~" if row["epoch_extrapolated"] else "") + f"{row['epoch_s']:.2f}"
            cells = (f"{row['batches_per_epoch']:>7} {row['timed_steps']:>5} {row['items_per_s']:>10,.0f} "
                     f"{epoch:>9} {row['mean_step_ms']:>8.1f} {row['median_step_ms']:>8.1f} "
                     f"{fmt(row['peak_memory_gib'], '8.2f'):>8} {fmt(row.get('peak_reserved_gib'), '8.2f'):>8}")
        else:
            cells = f"{fmt(row.get('batches_per_epoch'), '7d'):>7} {row['status']:>5} {'':>10} {'':>9} {'':>8} " \
                    f"{'':>8} {fmt(row.get('peak_memory_gib'), '8.2f'):>8} {'':>8}"
        lines.append(f"{row['dataset']:<12} {row['max_seq_length']:>6} {row['model']:<8} {row['layout']:<7} "
                     f"{row.get('num_processes', 1):>5} {row['batch']:>15} {cells}  "
                     f"{row.get('attention_path', row['attn_implementation'])}")
    lines.append("items/s: next-item targets per second, all processes; batch: per process; steps: optimizer steps "
                 "per epoch (a batch per process each); epoch s: one epoch's wall time (~ = extrapolated from the "
                 "timed steps); step ms: mean / median step after warmup; peak GiB: allocated, reserved: the "
                 "allocator's peak reservation (CUDA graphs' pools included)")
    return lines


def ratio_lines(ratios: dict) -> list[str]:
    lines = ["", "epoch speedup, packed over padded (padded epoch s / packed epoch s):"]
    for s in ratios["packed_over_padded_epoch_speedup"]:
        text = fmt(s["ratio"], ".2f") + "x" if s["ratio"] is not None else why_not(s, "padded_status", "packed_status")
        lines.append(f"  {s['dataset']:<12} {s['model']:<8} {text}")
    lines.append("blossom over dense (items/s ratio; peak memory ratio):")
    for r in ratios["blossom_over_dense"]:
        text = (f"{r['items_per_s_ratio']:.2f}x items/s" if r["items_per_s_ratio"] is not None
                else why_not(r, "blossom_status", "dense_status"))
        if r["peak_memory_ratio"] is not None:
            text += f", {r['peak_memory_ratio']:.2f}x memory"
        lines.append(f"  {r['dataset']:<12} {r['layout']:<8} {text}")
    return lines


def target_lines(targets: list[dict]) -> list[str]:
    lines = ["", "targets:"]
    for t in targets:
        measured = f"{t['measured']:.2f}x" if t["measured"] is not None else t.get("note", "")
        lines.append(f"  [{t['status']}] {t['target']}: {measured} (target {t['bound']}x)")
    return lines


def plot(rows, path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(row["dataset"] for row in rows))
    series = [(model, layout) for model in MODELS for layout in LAYOUTS
              if any(row["model"] == model and row["layout"] == layout for row in rows)]
    panels = [("items_per_s", "next-item targets per second (log)"), ("epoch_s", "epoch wall time, s (log)")]
    if any(row.get("peak_memory_gib") for row in rows):
        panels.append(("peak_memory_gib", "peak GPU memory, GiB (log)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5))
    width = 0.8 / max(len(series), 1)
    for axis, (key, label) in zip(np.atleast_1d(axes), panels):
        for index, (model, layout) in enumerate(series):
            xs, values, failed = [], [], []
            for position, dataset in enumerate(datasets):
                row = find_row(rows, dataset=dataset, model=model, layout=layout)
                x = position + index * width
                if ok(row) and row.get(key):
                    xs.append(x)
                    values.append(row[key])
                elif row is not None and not ok(row):
                    failed.append((x, row["status"]))
            axis.bar(xs, values, width, label=f"{model} {layout}", hatch="//" if layout == "padded" else None,
                     color=f"C{MODELS.index(model)}", alpha=0.55 if layout == "padded" else 0.95)
            for x, status in failed:
                axis.text(x, 0.02, status, transform=axis.get_xaxis_transform(), rotation=90, ha="center",
                          va="bottom", fontsize=8, color="red")
        axis.set_xticks([i + 0.4 - width / 2 for i in range(len(datasets))])
        axis.set_xticklabels(datasets)
        axis.set_yscale("log")
        axis.set_ylabel(label)
        axis.grid(True, axis="y", which="both", alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=8)
    figure.suptitle(f"Training throughput, packed vs padded batches: one epoch, whole training steps ({device_name})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def versions() -> dict:
    import accelerate
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def result_path(prefix: str, suffix: str) -> Path:
    """``<prefix><suffix>``; a prefix given with one of the suffixes loses it."""
    for known in (".json", ".txt", ".png"):
        prefix = prefix.removesuffix(known)
    return Path(prefix + suffix)


def report_lines(result: dict) -> list[str]:
    """The table, the ratios, the targets, the kernel profiles (--profile_steps) and the warnings seen while
    training."""
    lines = table_lines(result["rows"]) + ratio_lines(result["ratios"]) + target_lines(result["targets"])
    profiles = profile_lines(result["rows"])
    lines += ["", *profiles] if profiles else []
    return lines + (["", "warnings:", *(f"  {w}" for w in result["warnings"])] if result["warnings"] else [])


def write_results(prefix: str, result: dict, *, with_plot: bool) -> None:
    result_path(prefix, ".json").parent.mkdir(parents=True, exist_ok=True)
    result_path(prefix, ".json").write_text(json.dumps(result, indent=1))
    text = report_lines(result)
    result_path(prefix, ".txt").write_text(f"{result['device']}; {result['command']}\n\n" + "\n".join(text) + "\n")
    if with_plot and result["rows"]:
        plot(result["rows"], result_path(prefix, ".png"), result["device"])


# --------------------------------------------------------------------------------- scaling over processes (--multi_gpu)

# The issue's scaling targets: items/s per process against one process's, at this many processes.
SCALING_TARGETS = {2: 0.90, 8: 0.85}
SCRIPT = Path(__file__).resolve()
LAUNCHED = "BLOSSOMREC_BENCHMARK_LAUNCHED"  # set in the environment of the runs that --multi_gpu launches


def without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name`` and its values (up to the next option)."""
    kept, skipping = [], False
    for token in argv:
        if token == name or token.startswith(name + "="):
            skipping = token == name
            continue
        if skipping and not token.startswith("--"):
            continue
        skipping = False
        kept.append(token)
    return kept


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(num_processes: int, args, script_args: list[str]) -> list[str]:
    """``accelerate launch`` of this script on ``num_processes`` processes of this machine."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1",
            "--num_processes", str(num_processes), "--mixed_precision", args.mixed_precision,
            "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            *(["--multi_gpu"] if num_processes > 1 else []), str(SCRIPT), *script_args]


def launch_environment(num_processes: int, device: str) -> dict:
    """This environment, with the package importable from src/; on the CPU, Accelerate's CPU mode (gloo) and the
    cores shared out between the processes unless OMP_NUM_THREADS says otherwise."""
    env = {**os.environ, LAUNCHED: str(num_processes)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SCRIPT.parents[1] / "src"), env.get("PYTHONPATH")]))
    if device == "cpu":
        env["ACCELERATE_USE_CPU"] = "true"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
    return env


def compute_scaling(rows) -> list[dict]:
    """Per (dataset, model, layout) and number of processes: items/s, items/s per process and the scaling efficiency,
    items/s per process over one process's items/s."""
    entries = []
    for row in rows:
        single = find_row(rows, dataset=row["dataset"], model=row["model"], layout=row["layout"], num_processes=1)
        processes = row["num_processes"]
        per_process = row["items_per_s"] / processes if ok(row) else None
        efficiency = per_process / single["items_per_s"] if per_process is not None and ok(single) else None
        entries.append({"dataset": row["dataset"], "max_seq_length": row["max_seq_length"], "model": row["model"],
                        "layout": row["layout"], "num_processes": processes, "status": row["status"],
                        "items_per_s": row.get("items_per_s"), "items_per_s_per_process": per_process,
                        "one_process_items_per_s": single.get("items_per_s") if single else None,
                        "scaling_efficiency": efficiency})
    return entries


def compute_scaling_targets(scaling: list[dict]) -> list[dict]:
    results = []
    for processes, bound in SCALING_TARGETS.items():
        at = [entry for entry in scaling if entry["num_processes"] == processes]
        for entry in at:
            results.append(target(f"scaling efficiency on {processes} processes ({entry['dataset']}, {entry['model']}, "
                                  f"{entry['layout']})", entry["scaling_efficiency"], bound,
                                  why_missing=f"{entry['status']}" if entry["status"] != "ok" else
                                  "no one-process row"))
        if not at:
            results.append(target(f"scaling efficiency on {processes} processes", None, bound,
                                  why_missing=f"not run on {processes} processes"))
    return results


def scaling_lines(scaling: list[dict]) -> list[str]:
    header = (f"{'dataset':<12} {'L':>6} {'model':<8} {'layout':<7} {'procs':>5} {'items/s':>11} "
              f"{'per process':>11} {'efficiency':>10}")
    lines = ["", "scaling over processes (efficiency: items/s per process / one process's items/s):", header,
             "-" * len(header)]
    for entry in scaling:
        measured = (f"{entry['items_per_s']:>11,.0f} {entry['items_per_s_per_process']:>11,.0f} "
                    f"{fmt(entry['scaling_efficiency'], '10.1%')}" if entry["status"] == "ok" else
                    f"{entry['status']:>11}")
        lines.append(f"{entry['dataset']:<12} {entry['max_seq_length']:>6} {entry['model']:<8} {entry['layout']:<7} "
                     f"{entry['num_processes']:>5} {measured}")
    return lines


def plot_scaling(scaling: list[dict], path: Path, device_name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (speed, efficiency) = plt.subplots(1, 2, figsize=(11, 4.5))
    series = list(dict.fromkeys((e["dataset"], e["model"], e["layout"]) for e in scaling))
    for index, key in enumerate(series):
        points = [e for e in scaling if (e["dataset"], e["model"], e["layout"]) == key and e["status"] == "ok"]
        label = " ".join(key)
        speed.plot([e["num_processes"] for e in points], [e["items_per_s"] for e in points], "o-", label=label,
                   color=f"C{index}")
        kept = [e for e in points if e["scaling_efficiency"] is not None]
        efficiency.plot([e["num_processes"] for e in kept], [e["scaling_efficiency"] for e in kept], "o-",
                        label=label, color=f"C{index}")
    counts = sorted({e["num_processes"] for e in scaling})
    for index, key in enumerate(series):  # ideal: one process's items/s times the processes
        single = next((e for e in scaling if (e["dataset"], e["model"], e["layout"]) == key
                       and e["num_processes"] == 1 and e["status"] == "ok"), None)
        if single is not None:
            speed.plot(counts, [single["items_per_s"] * c for c in counts], ":", color=f"C{index}", linewidth=1)
    for axis in (speed, efficiency):
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts)
        axis.set_xticklabels([str(c) for c in counts])
        axis.set_xlabel("processes")
        axis.grid(True, alpha=0.3)
    speed.set_yscale("log")
    speed.set_ylabel("next-item targets per second, all processes (log; dotted: linear)")
    efficiency.set_ylabel("items/s per process / one process's")
    for processes, bound in SCALING_TARGETS.items():
        efficiency.axhline(bound, color="grey", linestyle=":", linewidth=1)
        efficiency.annotate(f"target {bound:.0%} at {processes}", (counts[0], bound), fontsize=7, color="grey",
                            va="bottom")
    efficiency.set_ylim(0, 1.15)
    speed.legend(fontsize=7)
    figure.suptitle(f"Training throughput over processes (DDP): whole training steps ({device_name})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_scaling(argv: list[str], args) -> dict:
    """``--multi_gpu``: every row on each number of processes (an ``accelerate launch`` of this script each, writing
    its results to a temporary prefix); the rows together with the scaling table, JSON, text and plot."""
    import subprocess
    import tempfile

    script_args = without_option(without_option(without_option(argv, "--multi_gpu"), "--output"), "--no_plot")
    if args.torch_compile is None and args.torch_compile_mode is None:
        # one mode for every process count: train.py's default differs between one process (CUDA graphs) and several
        # (eager), which would mix the two in the scaling ratios
        script_args += ["--torch_compile", "false"]
        print("--multi_gpu: eager steps for every process count (--torch_compile to compile them all)", flush=True)
    result = {"device": None, **versions(), "command": "python " + shlex.join(["scripts/benchmark_training.py", *argv]),
              "settings": {key: value for key, value in vars(args).items() if key not in model_config_fields()},
              "runs": [], "rows": [], "scaling": [], "ratios": {}, "targets": [], "warnings": []}
    for processes in args.multi_gpu:
        print(f"\n== {processes} process(es): accelerate launch --num_processes {processes}", flush=True)
        with tempfile.TemporaryDirectory() as folder:
            prefix = Path(folder) / "run"
            command = launch_command(processes, args, [*script_args, "--output", str(prefix), "--no_plot"])
            completed = subprocess.run(command, env=launch_environment(processes, args.device), check=False)
            written = result_path(str(prefix), ".json")
            run = json.loads(written.read_text()) if written.is_file() else None
        result["runs"].append({"num_processes": processes, "returncode": completed.returncode,
                               "command": shlex.join(command),
                               "device": run["device"] if run else None})
        if run is None or completed.returncode != 0:
            print(f"error: the run on {processes} process(es) exited with status {completed.returncode}",
                  file=sys.stderr)
        if run is None:
            continue
        result["device"] = result["device"] or run["device"]
        result["settings"].setdefault("mixed_precision", run["settings"]["mixed_precision"])
        result["settings"].setdefault("model_config", run["settings"]["model_config"])
        result["rows"].extend(run["rows"])
        result["warnings"].extend(w for w in run["warnings"] if w not in result["warnings"])
        result["scaling"] = compute_scaling(result["rows"])
        write_scaling_results(args.output, result, with_plot=False)  # partial results survive a time limit
    fewest = min((row["num_processes"] for row in result["rows"]), default=1)
    result["ratios"] = compute_ratios([row for row in result["rows"] if row["num_processes"] == fewest])
    result["targets"] = compute_targets(result["ratios"]) + compute_scaling_targets(result["scaling"])
    write_scaling_results(args.output, result, with_plot=not args.no_plot)
    print()
    print("\n".join(scaling_report_lines(result)))
    print(f"\nwrote {result_path(args.output, '.json')}, .txt{'' if args.no_plot else ', .png'}")
    return result


def scaling_report_lines(result: dict) -> list[str]:
    return table_lines(result["rows"]) + scaling_lines(result["scaling"]) + target_lines(result["targets"]) + (
        ["", "warnings:", *(f"  {w}" for w in result["warnings"])] if result["warnings"] else [])


def write_scaling_results(prefix: str, result: dict, *, with_plot: bool) -> None:
    result_path(prefix, ".json").parent.mkdir(parents=True, exist_ok=True)
    result_path(prefix, ".json").write_text(json.dumps(result, indent=1))
    devices = ", ".join(f"{run['num_processes']} x {run['device']}" for run in result["runs"] if run["device"])
    result_path(prefix, ".txt").write_text(f"{devices}; {result['command']}\n\n" +
                                           "\n".join(scaling_report_lines(result)) + "\n")
    if with_plot and any(entry["status"] == "ok" for entry in result["scaling"]):
        plot_scaling(result["scaling"], result_path(prefix, ".png"), result["device"])


# -------------------------------------------------------------------------------------------------------------- main


def step_mode_of(args) -> str:
    """The steps' mode as the flags ask for it; each row records the mode its trainer took."""
    if args.torch_compile is False:
        return "eager"
    if args.torch_compile is None and args.torch_compile_mode is None and args.cuda_graph_step is None:
        return "train.py's default steps (the whole step in one CUDA graph on one CUDA GPU, else eager)"
    if args.cuda_graph_step or (args.cuda_graph_step is None and args.torch_compile_mode not in GRAPHED_COMPILE_MODES):
        where = "" if args.cuda_graph_step else " where one process trains on a CUDA GPU"
        return f"torch.compile, {args.torch_compile_mode or 'default'} mode, the whole step in one CUDA graph{where}"
    mode = args.torch_compile_mode or "train.py's default mode (reduce-overhead on one CUDA GPU)"
    return f"torch.compile, {mode} (static batches)"


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes"):
        return True
    if text.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=DEFAULT_DATASETS,
                        help="rows: beauty50 beauty200 ml100k200 longtail16k, or longtail<N>[k]")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--data_dir", default="../shared/data", help="folder with Beauty.txt and ml-100k.inter")
    parser.add_argument("--max_tokens_per_batch", type=int, default=None,
                        help="packed batches: items per batch (raised to max length + 1 where that is larger); "
                             "default as train.py: the padded batch's capacity, windows x (max length + 1)")
    parser.add_argument("--per_device_train_batch_size", type=int, default=None,
                        help="padded batches: windows per batch (default: 256 on Beauty, 128 on ML-100K, "
                             f"{LONG_TAIL_BATCH_ITEMS:,} items' worth on the synthetic logs)")
    parser.add_argument("--warmup_steps", type=int, default=5,
                        help="untimed steps before the timed epoch (compiling, and recording the CUDA graphs)")
    parser.add_argument("--max_steps", type=int, default=100,
                        help="timed steps per row at most; a longer epoch is extrapolated from them")
    parser.add_argument("--min_timed_steps", type=int, default=20,
                        help="time further whole epochs until this many steps are timed (short packed epochs)")
    parser.add_argument("--max_seconds", type=float, default=30.0,
                        help="stop timing a row after the step that passes this; the epoch is then extrapolated")
    parser.add_argument("--output", default="benchmarks/results/training_benchmark",
                        help="results prefix: writes <output>.json, .txt and .png")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if cuda else "cpu")
    parser.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=None,
                        help="Accelerate's autocast (default: bf16 on CUDA, no on CPU)")
    parser.add_argument("--blossom_implementation", default=None,
                        help="attention backend of the blossom rows (default: blossom_triton where triton is "
                             "installed, else blossom_torch)")
    parser.add_argument("--dense_implementation", default="sdpa", help="attention backend of the dense rows")
    parser.add_argument("--longtail_users", type=int, default=300, help="users of the synthetic long-tail log")
    parser.add_argument("--longtail_items", type=int, default=20000, help="items of the synthetic long-tail log")
    parser.add_argument("--dataloader_num_workers", type=int, default=0, help="as train.py (default 0)")
    parser.add_argument("--torch_compile", type=parse_bool, nargs="?", const=True, default=None,
                        help="as train.py's: every row compiled (static batches, one graph; the warm-up steps absorb "
                             "the compilation); default: as train.py decides (on, the whole step in one CUDA graph, "
                             "where one process trains on a CUDA GPU); false: eager steps")
    parser.add_argument("--torch_compile_mode", default=None, help="as train.py's (e.g. reduce-overhead)")
    parser.add_argument("--cuda_graph_step", type=parse_bool, nargs="?", const=True, default=None,
                        help="as train.py's: the whole step captured in one CUDA graph (default: as train.py decides, "
                             "on where one process trains on a CUDA GPU; false: mode reduce-overhead there)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--tf32", type=parse_bool, default=None,
                        help="as train.py's: TF32 float32 matmuls (default: on where a CUDA GPU of capability 8.0+ "
                             "trains; false: exact float32)")
    parser.add_argument("--profile_steps", type=int, default=0,
                        help="profile this many further steps per row: time per kernel (torch.profiler; CUDA kernels on a "
                             "GPU, operators on the CPU), then the host's time per phase of a step over as many more")
    parser.add_argument("--no_plot", action="store_true", help="skip the PNG")
    parser.add_argument("--multi_gpu", type=int, nargs="+", default=None, metavar="N",
                        help="scaling over processes: run every row on each of these numbers of processes (e.g. 1 2 4 "
                             "8), each an `accelerate launch --num_processes N` of this script (DDP; gloo on the "
                             "CPU), and report items/s per process against one process's (include 1)")
    model = parser.add_argument_group("model config (train.py's defaults unless given)")
    for name, default in model_config_fields().items():
        kind = parse_bool if isinstance(default, bool) else type(default)
        model.add_argument(f"--{name}", type=kind, default=None, help=f"default {default!r}")
    return parser


def parse_arguments(argv: list[str]) -> tuple[argparse.Namespace, list[DatasetSpec], dict]:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        specs = [dataset_spec(name) for name in dict.fromkeys(args.datasets)]
    except ValueError as error:
        parser.error(str(error))
    missing = sorted({str(Path(args.data_dir) / spec.file) for spec in specs
                      if spec.file and not (Path(args.data_dir) / spec.file).is_file()})
    if missing:
        parser.error(f"not found: {', '.join(missing)} (pass --data_dir)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    for name in ("max_tokens_per_batch", "per_device_train_batch_size", "max_steps", "min_timed_steps", "max_seconds",
                 "longtail_users", "longtail_items"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            parser.error(f"--{name} must be positive")
    for name in ("warmup_steps", "profile_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name} must not be negative")
    if args.torch_compile is False and args.torch_compile_mode is not None:
        parser.error("--torch_compile_mode asks for compilation, which --torch_compile false turned off")
    if args.multi_gpu is not None:
        if os.environ.get(LAUNCHED):  # an abbreviation (--multi) left in a launched run's arguments
            parser.error("--multi_gpu in a run that --multi_gpu launched")
        if any(count < 1 for count in args.multi_gpu):
            parser.error("--multi_gpu takes numbers of processes >= 1")
        args.multi_gpu = sorted(set(args.multi_gpu))
        if args.device == "cuda" and max(args.multi_gpu) > torch.cuda.device_count():
            parser.error(f"--multi_gpu {max(args.multi_gpu)}: only {torch.cuda.device_count()} GPUs here")
    if args.blossom_implementation is None:
        args.blossom_implementation = "blossom_triton" if triton_unavailable_reason() is None else "blossom_torch"
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if args.device == "cuda" else "no"
    overrides = {name: getattr(args, name) for name in model_config_fields() if getattr(args, name) is not None}
    return args, specs, overrides


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, specs, model_overrides = parse_arguments(argv)
    if args.multi_gpu is not None:
        return run_scaling(argv, args)
    one_line_data_warnings()
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    device = accelerator.device
    main_process = accelerator.is_main_process
    say = accelerator.print
    result = {"device": device_name(device), **versions(),
              "command": "python " + shlex.join(["scripts/benchmark_training.py", *argv]),
              "num_processes": accelerator.num_processes,
              "settings": {**{key: value for key, value in vars(args).items() if key not in model_config_fields()},
                           "mixed_precision": accelerator.mixed_precision,
                           "model_config": {name: model_overrides.get(name, default)
                                            for name, default in model_config_fields().items()},
                           "dataset_specs": {spec.name: spec.__dict__ for spec in specs}},
              "rows": [], "ratios": {}, "targets": [], "warnings": []}
    say(f"{result['device']}, torch {result['torch']}, triton {result['triton']}, mixed precision "
        f"{accelerator.mixed_precision}, {accelerator.num_processes} process(es)"
        f", {step_mode_of(args)}", flush=True)
    say("\n".join(table_lines([])[:2]), flush=True)
    for spec in specs:
        started = time.perf_counter()
        data, windows = load_dataset(spec, args)
        lengths = window_lengths(windows, spec.max_seq_length)
        say(f"{spec.name}: {spec.description}, max length {spec.max_seq_length:,}, {data.vocab.n_items:,} items, "
            f"{len(lengths):,} windows, {int(lengths.sum() - len(lengths)):,} targets per epoch (read in "
            f"{time.perf_counter() - started:.1f} s)", flush=True)
        for model in args.models:
            for layout in args.layouts:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    row = run_row(accelerator, spec=spec, data=data, windows=windows, model=model, layout=layout,
                                  args=args, model_overrides=model_overrides)
                for message in dict.fromkeys(str(warning.message) for warning in caught):
                    if message not in result["warnings"]:
                        result["warnings"].append(message)
                        if main_process:
                            print(f"warning: {message}", file=sys.stderr)
                result["rows"].append(row)
                say(table_lines([row])[2], flush=True)
                result["ratios"] = compute_ratios(result["rows"])
                result["targets"] = compute_targets(result["ratios"])
                if main_process:
                    write_results(args.output, result, with_plot=False)  # partial results survive a time limit
        del data, windows
    if main_process:
        write_results(args.output, result, with_plot=not args.no_plot)
    say()
    say("\n".join(report_lines(result)))
    say(f"\nwrote {result_path(args.output, '.json')}, .txt{'' if args.no_plot else ', .png'}")
    return result


if __name__ == "__main__":
    main()
