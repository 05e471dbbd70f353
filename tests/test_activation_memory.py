"""What the attention keeps for its backward: the compressor's recompute and the dense copies (CPU, measured with
saved-tensor hooks, so the numbers are the same on any device)."""

import pytest
import torch

import blossomrec_hf.model.modeling_blossomrec as modeling
from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from triton_support import requires_triton

N_ITEMS = 50


def make_model(implementation="blossom_torch"):
    # the kernels take selection blocks of 16 or more; the PyTorch path is quicker with small ones
    blocks = (32, 16, 16) if implementation == "blossom_triton" else (8, 4, 4)
    config = BlossomRecConfig(n_items=N_ITEMS, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                              compress_block_size=blocks[0], compress_stride=blocks[1],
                              selection_block_size=blocks[2], num_selected_blocks=2, stis_window=2,
                              attn_implementation=implementation)
    torch.manual_seed(0)
    return BlossomRecForSequentialRecommendation(config)


def batch():
    generator = torch.Generator().manual_seed(1)
    lengths = [40, 7, 25, 60]
    ids = torch.cat([torch.randint(1, N_ITEMS + 1, (n,), generator=generator) for n in lengths])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return dict(input_ids=ids, position_ids=positions, labels=ids)


def saved_bytes_and_grads(model, recompute_from: int, monkeypatch):
    """Bytes of the distinct storages autograd keeps for the backward, the loss and every gradient."""
    monkeypatch.setattr(modeling, "RECOMPUTE_COMPRESSOR_FROM", recompute_from)
    storages = {}

    def keep(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        loss = model(**batch()).loss
    loss.backward()
    return sum(storages.values()), loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_recomputing_the_compressor_keeps_less_and_changes_nothing(monkeypatch):
    model = make_model()
    kept_bytes, kept_loss, kept_grads = saved_bytes_and_grads(model, 10**9, monkeypatch)
    recomputed_bytes, loss, grads = saved_bytes_and_grads(model, 1, monkeypatch)
    assert torch.equal(loss, kept_loss)
    for name, grad in kept_grads.items():
        assert torch.equal(grads[name], grad), name
    # per layer: the gathered blocks and hidden layer of both MLPs, [2, blocks x kv heads, block x head dim] each
    blocks = sum(max(n - 1, 0) // 4 for n in (40, 7, 25, 60))
    mlp_activations = 2 * 2 * blocks * 2 * 8 * 16 * 4  # two tensors, two MLPs, float32 (head dim 16)
    assert kept_bytes - recomputed_bytes >= 2 * mlp_activations


@requires_triton
@pytest.mark.parametrize("recompute_from", [1, 10**9])
def test_saved_tensors_are_not_views_of_the_input_projection(monkeypatch, recompute_from):
    """With the fused kernels, no saved tensor keeps the attention's input projection output ([T, q + k + v + gate
    columns]) alive."""
    model = make_model("blossom_triton")
    monkeypatch.setattr(modeling, "RECOMPUTE_COMPRESSOR_FROM", recompute_from)
    projection_outputs = []  # held, so that no later tensor reuses their memory (and their address)
    for layer in model.model.layers:
        layer.attention.input_proj.register_forward_hook(lambda module, args, output: projection_outputs.append(output))
    kept = set()

    def keep(tensor):
        kept.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        model(**batch()).loss.backward()
    assert len(projection_outputs) == 2
    assert not {output.untyped_storage().data_ptr() for output in projection_outputs} & kept
