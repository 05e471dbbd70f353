"""Command-line arguments of ``scripts/train.py`` and ``scripts/evaluate.py``, in Transformers style.

Data options and evaluation options are shared by both scripts. Every field of ``BlossomRecConfig`` (except the
ones the data decides: ``n_items``, ``max_position_embeddings``) is also a flag (``--hidden_size 64``), read from the
config's signature so new fields need no change here; ``--config_overrides key=value,...`` covers the same fields.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate.utils import is_tensorboard_available
from transformers import HfArgumentParser

from .errors import user_input_errors
from .model import BlossomRecConfig

# Config fields that the training script sets itself, or that are training flags of their own.
_NOT_OVERRIDABLE = {"self", "kwargs", "n_items", "max_position_embeddings", "pad_token_id", "attention_type"}


@dataclass
class DataArguments:
    """Where the interactions come from and how they are filtered (shared by training and evaluation)."""

    dataset: str = field(default="synthetic", metadata={
        "help": "'synthetic' (the built-in default), a prepared directory, a local file (format detected), or a "
                "Hub dataset id"})
    dataset_format: str | None = field(default=None, metadata={
        "help": "force a reader: movielens, recbole, sasrec_pairs, sequences, csv, tsv, parquet, json, hub"})
    user_column: str | None = field(default=None, metadata={"help": "user id column of a table (guessed if unset)"})
    item_column: str | None = field(default=None, metadata={"help": "item id column of a table (guessed if unset)"})
    timestamp_column: str | None = field(default=None, metadata={"help": "time column of a table (guessed if unset)"})
    k_core: int = field(default=0, metadata={"help": "iterative k-core filter on users and items (0 = off)"})
    min_history_length: int = field(default=3, metadata={"help": "drop users with fewer interactions"})

    def reader_kwargs(self) -> dict:
        given = {"format": self.dataset_format, "user_column": self.user_column, "item_column": self.item_column,
                 "timestamp_column": self.timestamp_column}
        return {name: value for name, value in given.items() if value is not None}


@dataclass
class EvaluationArguments:
    """How rankings are evaluated (shared by training and evaluation)."""

    eval_mode: Literal["full", "uni100"] = field(default="full", metadata={
        "aliases": ["--mode"],
        "help": "full ranking over all items, or 100 sampled unseen negatives (for comparison with papers)"})
    exclude_history: bool = field(default=False, metadata={
        "help": "never rank items of the user's history (the target itself always stays ranked)"})
    per_device_eval_batch_size: int | None = field(default=None, metadata={
        "help": "users per evaluation batch (default: on a GPU, as many as keep a batch's scores within 2**25, 128 "
                "MiB in float32, e.g. 2,772 users at 12,101 items; 256 on a CPU)"})
    eval_seed: int = field(default=0, metadata={"help": "seed of the uni100 negatives"})


@dataclass
class TrainingArguments:
    """Optimisation, schedule, checkpointing and reporting of ``scripts/train.py``."""

    output_dir: str | None = field(default=None, metadata={
        "help": "where the best model, metrics and checkpoints go (default: outputs/<model>-<dataset>)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "write into a non-empty output_dir, and start from scratch if it holds checkpoints of an earlier run"})
    max_seq_length: int = field(default=50, metadata={"help": "most recent items the model sees"})
    attention_type: Literal["blossom", "dense"] = field(default="blossom", metadata={
        "help": "BlossomRec sparse attention, or dense causal attention (SASRec) for comparison"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "attention backend: blossom_torch / blossom_triton, or sdpa / eager for dense (default: fastest)"})
    num_train_epochs: int = field(default=3, metadata={
        "help": "epochs over the training windows (3 trains the synthetic default in minutes on a CPU)"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; overrides num_train_epochs when > 0"})
    per_device_train_batch_size: int = field(default=256, metadata={
        "help": "the capacity of a device batch in windows of max_seq_length + 1 items (see max_tokens_per_batch)"})
    max_tokens_per_batch: int | None = field(default=None, metadata={
        "help": "packed batches (the default): at most this many items per device batch (per process), windows of similar length "
                "back to back in one row with position_ids, no padding (default: per_device_train_batch_size x "
                "(max_seq_length + 1), what a padded batch holds); 0 = padded batches of per_device_train_batch_size "
                "windows"})
    gradient_accumulation_steps: int = field(default=1, metadata={
        "help": "batches per optimizer step on each process; N processes with A steps train exactly as one process "
                "with N x A at the same per-device batch"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate of AdamW"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases and norms)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    lr_scheduler_type: str = field(default="constant", metadata={
        "help": "transformers scheduler name: constant, linear, cosine, constant_with_warmup, ..."})
    warmup_steps: int = field(default=0, metadata={"help": "learning-rate warmup in optimizer steps"})
    seed: int = field(default=42, metadata={"help": "seed of the initialisation, data order and dropout"})
    eval_steps: int | None = field(default=None, metadata={
        "help": "evaluate on the validation split every N optimizer steps (default: after every epoch)"})
    early_stopping_patience: int = field(default=10, metadata={
        "help": "stop after this many evaluations without a better validation NDCG@10 (0 = never)"})
    do_predict: bool = field(default=True, metadata={
        "help": "rank the test split with the best model at the end; false while tuning, so that only the chosen "
                "configuration is ever tested (scripts/evaluate.py --split test on its output_dir)"})
    save_steps: int | None = field(default=None, metadata={
        "help": "also checkpoint every N optimizer steps (a checkpoint follows every evaluation anyway)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept in output_dir/checkpoints"})
    resume_from_checkpoint: str | None = field(default=None, metadata={
        "help": "a checkpoint directory, or 'latest' for the newest one in output_dir/checkpoints"})
    logging_steps: int = field(default=10, metadata={"help": "update the loss and items/s every N steps"})
    report_to: Literal["none", "tensorboard"] = field(default="none", metadata={
        "help": "also log to TensorBoard, under output_dir/runs (needs pip install -e \".[tensorboard]\")"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes"})
    tf32: bool | None = field(default=None, metadata={
        "help": "TensorFloat-32 in training on a CUDA GPU of compute capability 8.0 or newer: torch's 'high' float32 "
                "matmul precision (cuBLAS and compiled matmuls in one TF32 pass; the Triton attention and loss in "
                "three, float32-level accuracy); default: on where such a GPU trains; false: exact float32 products "
                "(the Triton kernels then run on the CUDA cores, several times slower). Evaluation always scores in "
                "exact float32."})
    torch_compile: bool | None = field(default=None, metadata={
        "help": "compile the model with torch.compile(fullgraph=True): the training step (forward and backward) and "
                "the evaluation forward, on batches of static shapes (packed batches filled to the token budget, "
                "padded ones to the batch size), so one graph serves every batch; default: on, with the whole step "
                "in one CUDA graph (--cuda_graph_step), where one process trains on a CUDA GPU and Triton is "
                "installed, off elsewhere"})
    torch_compile_backend: str | None = field(default=None, metadata={
        "help": "torch.compile backend (default: inductor); setting it turns --torch_compile on"})
    torch_compile_mode: str | None = field(default=None, metadata={
        "help": "torch.compile mode: default, reduce-overhead (CUDA graphs), max-autotune or "
                "max-autotune-no-cudagraphs (default: torch's default, with the whole step in one CUDA graph where "
                "one process trains on a CUDA GPU; reduce-overhead there with --cuda_graph_step false and no "
                "gradient accumulation); setting it turns --torch_compile on"})
    cuda_graph_step: bool | None = field(default=None, metadata={
        "help": "capture the whole training step (forward, backward, clipping, AdamW) in one CUDA graph after three "
                "optimizer steps and replay it for every later batch (with gradient accumulation, one graph for the "
                "batches that only add gradients and one for those that step): no host work per step beyond copying "
                "the batch; needs --torch_compile with inductor in a mode without CUDA graphs of its own, one process "
                "on a CUDA GPU and no fp16 (the model then compiles in torch's default mode unless a mode is named); "
                "default: on wherever it can run (false: mode reduce-overhead there)"})
    push_to_hub: bool = field(default=False, metadata={"help": "upload the best model to --hub_model_id at the end"})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository, e.g. org/blossomrec-beauty"})
    config_overrides: str | None = field(default=None, metadata={
        "help": "model config fields as key=value,key=value (same fields as the --<field> flags)"})

    def __post_init__(self):
        # As in Transformers: naming a backend or mode asks for compilation (unless compilation was turned off).
        if self.torch_compile is None and (self.torch_compile_backend is not None or
                                           self.torch_compile_mode is not None):
            self.torch_compile = True

    @property
    def tokens_per_batch(self) -> int:
        """The packed batches' token budget (0 = padded batches): `max_tokens_per_batch` or its default."""
        if self.max_tokens_per_batch is None:
            return self.per_device_train_batch_size * (self.max_seq_length + 1)
        return self.max_tokens_per_batch

    def resolve_output_dir(self, dataset: str) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        name = re.sub(r"[^A-Za-z0-9]+", "-", Path(dataset.rstrip("/")).stem).strip("-").lower() or "dataset"
        prefix = "blossomrec" if self.attention_type == "blossom" else "dense"
        return Path("outputs") / f"{prefix}-{name}"


def model_config_fields() -> dict[str, object]:
    """The ``BlossomRecConfig`` fields that may be overridden from the command line, with their defaults."""
    parameters = inspect.signature(BlossomRecConfig.__init__).parameters.values()
    return {p.name: p.default for p in parameters
            if p.name not in _NOT_OVERRIDABLE and isinstance(p.default, (bool, int, float, str))}


def _model_arguments_class() -> type:
    fields = [(name, type(default) | None,
               field(default=None, metadata={"help": f"model config (default {default!r})"}))
              for name, default in model_config_fields().items()]
    return dataclasses.make_dataclass("ModelArguments", fields)


def _parse_overrides(text: str | None) -> dict[str, object]:
    """``"hidden_size=64,stis_window=4"`` -> ``{"hidden_size": 64, "stis_window": 4}``, values typed as JSON."""
    known = model_config_fields()
    overrides = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, separator, raw = item.partition("=")
        key = key.strip()
        if not separator or key not in known:
            raise ValueError(f"--config_overrides: expected key=value with key among {sorted(known)}, got {item!r}")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw.strip()
    return overrides


def parse_training_arguments(argv: list[str] | None = None):
    """``(data_args, eval_args, training_args, model_overrides)`` from the command line."""
    parser = HfArgumentParser([DataArguments, EvaluationArguments, TrainingArguments, _model_arguments_class()])
    _accept_bare_switches(parser, ("torch_compile", "tf32", "cuda_graph_step"))
    data_args, eval_args, training_args, model_args = parser.parse_args_into_dataclasses(args=argv)
    with user_input_errors("arguments"):
        overrides = _parse_overrides(training_args.config_overrides)
        flags = {name: value for name, value in vars(model_args).items() if value is not None}
        both = sorted(set(flags) & set(overrides))
        if both:
            raise ValueError(f"{', '.join(both)} given both as a flag and in --config_overrides")
        if training_args.tokens_per_batch < 0:
            raise ValueError(f"--max_tokens_per_batch must be >= 0 (0 = padded batches), got "
                             f"{training_args.max_tokens_per_batch}")
        check_torch_compile_arguments(training_args)
        if training_args.push_to_hub and not training_args.hub_model_id:
            raise ValueError("--push_to_hub needs --hub_model_id org/name")
        # Accelerate would only warn and log nothing.
        if training_args.report_to == "tensorboard" and not is_tensorboard_available():
            raise ValueError('--report_to tensorboard needs TensorBoard, which is not installed: '
                             'pip install -e ".[tensorboard]"')
    return data_args, eval_args, training_args, {**overrides, **flags}


def _accept_bare_switches(parser, names) -> None:
    """``--torch_compile`` alone means true, as in Transformers, for the on/off flags whose unset default is decided
    later (``bool | None``, which HfArgumentParser would make take a value)."""
    for action in parser._actions:
        if action.dest in names:
            action.nargs, action.const = "?", True


TORCH_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def check_torch_compile_arguments(args: TrainingArguments) -> None:
    """A ValueError naming the flag for a torch.compile mode or backend that torch does not know, or for one given
    with --torch_compile false."""
    if args.torch_compile is False and (args.torch_compile_mode or args.torch_compile_backend) is not None:
        flag = "--torch_compile_mode" if args.torch_compile_mode is not None else "--torch_compile_backend"
        raise ValueError(f"{flag} asks for compilation, which --torch_compile false turned off: drop one of them")
    if args.torch_compile_mode is not None and args.torch_compile_mode not in TORCH_COMPILE_MODES:
        raise ValueError(f"--torch_compile_mode must be one of {', '.join(TORCH_COMPILE_MODES)}, got "
                         f"{args.torch_compile_mode!r}")
    if args.torch_compile_backend is not None:
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if args.torch_compile_backend not in backends:
            raise ValueError(f"--torch_compile_backend must be one of {', '.join(sorted(backends))}, got "
                             f"{args.torch_compile_backend!r}")


def build_model_config(training_args: TrainingArguments, overrides: dict, n_items: int) -> BlossomRecConfig:
    """The model config for ``n_items`` items and windows of ``max_seq_length + 1`` items, with overrides; a
    ``ValueError`` (or ``TypeError``) naming the field if they do not make a valid config."""
    options = dict(overrides)
    if training_args.attn_implementation is not None:
        options["attn_implementation"] = training_args.attn_implementation
    return BlossomRecConfig(n_items=n_items, max_position_embeddings=training_args.max_seq_length + 1,
                            attention_type=training_args.attention_type, **options)
