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
own target is masked out, so the target never counts as its own negative. Shapes are static: no unique(), no syncs
of its own.
"""

import torch
import torch.nn.functional as F


def draw_negatives(targets: torch.Tensor, n_items: int, num_negatives: int, sampling: str):
    """(negatives [K] item ids, expected number of draws of every target [N] and of every negative [K]).

    `targets` [N] holds ids in 1..n_items; negatives come from the same range (never the padding id 0)."""
    uniform = num_negatives if sampling == "uniform" else num_negatives // 2 if sampling == "mixed" else 0
    from_batch = num_negatives - uniform
    device = targets.device
    parts = [torch.randint(1, n_items + 1, (uniform,), device=device)]
    if from_batch:
        parts.append(targets[torch.randint(0, targets.shape[0], (from_batch,), device=device)])
    negatives = torch.cat(parts)
    counts = torch.zeros(n_items + 1, device=device, dtype=torch.float32)
    counts.index_add_(0, targets, torch.full_like(targets, from_batch / targets.shape[0], dtype=torch.float32))
    counts[1:] += uniform / n_items
    return negatives, counts[targets], counts[negatives]


def sampled_softmax_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_negatives: int,
                         sampling: str = "uniform", logq_correction: bool = True) -> torch.Tensor:
    """Mean over rows of -log softmax over [target, negatives] of hidden @ weight[.].T.

    hidden [N, d], weight [n_items + 1, d] (row 0 padding), targets [N] in 1..n_items."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    negatives, target_draws, negative_draws = draw_negatives(targets, weight.shape[0] - 1, num_negatives, sampling)
    positive = (hidden * weight[targets]).sum(-1, keepdim=True)
    negative = hidden @ weight[negatives].T
    if logq_correction:
        positive = positive - target_draws.log()[:, None]
        negative = negative - negative_draws.log()[None, :]
    negative = negative.masked_fill(negatives[None, :] == targets[:, None], float("-inf"))
    logits = torch.cat([positive, negative], dim=1).float()
    return F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long, device=targets.device))
