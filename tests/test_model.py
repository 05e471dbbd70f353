"""BlossomRecForSequentialRecommendation: gradients, padding invariance, lengths, bad input, dtypes, loss, backends."""

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.model import modeling_blossomrec
from blossomrec_hf.model.chunked_cross_entropy import chunked_linear_cross_entropy
from blossomrec_hf.model.history_layout import HistoryLayout

N_ITEMS = 50


def tiny_config(**overrides):
    fields = dict(n_items=N_ITEMS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, hidden_dropout_prob=0.0, compress_block_size=8, compress_stride=4,
                  selection_block_size=4, num_selected_blocks=2, stis_window=3)
    fields.update(overrides)
    return BlossomRecConfig(**fields)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return BlossomRecForSequentialRecommendation(tiny_config(**overrides)).eval()


def random_history(length, seed):
    return torch.randint(1, N_ITEMS + 1, (length,), generator=torch.Generator().manual_seed(seed))


def pad(histories, length, side):
    rows = []
    for history in histories:
        padding = torch.zeros(length - len(history), dtype=torch.long)
        rows.append(torch.cat([padding, history] if side == "left" else [history, padding]))
    return torch.stack(rows)


@pytest.mark.parametrize("overrides", [
    {},
    {"use_compressed_branch": False},
    {"attention_type": "dense"},
    {"position_embedding_type": "absolute", "max_position_embeddings": 40},
    {"tie_word_embeddings": False},
], ids=["blossom", "no-compressed-branch", "dense", "absolute-positions", "untied"])
def test_every_parameter_receives_a_gradient(overrides):
    model = tiny_model(**overrides).train()
    ids = torch.stack([random_history(40, seed) for seed in range(3)])
    ids[0, :25] = 0
    model(ids, labels=ids).loss.backward()
    dead = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


@pytest.mark.parametrize("length", [1, 4, 5, 23])
def test_block_compressor_is_the_published_mlp_over_each_block(length):
    """Each compressed key (value) = MLP(flatten(block's keys + position embeddings)), blocks of 8 with stride 4
    whose positions before 0 hold zero keys; the module computes it with the position term folded into the bias, on
    packed tokens (here a short history, then one of `length` items)."""
    config = tiny_config()
    compressor = modeling_blossomrec.BlockCompressor(config)
    torch.manual_seed(length)
    for parameter in compressor.parameters():
        torch.nn.init.normal_(parameter)
    compressor.double()
    first = 6
    k, v = torch.randn(2, first + length, 2, config.head_dim, dtype=torch.float64)
    layout = HistoryLayout.from_inputs(torch.ones(1, first + length, dtype=torch.long), None, n_items=1,
                                       position_ids=torch.cat([torch.arange(first), torch.arange(length)])[None])
    blocks = layout.compressed_blocks(block_size=8, stride=4)
    compressed = compressor(k, v, blocks)
    assert blocks.cu_seqlens.tolist() == [0, 1, 1 + (length - 1) // 4]
    for index, x in enumerate((k, v)):
        history = torch.cat([x.new_zeros(4, 2, config.head_dim), x[first:]])
        for w in range((length - 1) // 4):
            block = history[4 * w:4 * w + 8].transpose(0, 1) + compressor.positions[index]  # [heads, 8, D]
            hidden = torch.relu(block.flatten(-2) @ compressor.hidden_weight[index] + compressor.hidden_bias[index])
            expected = hidden @ compressor.output_weight[index] + compressor.output_bias[index]
            torch.testing.assert_close(compressed[index][1 + w], expected)
        assert compressed[index].shape[0] == 1 + (length - 1) // 4


@pytest.mark.parametrize("attention_type", ["blossom", "dense"])
def test_scores_do_not_depend_on_padding_side_amount_or_neighbours(attention_type):
    model = tiny_model(attention_type=attention_type)
    histories = [random_history(n, seed) for seed, n in enumerate([5, 30, 17, 1])]
    alone = [model(h[None]).logits[0] for h in histories]
    with torch.no_grad():
        for side in ("left", "right"):
            for length in (30, 45):
                batch = pad(histories, length, side)
                logits = model(batch).logits
                for row, (history, expected) in enumerate(zip(histories, alone)):
                    real = batch[row] != 0
                    torch.testing.assert_close(logits[row][real], expected, atol=1e-4, rtol=1e-4)
                last = model(batch, logits_to_keep=1).logits[:, 0]
                torch.testing.assert_close(last, torch.stack([a[-1] for a in alone]), atol=1e-4, rtol=1e-4)
        mixed = torch.stack([pad([histories[0]], 33, "left")[0], pad([histories[1]], 33, "right")[0]])
        torch.testing.assert_close(model(mixed, logits_to_keep=1).logits[:, 0],
                                   torch.stack([alone[0][-1], alone[1][-1]]), atol=1e-4, rtol=1e-4)


def test_loss_does_not_depend_on_padding_side():
    model = tiny_model()
    histories = [random_history(n, seed) for seed, n in enumerate([9, 21, 2])]
    left, right = pad(histories, 26, "left"), pad(histories, 26, "right")
    with torch.no_grad():
        torch.testing.assert_close(model(left, labels=left).loss, model(right, labels=right).loss)


def test_every_length_from_1_to_70_runs_forward_and_backward():
    model = tiny_model().train()
    for length in range(1, 71):
        ids = torch.stack([random_history(length, length), random_history(length, 100 + length)])
        out = model(ids, labels=ids, logits_to_keep=1)
        assert torch.isfinite(out.logits[..., 1:]).all(), length
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None), length


def test_labels_are_shifted_next_items_and_padding_is_ignored():
    model = tiny_model()
    ids = pad([random_history(12, 1), random_history(7, 2)], 12, "left")
    labels = ids.clone()
    labels[0, 5] = -100
    with torch.no_grad():
        loss = model(ids, labels=labels).loss
        logits = model(ids).logits
    inputs, targets = logits[:, :-1].reshape(-1, N_ITEMS + 1), labels[:, 1:].reshape(-1)
    keep = (ids[:, :-1].reshape(-1) != 0) & (targets > 0)
    expected = F.cross_entropy(inputs[keep], targets[keep])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_chunked_loss_matches_full_cross_entropy_value_and_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(21, 16, requires_grad=True)
    targets = torch.randint(1, 21, (37,))
    loss = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=5)
    logits = hidden @ weight.T
    logits = torch.cat([torch.full_like(logits[:, :1], float("-inf")), logits[:, 1:]], dim=1)
    expected = F.cross_entropy(logits, targets)
    torch.testing.assert_close(loss, expected)
    got = torch.autograd.grad(loss * 3, (hidden, weight))
    want = torch.autograd.grad(expected * 3, (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_chunked_loss_under_no_grad_forms_no_gradients(monkeypatch):
    hidden, weight = torch.randn(9, 4, requires_grad=True), torch.randn(6, 4, requires_grad=True)
    targets = torch.randint(1, 6, (9,))
    with_grad = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    products = []
    original_matmul = torch.Tensor.__matmul__
    monkeypatch.setattr(torch.Tensor, "__matmul__", lambda a, b: products.append(1) or original_matmul(a, b))
    with torch.no_grad():
        without_grad = chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert len(products) == 3  # one logits product per chunk, no gradient products
    torch.testing.assert_close(without_grad, with_grad.detach())


def test_no_labels_to_predict_gives_zero_loss():
    model = tiny_model()
    ids = torch.tensor([[0, 0, 7]])
    assert model(ids, labels=ids).loss.item() == 0.0


@pytest.mark.parametrize("bad_id", [N_ITEMS + 1, -1, 10**6])
def test_item_ids_outside_vocabulary_name_the_id_and_row(bad_id):
    model = tiny_model()
    ids = torch.stack([random_history(8, 0), random_history(8, 1)])
    ids[1, 3] = bad_id
    with pytest.raises(ValueError, match=rf"item id {bad_id} at row 1, position 3"):
        model(ids)
    good = torch.stack([random_history(8, 0), random_history(8, 1)])
    with pytest.raises(ValueError, match=rf"labels holds item id {bad_id} at row 1"):
        model(good, labels=ids)


def test_wrong_dtype_shape_and_mask_are_clear_errors():
    model = tiny_model()
    ids = random_history(8, 0)
    with pytest.raises(TypeError, match="integer item ids"):
        model(ids[None].float())
    with pytest.raises(ValueError, match=r"shape \[batch, sequence_length\]"):
        model(ids)
    with pytest.raises(ValueError, match="labels have shape"):
        model(ids[None], labels=ids[None, :4])
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(ids[None], attention_mask=torch.ones(1, 3))
    with pytest.raises(ValueError, match="marks the padding id 0"):
        model(torch.tensor([[0, 3]]), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="logits_to_keep"):
        model(ids[None], logits_to_keep=-1)


@pytest.mark.parametrize("attention_type", ["blossom", "dense"])
def test_empty_inputs_narrow_ids_and_bool_counts_are_clear_errors(attention_type):
    model = tiny_model(attention_type=attention_type)
    ids = random_history(8, 0)[None]
    for empty in (torch.zeros(0, 8, dtype=torch.long), torch.zeros(2, 0, dtype=torch.long)):
        shape = tuple(empty.shape)
        for call in (lambda: model(empty), lambda: model(empty, labels=empty), lambda: model.recommend(empty)):
            with pytest.raises(ValueError, match=rf"input_ids is empty \(shape {re.escape(str(shape))}\)"):
                call()
    for dtype in (torch.uint8, torch.int8, torch.int16):
        with pytest.raises(TypeError, match=rf"input_ids must hold integer item ids .* got dtype {dtype}"):
            model(ids.to(dtype))
        with pytest.raises(TypeError, match=rf"input_ids .* got dtype {dtype}"):
            model.recommend(ids.to(dtype))
        with pytest.raises(TypeError, match=rf"labels .* got dtype {dtype}"):
            model(ids, labels=ids.to(dtype))
    with pytest.raises(TypeError, match="top_k must be an int, got bool True"):
        model.recommend(ids, top_k=True)
    with pytest.raises(TypeError, match="top_k must be an int, got float 2.0"):
        model.recommend(ids, top_k=2.0)
    with pytest.raises(TypeError, match="logits_to_keep must be an int, got bool True"):
        model(ids, logits_to_keep=True)
    int32 = model(ids.int(), logits_to_keep=1).logits  # torch.int32 ids stay accepted
    torch.testing.assert_close(int32, model(ids, logits_to_keep=1).logits)
    assert model.recommend(ids, top_k=np.int64(3)).item_ids.shape == (1, 3)


def test_attention_mask_marks_padding_even_for_nonzero_ids():
    model = tiny_model()
    history = random_history(6, 3)
    with torch.no_grad():
        masked = model(torch.cat([torch.tensor([[9, 9]]), history[None]], 1),
                       attention_mask=torch.tensor([[0, 0] + [1] * 6]), logits_to_keep=1).logits
        plain = model(history[None], logits_to_keep=1).logits
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)


def test_all_padding_row_gives_finite_output_and_recommend_refuses_it():
    model = tiny_model()
    ids = torch.stack([torch.zeros(10, dtype=torch.long), random_history(10, 4)])
    out = model(ids, labels=ids, logits_to_keep=2)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logits).all()
    assert torch.isfinite(model(ids).logits).all()
    with pytest.raises(ValueError, match=r"empty histories \(rows \[0\]"):
        model.recommend(ids)


def test_recommend_returns_best_items_and_can_exclude_history():
    model = tiny_model()
    ids = pad([random_history(9, 5), random_history(4, 6)], 9, "left")
    rec = model.recommend(ids, top_k=5)
    scores = model(ids, logits_to_keep=1).logits[:, 0]
    assert rec.item_ids.shape == (2, 5) and (rec.item_ids > 0).all()
    torch.testing.assert_close(rec.scores, scores.gather(1, rec.item_ids))
    assert (rec.scores[:, :-1] >= rec.scores[:, 1:]).all()
    excluded = model.recommend(ids, top_k=N_ITEMS - 9, exclude_history=True)
    for row in range(2):
        seen = set(ids[row].tolist()) - {0}
        assert not seen & set(excluded.item_ids[row][torch.isfinite(excluded.scores[row])].tolist())
    with pytest.raises(ValueError, match="top_k"):
        model.recommend(ids, top_k=N_ITEMS + 1)
    with pytest.raises(ValueError, match=r"rows \[0\] have fewer than top_k=.* outside their history"):
        model.recommend(ids, top_k=N_ITEMS - len(set(ids[0].tolist()) - {0}) + 1, exclude_history=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runs_in_float32_and_bfloat16(dtype):
    reference = tiny_model()
    model = tiny_model().to(dtype)
    ids = pad([random_history(40, 7), random_history(23, 8)], 40, "right")
    out = model(ids, labels=ids, logits_to_keep=1)
    assert out.logits.dtype == dtype and torch.isfinite(out.loss)
    out.loss.backward()
    want = reference(ids, logits_to_keep=1).logits[..., 1:]
    error = (out.logits[..., 1:].float() - want).norm() / want.norm()
    assert error < (1e-5 if dtype == torch.float32 else 5e-2)


def test_attention_backends_are_selected_the_transformers_way(monkeypatch):
    model = tiny_model()
    assert model.config._attn_implementation == "blossom_torch"
    with pytest.raises(ValueError, match="not available for attention_type='blossom'"):
        model.set_attn_implementation("sdpa")
    monkeypatch.setattr(modeling_blossomrec, "triton_unavailable_reason", lambda: "triton is not installed")
    with pytest.raises(ValueError, match="blossom_triton.*triton is not installed"):
        model.set_attn_implementation("blossom_triton")

    dense = tiny_model(attention_type="dense")
    assert dense.config._attn_implementation == "sdpa"
    ids = pad([random_history(20, 9), random_history(11, 10)], 20, "left")
    with torch.no_grad():
        sdpa = dense(ids).logits
        dense.set_attn_implementation("eager")
        assert dense.config._attn_implementation == "eager"
        torch.testing.assert_close(dense(ids).logits, sdpa, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not available for attention_type='dense'"):
        dense.set_attn_implementation("blossom_torch")


def test_config_rejects_bad_fields_by_name():
    for fields, field in [({"n_items": 0}, "n_items"), ({"num_key_value_heads": 3}, "num_key_value_heads"),
                          ({"attention_type": "sparse"}, "attention_type"),
                          ({"position_embedding_type": "alibi"}, "position_embedding_type"),
                          ({"compress_stride": 64}, "compress_stride"),
                          ({"hidden_dropout_prob": 1.5}, "hidden_dropout_prob"), ({"hidden_size": 30}, "hidden_size")]:
        with pytest.raises(ValueError, match=field):
            BlossomRecConfig(**{"n_items": 10, **fields})


def test_absolute_positions_refuse_histories_longer_than_the_table():
    model = tiny_model(position_embedding_type="absolute", max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model(random_history(9, 0)[None])


def test_forward_at_16384_items_on_cpu_stays_under_4_gb():
    """The published STIS mask alone is L x L; here a 16,384-item history must run forward in < 4 GB."""
    script = textwrap.dedent("""
        import resource, torch
        from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
        torch.manual_seed(0)
        model = BlossomRecForSequentialRecommendation(BlossomRecConfig(n_items=1000)).eval()
        ids = torch.randint(1, 1001, (1, 16384))
        with torch.no_grad():
            logits = model(ids, logits_to_keep=1).logits
        assert torch.isfinite(logits[..., 1:]).all()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    peak_gib = float(result.stdout.split()[-1])
    assert peak_gib < 4.0, f"peak resident memory {peak_gib:.2f} GiB"


def test_backbone_returns_the_hidden_states_the_recommender_scores():
    model = tiny_model()
    ids = pad([random_history(6, 11), random_history(9, 12)], 9, "left")
    with torch.no_grad():
        backbone = model.model(ids, output_hidden_states=True)
        full = model(ids, output_hidden_states=True)
    assert len(backbone.hidden_states) == model.config.num_hidden_layers + 1
    torch.testing.assert_close(backbone.last_hidden_state, full.hidden_states[-1])
    assert backbone.last_hidden_state[0, :3].abs().sum() == 0  # padding positions come back as zeros
    torch.testing.assert_close(model.score(backbone.last_hidden_state), full.logits)
