"""Evaluate a saved BlossomRec model (a local directory or a Hub repo id) by leave-one-out ranking.

    accelerate launch scripts/evaluate.py --model outputs/blossomrec-synthetic --dataset synthetic
    python scripts/evaluate.py --model org/blossomrec-beauty --dataset ../shared/data/Beauty.txt --mode uni100

Prints the metrics of the model and of the item-popularity baseline and writes them as JSON. The dataset is
prepared exactly as for training (same filters), and its item vocabulary must match the one saved with the model.
"""

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import Accelerator
from transformers import AutoModel, HfArgumentParser
from transformers.utils import logging as transformers_logging

from blossomrec_hf.checkpointing import write_json_atomic
from blossomrec_hf.data import DataWarning, ItemVocabulary, one_line_data_warnings, prepare_data
from blossomrec_hf.errors import InputErrors, user_input_errors
from blossomrec_hf.evaluation import MAX_TOKENS_PER_FORWARD, RankingEvaluator
from blossomrec_hf.metrics import format_metrics_table
from blossomrec_hf.training.trainer import compile_model
from blossomrec_hf.training_args import DataArguments, EvaluationArguments, check_torch_compile_arguments


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "a directory written by scripts/train.py, or a Hub model repo id"})
    revision: str | None = field(default=None, metadata={
        "help": "Hub commit sha (or branch) to load weights, code and vocabulary from; pin it for remote code"})
    split: Literal["test", "validation"] = field(default="test", metadata={"help": "leave-one-out split to rank"})
    output_file: str | None = field(default=None, metadata={"help": "write the metrics here as JSON"})
    max_seq_length: int | None = field(default=None, metadata={
        "help": "most recent items the model sees (default: the length it was trained with)"})
    attn_implementation: str | None = field(default=None, metadata={"help": "attention backend override"})
    max_tokens_per_forward: int = field(default=MAX_TOKENS_PER_FORWARD, metadata={
        "help": "history items per evaluation batch: histories are packed, and a batch (one model forward) ends "
                "before this many items or --per_device_eval_batch_size users"})
    torch_compile: bool = field(default=False, metadata={
        "help": "compile the model's forward with torch.compile(fullgraph=True), on batches of one static shape"})
    torch_compile_backend: str | None = field(default=None, metadata={
        "help": "torch.compile backend (default: inductor); setting it turns --torch_compile on"})
    torch_compile_mode: str | None = field(default=None, metadata={
        "help": "torch.compile mode (default: None); setting it turns --torch_compile on"})

    def __post_init__(self):
        if self.torch_compile_backend is not None or self.torch_compile_mode is not None:
            self.torch_compile = True


def main():
    one_line_data_warnings()
    parser = HfArgumentParser([EvaluateArguments, DataArguments, EvaluationArguments])
    args, data_args, eval_args = parser.parse_args_into_dataclasses()
    with user_input_errors("arguments"):
        check_torch_compile_arguments(args)
    accelerator = Accelerator()
    transformers_logging.disable_progress_bar()
    if not accelerator.is_main_process:  # every process reads the data: its warnings are printed once
        warnings.simplefilter("ignore", DataWarning)

    # Bad input stops every process with exit status 2, after one error line from the main process.
    with user_input_errors(f"model {args.model!r}", accelerator):
        model = AutoModel.from_pretrained(args.model, trust_remote_code=True, revision=args.revision,
                                          code_revision=args.revision, attn_implementation=args.attn_implementation)
        vocab = ItemVocabulary.from_pretrained(args.model, revision=args.revision)
    max_seq_length = args.max_seq_length or model.config.max_position_embeddings - 1
    errors = InputErrors(f"dataset {data_args.dataset!r}")
    with accelerator.main_process_first(), errors:  # caught inside: every process leaves the block normally
        data = prepare_data(data_args.dataset, max_seq_length=max_seq_length, k_core=data_args.k_core,
                            min_history_length=data_args.min_history_length, **data_args.reader_kwargs())
        if data.vocab != vocab:
            raise ValueError(
                f"its item vocabulary ({data.vocab.n_items} items) differs from the model's ({vocab.n_items} items); "
                f"evaluate on the data the model was trained on, with the same --k_core and --min_history_length")
        evaluator = RankingEvaluator(data.splits[args.split], data.splits["train"], n_items=vocab.n_items,
                                     max_seq_length=max_seq_length, accelerator=accelerator,
                                     batch_size=eval_args.per_device_eval_batch_size, mode=eval_args.eval_mode,
                                     exclude_history=eval_args.exclude_history, seed=eval_args.eval_seed,
                                     max_tokens_per_forward=args.max_tokens_per_forward,
                                     static_shapes=args.torch_compile)
    errors.exit_if_any(accelerator)

    model = model.to(accelerator.device)
    if args.torch_compile:
        compile_model(model, args)
    metrics = {"model": evaluator.evaluate_model(model),
               "popularity": evaluator.evaluate_popularity()}
    if accelerator.is_main_process:
        print(f"{args.split} split, {eval_args.eval_mode} ranking"
              f"{', history excluded' if eval_args.exclude_history else ''}:")
        print(format_metrics_table({args.model: metrics["model"], "popularity": metrics["popularity"]}))
        if args.output_file:
            record = {**dataclasses.asdict(args), **dataclasses.asdict(data_args), **dataclasses.asdict(eval_args),
                      "max_seq_length": max_seq_length, "metrics": metrics}
            write_json_atomic(Path(args.output_file), record)
            print(f"wrote {args.output_file}")


if __name__ == "__main__":
    main()
