"""The compressed-block gather's backward (a gather over each token's covering slots) against indexing's own."""

import pytest
import torch

from blossomrec_hf.model.history_layout import HistoryLayout

LENGTHS = [1, 5, 16, 17, 33, 70]


def packed(lengths, padding: int = 0):
    ids = torch.cat([torch.randint(1, 100, (n,)) for n in lengths] + [torch.zeros(padding, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(n) for n in [*lengths, padding]])[None]
    return ids, positions


def layouts():
    torch.manual_seed(0)
    ids, positions = packed(LENGTHS)
    yield "dynamic", HistoryLayout.from_inputs(ids, None, 100, positions)
    ids, positions = packed(LENGTHS, padding=9)  # a fixed-size batch: a padding history fills it
    bounds = torch.tensor([0, *torch.tensor([*LENGTHS, 9]).cumsum(0).tolist()])
    yield "static", HistoryLayout.from_inputs(ids, None, 100, positions, bounds, max(LENGTHS))


@pytest.mark.parametrize("block_size, stride", [(32, 16), (32, 8), (16, 16), (24, 16)])
def test_block_gather_backward_equals_indexing(block_size, stride):
    for name, layout in layouts():
        blocks = layout.compressed_blocks(block_size, stride)
        tokens = torch.randn(layout.positions.shape[0], 2, 4, dtype=torch.float64, requires_grad=True)
        rows = blocks.token_rows
        expected = tokens[rows.clamp(min=0)] * (rows >= 0)[..., None, None].double()
        gathered = blocks.gather(tokens)
        assert torch.equal(gathered, expected), name
        upstream = torch.randn_like(gathered)
        (grad,) = torch.autograd.grad(gathered, tokens, upstream)
        (expected_grad,) = torch.autograd.grad(expected, tokens, upstream)
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-12, msg=name)
        # every covered token lists exactly the slots that hold it
        slots = blocks.token_slots
        for token in range(slots.shape[0]):
            listed = sorted(int(s) for s in slots[token] if s >= 0)
            assert listed == (rows.flatten() == token).nonzero().flatten().tolist(), (name, token)


def test_unchecked_boundaries_that_stop_short_of_the_tokens_are_refused():
    """Without the eager checks (compiling), boundaries that end before the last token would put the tokens past them
    into the last history: an assertion on the device refuses them instead."""
    real = torch.ones(1, 10, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="does not end at the number of tokens"):
        HistoryLayout._from_boundaries(real, torch.tensor([0, 4, 8]), 6, None, check=False)
    layout = HistoryLayout._from_boundaries(real, torch.tensor([0, 4, 10]), 6, None, check=False)
    assert layout.history_of_token.tolist() == [0] * 4 + [1] * 6
