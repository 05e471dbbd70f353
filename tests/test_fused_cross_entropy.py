"""The fused Triton item-softmax loss (interpreter, float32) against float64 and the PyTorch path.

The GPU comparison in bf16 against cut-cross-entropy and liger-kernel is scripts/benchmark_loss.py.
"""

import pytest
import torch

from blossomrec_hf.model import fused_cross_entropy, tile_fitting
from blossomrec_hf.model.chunked_cross_entropy import chunked_linear_cross_entropy
from blossomrec_hf.model.fused_cross_entropy import compute_dtype, linear_cross_entropy
from triton_support import requires_triton

pytestmark = requires_triton


def float64_loss_and_grads(hidden, weight, targets):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logits = h @ w.T
    logits[:, 0] = float("-inf")
    loss = torch.nn.functional.cross_entropy(logits, targets)
    return (loss, *torch.autograd.grad(loss, [h, w]))


def close(a, b, tolerance=1e-5):
    """Relative error within `tolerance`, or absolute where the exact value is ~0 (one candidate item: loss 0)."""
    return (a.double() - b.double()).norm() <= tolerance * b.double().norm() + 1e-6


@pytest.mark.parametrize("rows, items, dim, programs_per_sm", [
    (1, 2, 16, 4),        # one item besides padding, one row
    (37, 50, 16, 4),      # one tile each way
    (200, 301, 24, 64),   # head dim below the tile (padded to 32); items split in 5 parts, rows in 4
    (5, 1000, 32, 64),    # few rows, many items: the forward splits the items
    (130, 7, 16, 4),      # more rows than items
])
def test_matches_float64_forward_and_backward(monkeypatch, rows, items, dim, programs_per_sm):
    monkeypatch.setitem(fused_cross_entropy.TUNING, "programs_per_sm", programs_per_sm)
    generator = torch.Generator().manual_seed(rows * items + dim)
    hidden = torch.randn(rows, dim, generator=generator, requires_grad=True)
    weight = (0.5 * torch.randn(items, dim, generator=generator)).requires_grad_()
    targets = torch.randint(1, items, (rows,), generator=generator)
    loss = linear_cross_entropy(hidden, weight, targets, fused=True)
    grads = torch.autograd.grad(loss, [hidden, weight])
    want = float64_loss_and_grads(hidden.detach(), weight.detach(), targets)
    assert close(loss, want[0])
    for got, expected in zip(grads, want[1:]):
        assert close(got, expected)
    assert torch.equal(grads[1][0], torch.zeros(dim))  # padding gets no gradient
    torch.testing.assert_close(loss, chunked_linear_cross_entropy(hidden, weight, targets))


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("rows, items, programs_per_sm, ignore_index", [
    (37, 50, 4, -100),   # one tile each way
    (200, 301, 64, 0),   # items split in the forward, rows in the item gradient; int32 targets
])
def test_ignored_rows_count_for_nothing(monkeypatch, fused, rows, items, programs_per_sm, ignore_index):
    """Loss and gradients with ignored rows = those of the kept rows alone (float64); ignored rows get no gradient."""
    monkeypatch.setitem(fused_cross_entropy.TUNING, "programs_per_sm", programs_per_sm)
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 16, generator=generator, requires_grad=True)
    weight = (0.5 * torch.randn(items, 16, generator=generator)).requires_grad_()
    targets = torch.randint(1, items, (rows,), generator=generator, dtype=torch.int32 if ignore_index == 0 else None)
    kept = torch.rand(rows, generator=generator) < 0.6
    targets[~kept] = ignore_index
    loss = linear_cross_entropy(hidden, weight, targets, ignore_index=ignore_index, fused=fused)
    grads = torch.autograd.grad(loss, [hidden, weight])
    want = float64_loss_and_grads(hidden.detach()[kept], weight.detach(), targets[kept].long())
    assert close(loss, want[0])
    assert close(grads[0][kept], want[1]) and torch.equal(grads[0][~kept], torch.zeros(int((~kept).sum()), 16))
    assert close(grads[1], want[2])


@pytest.mark.parametrize("fused", [False, True])
def test_a_batch_of_ignored_rows_has_loss_and_gradients_zero(fused):
    hidden, weight = torch.randn(9, 16, requires_grad=True), torch.randn(12, 16, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.full((9,), -100), fused=fused)
    grads = torch.autograd.grad(loss, [hidden, weight])
    assert loss.item() == 0.0
    assert all(torch.equal(grad, torch.zeros_like(grad)) for grad in grads)


def test_gradients_are_bitwise_reproducible_and_scale_with_the_upstream_gradient():
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(70, 16, generator=generator, requires_grad=True)
    weight = torch.randn(90, 16, generator=generator, requires_grad=True)
    targets = torch.randint(1, 90, (70,), generator=generator)
    first = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, fused=True), [hidden, weight])
    second = torch.autograd.grad(linear_cross_entropy(hidden, weight, targets, fused=True), [hidden, weight])
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    tripled = torch.autograd.grad(3 * linear_cross_entropy(hidden, weight, targets, fused=True), [hidden, weight])
    for a, b in zip(tripled, first):
        torch.testing.assert_close(a, 3 * b)


def test_without_gradients_only_the_loss_is_computed():
    hidden, weight = torch.randn(9, 16), torch.randn(12, 16)
    targets = torch.randint(1, 12, (9,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, fused=True)
    torch.testing.assert_close(loss, chunked_linear_cross_entropy(hidden, weight, targets))


def test_the_operand_dtype_follows_autocast():
    hidden, weight = torch.randn(3, 16), torch.randn(5, 16)
    assert compute_dtype(hidden, weight) == torch.float32
    assert compute_dtype(hidden.bfloat16(), weight) == torch.float32  # no autocast: the wider input
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert compute_dtype(hidden, weight) == torch.bfloat16


def test_cpu_tensors_take_the_pytorch_path_unless_asked(monkeypatch):
    hidden, weight = torch.randn(4, 16), torch.randn(6, 16)
    targets = torch.randint(1, 6, (4,))
    monkeypatch.setattr(fused_cross_entropy, "_FORWARD", None)  # would fail if called
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets),
                               chunked_linear_cross_entropy(hidden, weight, targets))
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="fused cross-entropy cannot run here: cpu tensors"):
        linear_cross_entropy(hidden, weight, targets, fused=True)


def test_tiles_shrink_where_the_gpu_has_too_little_shared_memory(monkeypatch):
    """A launch that Triton refuses for want of shared memory (float32 at three TF32 passes needs 262,144 bytes on
    sm_90's 232,448 with the tuned tiles) is retried with half the rows per tile, the result unchanged, and the tile
    that fitted is remembered for the next call."""
    from triton.runtime.errors import OutOfResources

    tried = []

    def small_tiles_only(kernel):
        class StandIn:
            def __getitem__(self, grid):
                def launch(*args, BM, **kwargs):
                    tried.append((kernel.__name__, BM))
                    if BM > 32:
                        raise OutOfResources(BM * 2048, 32 * 2048, "shared memory")
                    return kernel[grid](*args, BM=BM, **kwargs)
                return launch
        return StandIn()

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(70, 16, generator=generator, requires_grad=True)
    weight = torch.randn(90, 16, generator=generator, requires_grad=True)
    targets = torch.randint(1, 90, (70,), generator=generator)
    want = linear_cross_entropy(hidden, weight, targets, fused=True)
    want_grads = torch.autograd.grad(want, [hidden, weight])
    monkeypatch.setattr(tile_fitting, "_FITTED", {})
    for name in ("softmax_forward", "item_gradient"):
        monkeypatch.setattr(fused_cross_entropy, name, small_tiles_only(getattr(fused_cross_entropy, name)))
    for _ in range(2):
        loss = linear_cross_entropy(hidden, weight, targets, fused=True)
        assert torch.equal(loss, want)
        for got, expected in zip(torch.autograd.grad(loss, [hidden, weight]), want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert tried == [("softmax_forward", 128), ("softmax_forward", 64), ("softmax_forward", 32),
                     ("item_gradient", 64), ("item_gradient", 32), ("softmax_forward", 32), ("item_gradient", 32)]
