"""Train a BlossomRec (or dense SASRec-style) next-item recommender with Accelerate.

    accelerate launch scripts/train.py                                   # built-in synthetic data, a few minutes
    accelerate launch scripts/train.py --dataset ../shared/data/Beauty.txt --max_seq_length 50
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py ...  # same run on two GPUs
    accelerate launch scripts/train.py --resume_from_checkpoint latest    # continue an interrupted run

The best model by validation NDCG@10 is saved in ``output_dir`` (``save_pretrained``: safetensors and remote code,
plus the item vocabulary, ``training_args.json`` and ``metrics.json``); ``output_dir/checkpoints`` holds the
resumable checkpoints. SIGINT/SIGTERM write a checkpoint at the next step and exit.
"""

import copy
import dataclasses
import json
import math
import shutil
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.utils import logging as transformers_logging

from blossomrec_hf import BlossomRecForSequentialRecommendation
from blossomrec_hf.batching import training_dataloader
from blossomrec_hf.checkpointing import (
    CHECKPOINTS_DIR,
    StopSignals,
    TrainerState,
    checkpoint_dirs,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from blossomrec_hf.data import prepare_data, training_windows
from blossomrec_hf.evaluation import RankingEvaluator
from blossomrec_hf.metrics import format_metrics_table
from blossomrec_hf.training_args import build_model_config, parse_training_arguments, user_input_errors

EARLY_STOPPING_METRIC = "ndcg@10"


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embeddings only, not on biases and norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def train(accelerator: Accelerator, data_args, eval_args, args, model_overrides) -> int:
    """The whole run; returns the exit status (non-zero when a stop signal interrupted it)."""
    output_dir = args.resolve_output_dir(data_args.dataset)
    stop_signals = StopSignals()
    set_seed(args.seed)

    with user_input_errors("arguments"):
        if args.resume_from_checkpoint is None and checkpoint_dirs(output_dir) and not args.overwrite_output_dir:
            raise ValueError(f"{output_dir} already holds checkpoints of an earlier run; pass "
                             f"--resume_from_checkpoint latest to continue it or --overwrite_output_dir to start over")
        resume_dir = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint \
            else None
    if args.overwrite_output_dir and resume_dir is None and accelerator.is_main_process:
        shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)

    # Data: every process prepares the same splits; the main process goes first so caches are written once.
    with accelerator.main_process_first(), user_input_errors(f"dataset {data_args.dataset!r}"):
        data = prepare_data(data_args.dataset, max_seq_length=args.max_seq_length, k_core=data_args.k_core,
                            min_history_length=data_args.min_history_length, **data_args.reader_kwargs())
        windows = training_windows(data.splits["train"], args.max_seq_length)
        if len(windows) == 0:
            raise ValueError("no training windows (every training history has fewer than 2 items)")
    n_items = data.vocab.n_items

    config = build_model_config(args, model_overrides, n_items)
    model = BlossomRecForSequentialRecommendation(config)
    # Evaluation scores an unprepared float32 copy: bf16 scores would tie often, and ties favour the target.
    eval_model = copy.deepcopy(model).to(accelerator.device)
    train_dataloader = training_dataloader(windows, args.max_seq_length, args.per_device_train_batch_size, args.seed,
                                           args.dataloader_num_workers)
    sampler = train_dataloader.sampler
    evaluators = {
        split: RankingEvaluator(data.splits[split], data.splits["train"], n_items=n_items,
                                max_seq_length=args.max_seq_length, accelerator=accelerator,
                                batch_size=eval_args.per_device_eval_batch_size, mode=eval_args.eval_mode,
                                exclude_history=eval_args.exclude_history, seed=eval_args.eval_seed)
        for split in ("validation", "test")
    }
    optimizer = torch.optim.AdamW(optimizer_groups(model, args.weight_decay), lr=args.learning_rate)
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)

    steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    total_steps = args.max_steps if args.max_steps > 0 else args.num_train_epochs * steps_per_epoch
    # A prepared scheduler steps once per process at every optimizer step.
    scheduler = accelerator.prepare(get_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=total_steps * accelerator.num_processes))

    state = TrainerState()
    if resume_dir is not None:
        state = load_checkpoint(accelerator, resume_dir)
        accelerator.print(f"resumed from {resume_dir} at step {state.global_step} (epoch {state.epoch})")
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.json").write_text(json.dumps(
            {**dataclasses.asdict(data_args), **dataclasses.asdict(eval_args), **dataclasses.asdict(args),
             "model_overrides": model_overrides, "num_processes": accelerator.num_processes,
             "mixed_precision": accelerator.mixed_precision}, indent=2))
    if args.report_to != "none":
        accelerator.init_trackers("runs", config={k: v for k, v in dataclasses.asdict(args).items()
                                                  if isinstance(v, (int, float, str, bool))})

    accelerator.print(
        f"{data_args.dataset}: {n_items} items, {len(data.splits['test'])} users, {len(windows)} training windows; "
        f"{config.attention_type} attention ({config._attn_implementation}), "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {accelerator.num_processes} process(es), "
        f"mixed precision {accelerator.mixed_precision}; {total_steps} steps of {steps_per_epoch} per epoch")

    progress = tqdm(total=total_steps, initial=state.global_step, disable=not accelerator.is_local_main_process,
                    desc="training", dynamic_ncols=True)

    def evaluate_and_track() -> None:
        """Validation metrics of the current weights; keep the best model and count patience."""
        eval_model.load_state_dict(accelerator.unwrap_model(model).state_dict())
        metrics = evaluators["validation"].evaluate_model(eval_model)
        epoch = state.epoch + state.batches_in_epoch / len(train_dataloader)
        state.log_history.append({"step": state.global_step, "epoch": round(epoch, 4),
                                  **{f"validation/{k}": v for k, v in metrics.items()}})
        accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=state.global_step)
        improved = state.best_metric is None or metrics[EARLY_STOPPING_METRIC] > state.best_metric
        if improved:
            state.best_metric, state.best_step, state.best_epoch = metrics[EARLY_STOPPING_METRIC], \
                state.global_step, round(epoch, 4)
            state.best_train_seconds, state.best_validation = state.train_seconds, metrics
            state.evaluations_without_improvement = 0
            if accelerator.is_main_process:
                eval_model.save_pretrained(output_dir)
                data.vocab.save_pretrained(output_dir)
        else:
            state.evaluations_without_improvement += 1
        patience = args.early_stopping_patience
        state.stopped_early = patience > 0 and state.evaluations_without_improvement >= patience
        if accelerator.is_main_process:
            progress.write(f"step {state.global_step} (epoch {epoch:.2f}): validation {EARLY_STOPPING_METRIC} "
                           f"{metrics[EARLY_STOPPING_METRIC]:.4f}, recall@10 {metrics['recall@10']:.4f}"
                           f"{' (best)' if improved else ''}")
            if state.stopped_early:
                progress.write(f"early stopping: no better validation {EARLY_STOPPING_METRIC} in {patience} "
                               f"evaluations (best at step {state.best_step})")

    # Summed over the current logging window: loss of each batch, batches, next-item targets.
    running = torch.zeros(3, dtype=torch.float64, device=accelerator.device)
    window_start_seconds, last_evaluated = state.train_seconds, None

    def close_window():
        """Fold the window into the state (so a checkpoint counts its targets); its sums over all processes and its
        training seconds."""
        nonlocal window_start_seconds
        sums = accelerator.reduce(running, reduction="sum").tolist()
        state.train_targets += int(sums[2])
        seconds = state.train_seconds - window_start_seconds
        running.zero_()
        window_start_seconds = state.train_seconds
        return sums, seconds
    model.train()
    while state.global_step < total_steps and not state.stopped_early:
        # The order of an epoch depends only on seed + epoch; on resume, skip what the checkpoint already trained on.
        epoch_batches = train_dataloader
        if state.batches_in_epoch:
            epoch_batches = accelerator.skip_first_batches(train_dataloader, state.batches_in_epoch)
        sampler.set_epoch(state.epoch)
        epoch_batches.set_epoch(state.epoch)
        step_start = time.perf_counter()
        for batch in epoch_batches:
            with accelerator.accumulate(model):
                loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batches_in_epoch += 1
            running += torch.stack([loss.detach().double(), torch.ones_like(running[0]),
                                    torch.full_like(running[0], batch["num_targets"])])
            if not accelerator.sync_gradients:
                continue

            state.global_step += 1
            end_of_epoch = state.batches_in_epoch == len(train_dataloader)
            if end_of_epoch:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            state.train_seconds += time.perf_counter() - step_start
            progress.update(1)
            finished = state.global_step >= total_steps

            if state.global_step % args.logging_steps == 0 or finished:
                (loss_sum, batches, targets), seconds = close_window()
                items_per_second = targets / max(seconds, 1e-9)
                logs = {"train/loss": round(loss_sum / batches, 6), "train/learning_rate": scheduler.get_last_lr()[0],
                        "train/items_per_second": round(items_per_second, 1)}
                state.log_history.append({"step": state.global_step, **logs})
                accelerator.log(logs, step=state.global_step)
                progress.set_postfix(loss=f"{logs['train/loss']:.4f}", items_per_s=f"{items_per_second:,.0f}")

            evaluate_now = (state.global_step % args.eval_steps == 0) if args.eval_steps else end_of_epoch
            if evaluate_now or finished:
                evaluate_and_track()
                last_evaluated = state.global_step
            stop = stop_signals.requested(accelerator, state.global_step)
            if last_evaluated == state.global_step or stop or (
                    args.save_steps and state.global_step % args.save_steps == 0):
                close_window()
                save_checkpoint(accelerator, output_dir, state, args.save_total_limit)
            if stop:
                progress.close()
                accelerator.print(f"stopped by signal at step {state.global_step}; resume with "
                                  f"--resume_from_checkpoint latest")
                return stop_signals.exit_code
            if finished or state.stopped_early:
                break
            step_start = time.perf_counter()
    if state.best_step is None:  # resumed past --max_steps from a checkpoint taken before any evaluation
        evaluate_and_track()
    progress.close()

    # Test the best model (as saved) and the popularity baseline on the same users.
    accelerator.wait_for_everyone()
    best_model = BlossomRecForSequentialRecommendation.from_pretrained(
        output_dir, attn_implementation=config._attn_implementation).to(accelerator.device)
    test_metrics = evaluators["test"].evaluate_model(best_model)
    results = {
        "dataset": data_args.dataset,
        "attention_type": config.attention_type,
        "eval_mode": eval_args.eval_mode,
        "exclude_history": eval_args.exclude_history,
        "n_items": n_items,
        "best_step": state.best_step,
        "best_epoch": state.best_epoch,
        "train_seconds_to_best": round(state.best_train_seconds, 2),
        "train_seconds": round(state.train_seconds, 2),
        "train_items_per_second": round(state.train_targets / max(state.train_seconds, 1e-9), 1),
        "global_step": state.global_step,
        "stopped_early": state.stopped_early,
        "num_processes": accelerator.num_processes,
        "validation": {"model": state.best_validation, "popularity": evaluators["validation"].evaluate_popularity()},
        "test": {"model": test_metrics, "popularity": evaluators["test"].evaluate_popularity()},
    }
    if accelerator.is_main_process:
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2))
        state.save(output_dir / "trainer_state.json")
        name = "BlossomRec" if config.attention_type == "blossom" else "dense (SASRec)"
        print(f"\ntest ({eval_args.eval_mode} ranking, {results['test']['model']['num_users']} users), best "
              f"validation at step {state.best_step}, {state.best_train_seconds:.1f} s of training:")
        print(format_metrics_table({name: test_metrics, "popularity": results["test"]["popularity"]}))
        print(f"saved to {output_dir}")
        if args.push_to_hub:
            from blossomrec_hf.hub import push_to_hub

            print(f"pushed to {push_to_hub(str(output_dir), args.hub_model_id)}")
    return 0


def main():
    data_args, eval_args, args, model_overrides = parse_training_arguments()
    transformers_logging.disable_progress_bar()  # one progress bar: ours
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(args.resolve_output_dir(data_args.dataset)),
    )
    status = train(accelerator, data_args, eval_args, args, model_overrides)
    # Only once the model and data loaders of `train` are gone: destroying the process group first hangs gloo.
    accelerator.end_training()
    raise SystemExit(status)


if __name__ == "__main__":
    main()
