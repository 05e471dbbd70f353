"""Packed input (several histories per row, `position_ids` restarting at 0) against the same histories padded."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation

LENGTHS = [5, 40, 1, 70, 17]


def make_model(attention_type, implementation=None):
    config = BlossomRecConfig(n_items=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                              attention_type=attention_type, initializer_range=0.2)
    torch.manual_seed(0)
    model = BlossomRecForSequentialRecommendation(config)
    if implementation:
        model.set_attn_implementation(implementation)
    return model


def histories(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 61, (n,), generator=generator) for n in LENGTHS]


def padded(items):
    batch = torch.zeros(len(items), max(len(h) for h in items), dtype=torch.long)
    for row, history in enumerate(items):
        batch[row, batch.shape[1] - len(history):] = history  # left padding
    return batch


def packed(items, trailing_padding=0):
    ids = torch.cat([*items, torch.zeros(trailing_padding, dtype=torch.long)])[None]
    positions = torch.cat([torch.arange(len(h)) for h in items] + [torch.zeros(trailing_padding, dtype=torch.long)])
    return ids, positions[None]


@pytest.mark.parametrize("attention_type, implementation", [("blossom", "blossom_torch"), ("dense", "sdpa"),
                                                            ("dense", "eager")])
def test_packed_equals_padded_scores_loss_and_gradients(attention_type, implementation):
    items = histories()
    model = make_model(attention_type, implementation)
    ids, positions = packed(items, trailing_padding=3)
    packed_out = model(ids, position_ids=positions, labels=ids, logits_to_keep=1)
    padded_ids = padded(items)
    padded_out = model(padded_ids, labels=padded_ids, logits_to_keep=1)
    torch.testing.assert_close(packed_out.logits, padded_out.logits, rtol=1e-5, atol=1e-5)  # [histories, 1, V]
    torch.testing.assert_close(packed_out.loss, padded_out.loss, rtol=1e-5, atol=1e-6)
    grads = [torch.autograd.grad(out.loss, list(model.parameters())) for out in (packed_out, padded_out)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    every = model(ids, position_ids=positions).logits  # [1, T, V] in the caller's layout
    assert every.shape == (1, sum(LENGTHS) + 3, 61)
    torch.testing.assert_close(every[0, sum(LENGTHS[:2]) - 1], padded_out.logits[1, 0], rtol=1e-5, atol=1e-5)


def test_no_history_sees_another():
    model = make_model("blossom", "blossom_torch")
    items = histories()
    ids, positions = packed(items)
    changed = [h.clone() for h in items]
    changed[1] = torch.randint(1, 61, (LENGTHS[1],), generator=torch.Generator().manual_seed(9))
    before = model(ids, position_ids=positions, logits_to_keep=1).logits
    after = model(packed(changed)[0], position_ids=positions, logits_to_keep=1).logits
    assert not torch.allclose(before[1], after[1])
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(before[keep], after[keep])


def test_the_shift_never_predicts_across_histories_whatever_the_labels():
    """labels = input_ids (no -100 at history starts): the model still only predicts inside each history."""
    model = make_model("blossom", "blossom_torch")
    items = histories()
    ids, positions = packed(items)
    padded_ids = padded(items)
    torch.testing.assert_close(model(ids, position_ids=positions, labels=ids).loss,
                               model(padded_ids, labels=padded_ids).loss, rtol=1e-5, atol=1e-6)


def test_transformers_flattening_collator_batches_train_the_model():
    model = make_model("dense", "sdpa")
    items = histories()
    batch = DataCollatorWithFlattening()([{"input_ids": h.tolist()} for h in items])
    assert batch["input_ids"].shape == (1, sum(LENGTHS))
    loss = model(batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
    padded_ids = padded(items)
    torch.testing.assert_close(loss, model(padded_ids, labels=padded_ids).loss, rtol=1e-5, atol=1e-6)


def test_recommend_takes_packed_histories():
    model = make_model("blossom", "blossom_torch")
    items = histories()
    ids, positions = packed(items)
    got = model.recommend(ids, position_ids=positions, top_k=5, exclude_history=True)
    want = model.recommend(padded(items), top_k=5, exclude_history=True)
    assert torch.equal(got.item_ids, want.item_ids)
    for row, history in enumerate(items):
        assert not set(got.item_ids[row].tolist()) & set(history.tolist())


def test_broken_position_ids_are_named():
    model = make_model("dense", "sdpa")
    ids = torch.tensor([[3, 4, 5, 6]])
    with pytest.raises(ValueError, match=r"position_ids at row 0, position 2 is 5: .*count 0, 1, 2"):
        model(ids, position_ids=torch.tensor([[0, 1, 5, 6]]))
    with pytest.raises(ValueError, match="position_ids have shape"):
        model(ids, position_ids=torch.tensor([[0, 1, 2]]))
    with pytest.raises(TypeError, match="position_ids must be a torch.Tensor of integers"):
        model(ids, position_ids=torch.tensor([[0.0, 1.0, 2.0, 3.0]]))


@pytest.mark.parametrize("implementation", ["blossom_torch", "sdpa", "eager"])
def test_batches_without_a_real_item_give_a_zero_loss(implementation):
    model = make_model("dense" if implementation in ("sdpa", "eager") else "blossom", implementation)
    padding = torch.zeros(2, 6, dtype=torch.long)
    assert model(padding, labels=padding).loss.item() == 0.0
    assert model(padding[:1], position_ids=torch.zeros(1, 6, dtype=torch.long), labels=padding[:1]).loss.item() == 0.0


def test_int32_labels_train_with_sampled_softmax_too():
    model = make_model("blossom", "blossom_torch")
    model.config.loss_type = "sampled"
    ids = padded(histories()).int()
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_padding_width_does_not_matter_to_an_absolute_position_model():
    config = BlossomRecConfig(n_items=60, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=32, position_embedding_type="absolute",
                              max_position_embeddings=8)
    model = BlossomRecForSequentialRecommendation(config).eval()
    history = torch.tensor([[4, 9, 2, 7, 5]])
    wide = torch.cat([torch.zeros(1, 59, dtype=torch.long), history], dim=1)  # 64 wide, 5 items
    torch.testing.assert_close(model(wide, logits_to_keep=1).logits, model(history, logits_to_keep=1).logits)
