"""Sampled-softmax next-item loss: each target against one shared draw of negative items per batch.

A full softmax scores every item at every position; with millions of items that is the wrong tool, and even on small
catalogues the field often trains with sampled softmax (SASRec-style models, eSASRec, HSTU). Here every position's
target competes with the same `num_negatives` items, drawn with replacement:

- `uniform`: from the whole catalogue, every item alike;
- `in_batch`: from the batch's own targets, so popular items are drawn more often (hard negatives for free);
- `mixed`: half each.

With `logq_correction`, every score (the target's too) is lowered by the log of the item's expected number of draws
(Yi et al., RecSys 2019; TensorFlow's sampled softmax does the same), which undoes the popularity bias of in-batch
draws; with uniform draws it shifts every score alike and changes nothing. A drawn negative equal to the position's
own target is masked out, so the target never counts as its own negative. Rows whose target is `ignore_index` take no
part (neither loss, gradient nor in-batch draws). Shapes are static: no unique(), no syncs of its own.
"""

import torch
import torch.nn.functional as F

from .chunked_cross_entropy import IGNORE_INDEX, kept_count


def draw_negatives(targets: torch.Tensor, n_items: int, num_negatives: int, sampling: str,
                   ignore_index: int = IGNORE_INDEX):
    """(negatives [K] item ids, expected number of draws of every target [N] and of every negative [K]).

    `targets` [N] holds ids in 1..n_items or `ignore_index`; negatives come from 1..n_items (never the padding id 0),
    the in-batch ones from the kept rows' targets (the expected draws of an ignored row mean nothing)."""
    uniform = num_negatives if sampling == "uniform" else num_negatives // 2 if sampling == "mixed" else 0
    from_batch = num_negatives - uniform
    device = targets.device
    kept, safe_targets = _kept_rows(targets, ignore_index)
    parts = [torch.randint(1, n_items + 1, (uniform,), device=device)]
    if from_batch:
        parts.append(safe_targets[_draw_kept_rows(kept, from_batch)])
    negatives = torch.cat(parts)
    counts = torch.zeros(n_items + 1, device=device, dtype=torch.float32)
    counts.index_add_(0, safe_targets, kept * (from_batch / kept_count(targets, ignore_index)))
    counts[1:] += uniform / n_items
    return negatives, counts[safe_targets], counts[negatives]


def _kept_rows(targets, ignore_index: int):
    """Which rows count, and the targets with item 1 standing for ignored ones (so that every id indexes)."""
    kept = targets != ignore_index
    return kept, targets.masked_fill(~kept, 1)


def _draw_kept_rows(kept, count: int) -> torch.Tensor:
    """`count` row indices drawn uniformly, with replacement, among the kept rows (any row when none is): on the
    device, static shapes."""
    ends = kept.cumsum(0)  # ends[i]: kept rows up to row i
    picks = torch.randint(0, 2**62, (count,), device=kept.device) % ends[-1].clamp(min=1)
    return torch.searchsorted(ends, picks, right=True).clamp(max=len(kept) - 1)


def sampled_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_negatives: int,
                         sampling: str = "uniform", logq_correction: bool = True,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean over rows whose target is not `ignore_index` of -log softmax over [target, negatives] of
    hidden @ weight[.].T (0 when there are none).

    hidden [N, d], weight [n_items + 1, d] (row 0 padding), targets [N] in 1..n_items or `ignore_index`."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    negatives, target_draws, negative_draws = draw_negatives(targets, weight.shape[0] - 1, num_negatives, sampling,
                                                             ignore_index)
    kept, safe_targets = _kept_rows(targets, ignore_index)
    positive = (hidden * weight[safe_targets]).sum(-1, keepdim=True)
    negative = hidden @ weight[negatives].T
    if logq_correction:
        positive = positive - target_draws.log()[:, None]
        negative = negative - negative_draws.log()[None, :]
    negative = negative.masked_fill(negatives[None, :] == safe_targets[:, None], float("-inf"))
    # ignored rows get finite scores (their expected draws may be 0) and no gradient
    logits = torch.where(kept[:, None], torch.cat([positive, negative], dim=1), 0.0).float()
    losses = F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=targets.device),
                             reduction="none")
    return torch.where(kept, losses, 0.0).sum() / kept_count(targets, ignore_index)
