"""Leave-one-out ranking evaluation: the model and the item-popularity baseline, by full ranking or ``uni100``.

Full ranking scores every real item 1..n_items (column 0, the padding id, is never ranked). The target's rank is
the number of other candidates that score at least as high as it: ties count against the target, so a model whose
scores collapse can never look good. Exact float ties are rare for a trained model scored in float32 (training
evaluates an unprepared float32 copy of the model, outside mixed-precision autocast, because bfloat16 scores tie
often). The popularity baseline has no ties: equal counts are ordered by item id.

Histories are packed (one row of tokens per batch, no padding) into batches bounded by a token budget, so one model
forward serves a batch and memory does not grow with history length or batch size. Everything runs under
``accelerate``: each process scores its own batches, and the ranks, gathered with each user's index, are put back in
split order, so every user is counted exactly once whatever the number of processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable

import numpy as np
import torch

from accelerate.utils import send_to_device

from .batching import EvaluationCollator, NegativeSampler, evaluation_dataloader
from .metrics import DEFAULT_KS, ranking_metrics

EVALUATION_MODES = ("full", "uni100")

ScoreFunction = Callable[[dict], torch.Tensor]

# Items per evaluation batch (one model forward): 2**19 is every user of a 256-user batch up to length 2,048, and 32
# users at 16,384 (the float32 dense model then needs about 3 GiB per forward).
MAX_TOKENS_PER_FORWARD = 2**19
# Users per evaluation batch when not given. On a GPU, evaluation is bound by its batches' count (one model forward
# each, launch-bound), so a batch takes as many users as keep its scores within 2**25 (128 MiB in float32): Beauty's
# 12,101 items give 2,772 users, ML-100K's 1,682 every user in one, a million items 33. On a CPU a batch costs its
# compute whatever the count, and the PyTorch attention's buffers grow with the batch: 256 users.
MAX_SCORES_PER_BATCH = 2**25
CPU_EVAL_BATCH_SIZE = 256


def default_eval_batch_size(n_items: int, device: torch.device) -> int:
    """Users per evaluation batch on `device`: on CUDA, as many as keep scores [users, n_items + 1] within
    MAX_SCORES_PER_BATCH."""
    if device.type != "cuda":
        return CPU_EVAL_BATCH_SIZE
    return max(1, MAX_SCORES_PER_BATCH // (n_items + 1))


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, *, history_items: torch.Tensor | None = None,
                 candidates: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among the candidates, counting the other candidates that score at least as high.

    ``scores``: ``[B, n_items + 1]``. Full ranking by default; ``history_items`` (``[B, H]``, 0-padded) removes
    those items from the competition, except the target itself; ``candidates`` (``[B, C]`` sampled negatives)
    restricts the competition to them.
    """
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    if torch.isnan(scores).any():
        raise FloatingPointError("the model produced NaN scores; the ranking would be meaningless")
    target_scores = scores.gather(1, targets[:, None])
    if candidates is not None:
        return (scores.gather(1, candidates) >= target_scores).sum(dim=1)
    competing = torch.ones_like(scores, dtype=torch.bool)
    competing[:, 0] = False
    if history_items is not None:
        competing.scatter_(1, history_items, False)
    competing.scatter_(1, targets[:, None], False)
    return ((scores >= target_scores) & competing).sum(dim=1)


@torch.no_grad()
def collect_ranks(score_fn: ScoreFunction, dataloader, accelerator, num_users: int) -> torch.Tensor:
    """Ranks of every user of the split in split order, gathered from all processes (each user exactly once)."""
    found = [torch.zeros(0, 2, dtype=torch.long, device=accelerator.device)]
    for batch in dataloader:
        batch = send_to_device(batch, accelerator.device)
        ranks = target_ranks(score_fn(batch), batch["targets"], history_items=batch.get("history_items"),
                             candidates=batch.get("candidates"))
        found.append(torch.stack([batch["user_index"], ranks], dim=1))
    local = torch.cat(found)
    gathered = accelerator.gather(accelerator.pad_across_processes(local, dim=0, pad_index=-1)).cpu()
    gathered = gathered[gathered[:, 0] >= 0]
    gathered = gathered[torch.argsort(gathered[:, 0])]
    if not torch.equal(gathered[:, 0], torch.arange(num_users)):
        raise RuntimeError(f"evaluation scored {len(gathered)} users for a split of {num_users}: each user must be "
                           f"scored exactly once")
    return gathered[:, 1]


def model_score_function(model) -> ScoreFunction:
    """Next-item scores ``[S, n_items + 1]`` after each history's last item, from
    ``model(input_ids, position_ids=..., logits_to_keep=1)`` (packed batches; padded ones without ``position_ids``).
    Batches of static shape (``cu_seq_lens_q``, ``max_length_q``) hold the users' histories first: their rows are
    kept, the padding histories' dropped."""
    def score(batch: dict) -> torch.Tensor:
        static = {name: batch[name] for name in ("cu_seq_lens_q", "max_length_q") if name in batch}
        output = model(input_ids=batch["input_ids"], position_ids=batch.get("position_ids"), logits_to_keep=1,
                       **static)
        scores = output.logits[:, -1]
        return scores[:len(batch["targets"])] if static else scores
    return score


def item_popularity(train_split, n_items: int) -> torch.Tensor:
    """Popularity scores ``[n_items + 1]`` from the training histories (column ``items``), without ties.

    Items are ordered by interaction count, equal counts by ascending id; the score is the position in that
    order reversed (the most popular item scores highest), an exact integer in float32 for any catalogue size.
    """
    items = np.fromiter(itertools.chain.from_iterable(train_split["items"]), dtype=np.int64)
    counts = torch.from_numpy(np.bincount(items, minlength=n_items + 1)[: n_items + 1])
    order = torch.argsort(-counts, stable=True)
    scores = torch.empty(n_items + 1, dtype=torch.float32)
    scores[order] = torch.arange(n_items + 1, 0, -1, dtype=torch.float32)
    return scores


def popularity_score_function(popularity: torch.Tensor) -> ScoreFunction:
    def score(batch: dict) -> torch.Tensor:
        targets = batch["targets"]
        return popularity.to(targets.device).expand(len(targets), -1)
    return score


class RankingEvaluator:
    """Evaluates models on one leave-one-out split (rows ``user``, ``history``, ``target``) with one protocol.

    ``static_shapes``: every batch the model sees has the same shapes (for a compiled model: one graph), the
    histories filled with padding histories to the size of the largest batch.

    The popularity baseline is computed once per evaluator, since it does not change during training.
    """

    def __init__(self, split, train_split, *, n_items: int, max_seq_length: int, accelerator,
                 batch_size: int | None = None,
                 mode: str = "full", exclude_history: bool = False, seed: int = 0, ks: Iterable[int] = DEFAULT_KS,
                 max_tokens_per_forward: int = MAX_TOKENS_PER_FORWARD, static_shapes: bool = False):
        if mode not in EVALUATION_MODES:
            raise ValueError(f"unknown evaluation mode {mode!r}; choose one of {', '.join(EVALUATION_MODES)}")
        if len(split) == 0:
            raise ValueError("the evaluation split has no users")
        if not isinstance(max_tokens_per_forward, int) or max_tokens_per_forward < 1:
            raise ValueError(f"max_tokens_per_forward must be a positive int, got {max_tokens_per_forward!r}")
        if batch_size is None:  # and at most a process's share of the users, so that every process gets batches
            batch_size = min(default_eval_batch_size(n_items, accelerator.device),
                             -(-len(split) // accelerator.num_processes))
        elif isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"--per_device_eval_batch_size must be a positive int, got {batch_size!r}")
        self.accelerator = accelerator
        self.ks = tuple(ks)
        self.num_users = len(split)
        negative_sampler = NegativeSampler(n_items, 100, seed) if mode == "uni100" else None
        collator = EvaluationCollator(max_seq_length, exclude_history=exclude_history and mode == "full",
                                      negative_sampler=negative_sampler)
        self.dataloader = evaluation_dataloader(
            split, collator, max_seq_length=max_seq_length, max_tokens=max_tokens_per_forward,
            max_histories=batch_size, process_index=accelerator.process_index,
            num_processes=accelerator.num_processes, static_shapes=static_shapes)
        self.popularity = item_popularity(train_split, n_items)
        self._popularity_metrics: dict[str, float] | None = None

    def evaluate(self, score_fn: ScoreFunction) -> dict[str, float]:
        return ranking_metrics(collect_ranks(score_fn, self.dataloader, self.accelerator, self.num_users), self.ks)

    def evaluate_model(self, model) -> dict[str, float]:
        """Metrics of ``model`` (put in eval mode for the evaluation, its training mode restored afterwards), scored
        with exact float32 matmuls whatever training uses (TF32 keeps 10 mantissa bits: more ties)."""
        was_training = model.training
        precision = torch.get_float32_matmul_precision()
        model.eval()
        torch.set_float32_matmul_precision("highest")
        try:
            return self.evaluate(model_score_function(model))
        finally:
            torch.set_float32_matmul_precision(precision)
            model.train(was_training)

    def evaluate_popularity(self) -> dict[str, float]:
        if self._popularity_metrics is None:
            self._popularity_metrics = self.evaluate(popularity_score_function(self.popularity))
        return self._popularity_metrics
