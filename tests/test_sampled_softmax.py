"""Sampled-softmax loss: what is drawn, the log-Q correction, and that the target is never its own negative."""

import math

import pytest
import torch

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.model.sampled_softmax import draw_negatives, sampled_softmax_loss


@pytest.mark.parametrize("sampling", ["uniform", "in_batch", "mixed"])
def test_draws_and_their_expected_counts(sampling):
    torch.manual_seed(0)
    targets = torch.tensor([3, 3, 3, 7, 9, 9])
    negatives, target_draws, negative_draws = draw_negatives(targets, n_items=20, num_negatives=8, sampling=sampling)
    assert negatives.shape == (8,) and negative_draws.shape == (8,) and target_draws.shape == (6,)
    assert negatives.min() >= 1 and negatives.max() <= 20  # never the padding id
    uniform = {"uniform": 8, "in_batch": 0, "mixed": 4}[sampling]
    from_batch = 8 - uniform
    assert set(negatives[uniform:].tolist()) <= {3, 7, 9}  # the in-batch part comes from the targets
    for item, draws in zip(targets.tolist() + negatives.tolist(), target_draws.tolist() + negative_draws.tolist()):
        expected = uniform / 20 + from_batch * targets.eq(item).sum().item() / 6
        assert draws == pytest.approx(expected)


def explicit_loss(hidden, weight, targets, negatives, target_draws, negative_draws, correct):
    """The loss row by row with Python loops: -log of the target's share among itself and the other negatives."""
    total = 0.0
    for row in range(len(targets)):
        positive = hidden[row] @ weight[targets[row]] - (math.log(target_draws[row]) if correct else 0.0)
        scores = [positive] + [hidden[row] @ weight[j] - (math.log(q) if correct else 0.0)
                               for j, q in zip(negatives.tolist(), negative_draws.tolist()) if j != targets[row]]
        total += torch.logsumexp(torch.stack(scores), 0) - positive
    return total / len(targets)


@pytest.mark.parametrize("sampling, correct", [("uniform", True), ("in_batch", True), ("mixed", False)])
def test_loss_matches_the_explicit_formula(sampling, correct):
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=generator, dtype=torch.float64)
    weight = torch.randn(11, 8, generator=generator, dtype=torch.float64)
    targets = torch.tensor([1, 4, 4, 10, 2, 4])
    torch.manual_seed(5)
    loss = sampled_softmax_loss(hidden, weight, targets, 16, sampling, logq_correction=correct)
    torch.manual_seed(5)
    drawn = draw_negatives(targets, 10, 16, sampling)
    assert (drawn[0][None, :] == targets[:, None]).any()  # some rows draw their own target: it must be masked
    want = explicit_loss(hidden, weight, targets, *drawn, correct)
    torch.testing.assert_close(loss, want.to(loss.dtype))


def test_uniform_draws_need_no_correction():
    hidden, weight = torch.randn(5, 8), torch.randn(30, 8)
    targets = torch.tensor([1, 2, 3, 4, 5])
    torch.manual_seed(0)
    corrected = sampled_softmax_loss(hidden, weight, targets, 12, "uniform", logq_correction=True)
    torch.manual_seed(0)
    plain = sampled_softmax_loss(hidden, weight, targets, 12, "uniform", logq_correction=False)
    torch.testing.assert_close(corrected, plain)


def test_a_target_drawn_as_every_negative_leaves_only_itself():
    hidden, weight = torch.randn(4, 8), torch.randn(3, 8)
    targets = torch.tensor([2, 2, 2, 2])
    loss = sampled_softmax_loss(hidden, weight, targets, 6, "in_batch")  # every negative is item 2
    assert loss.item() == 0.0


@pytest.mark.parametrize("sampling", ["uniform", "in_batch", "mixed"])
def test_ignored_rows_count_for_nothing(sampling):
    """With ignored rows: the loss and gradients of the kept rows alone, drawing the same negatives."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(13, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([-100, 4, 4, 12, -100, 7, 1, -100, 4])
    kept = targets != -100
    results = []
    for rows in (slice(None), kept):
        torch.manual_seed(7)
        loss = sampled_softmax_loss(hidden[rows], weight, targets[rows], 6, sampling)
        results.append((loss, *torch.autograd.grad(loss, [hidden, weight])))
    (loss, hidden_grad, weight_grad), want = results
    torch.testing.assert_close(loss, want[0])
    torch.testing.assert_close(hidden_grad, want[1])  # zero on the ignored rows
    torch.testing.assert_close(weight_grad, want[2])


@pytest.mark.parametrize("sampling", ["uniform", "in_batch"])
def test_a_batch_of_ignored_rows_has_loss_and_gradients_zero(sampling):
    hidden, weight = torch.randn(5, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    loss = sampled_softmax_loss(hidden, weight, torch.full((5,), -100), 12, sampling)
    grads = torch.autograd.grad(loss, [hidden, weight])
    assert loss.item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_the_model_trains_with_sampled_softmax_and_checks_its_fields():
    config = BlossomRecConfig(n_items=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=32, loss_type="sampled", num_negatives=16,
                              negative_sampling="mixed")
    model = BlossomRecForSequentialRecommendation(config)
    ids = torch.randint(1, 41, (3, 20))
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and model.model.item_embeddings.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="`loss_type` must be one of"):
        BlossomRecConfig(n_items=5, loss_type="bpr")
    with pytest.raises(ValueError, match="`negative_sampling` must be one of"):
        BlossomRecConfig(n_items=5, negative_sampling="popular")
    with pytest.raises(ValueError, match="`num_negatives` must be a positive integer"):
        BlossomRecConfig(n_items=5, num_negatives=0)
