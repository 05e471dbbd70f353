"""The compiled dense model's flash-attention operator (varlen_flash_attention.py), on the CPU: torch's varlen flash
kernels exist only on CUDA, so a float64 PyTorch stand-in with their calling convention takes their place. Checked:
forward and backward against autograd through plain attention (grouped heads included), torch.library.opcheck, and
the dense model compiled with fullgraph=True against eager."""

import math

import pytest
import torch

import blossomrec_hf.model.modeling_blossomrec as modeling
import blossomrec_hf.model.varlen_flash_attention as flash
from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation


def histories_of(cu_seqlens):
    return list(zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()))


def causal_attention(q, k, v, cu_seqlens):
    """Plain causal softmax attention within each history (differentiable): [T, H, D] -> [T, H, D], lse [H, T]."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    outputs, lses = [], []
    for start, stop in histories_of(cu_seqlens):
        qq, kk, vv = (x[start:stop].transpose(0, 1) for x in (q, k, v))
        scores = qq @ kk.transpose(1, 2) / math.sqrt(q.shape[-1])
        scores = scores.masked_fill(torch.ones(stop - start, stop - start, dtype=torch.bool).triu(1), float("-inf"))
        lses.append(torch.logsumexp(scores, dim=-1))
        outputs.append((torch.softmax(scores, dim=-1) @ vv).transpose(0, 1))
    return torch.cat(outputs), torch.cat(lses, dim=1)


def stand_in_forward(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, enable_gqa=False):
    assert is_causal and torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32 and max_q == max_k
    assert enable_gqa == (q.shape[1] != k.shape[1])
    out, lse = causal_attention(q, k, v, cu_q)
    return out, lse.float(), torch.zeros(2, dtype=torch.uint64)


def stand_in_backward(grad_out, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, is_causal, rng_state):
    """The flash backward's gradients, by hand (autograd does not run inside an operator's kernel)."""
    group = q.shape[1] // k.shape[1]
    kk_all, vv_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kk_all), torch.zeros_like(vv_all)
    scale = 1 / math.sqrt(q.shape[-1])
    for start, stop in histories_of(cu_q):
        qq, kk, vv, do = (x[start:stop].transpose(0, 1) for x in (q, kk_all, vv_all, grad_out))
        scores = (qq @ kk.transpose(1, 2) * scale).masked_fill(
            torch.ones(stop - start, stop - start, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(scores, dim=-1)
        dp = do @ vv.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[start:stop] = (ds @ kk * scale).transpose(0, 1)
        dk[start:stop] = (ds.transpose(1, 2) @ qq * scale).transpose(0, 1)
        dv[start:stop] = (p.transpose(1, 2) @ do).transpose(0, 1)
    fold = lambda x: x.unflatten(1, (k.shape[1], group)).sum(2)  # noqa: E731 -- grouped heads' gradients summed
    return dq, fold(dk), fold(dv)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(flash, "FLASH_OPERATORS", (stand_in_forward, stand_in_backward))
    monkeypatch.setattr(flash, "TAKES_GROUPED_HEADS", True)


def packed(heads=4, kv_heads=2, dim=8, lengths=(5, 1, 9), seed=0):
    generator = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    q = torch.randn(tokens, heads, dim, generator=generator, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(tokens, kv_heads, dim, generator=generator, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return q, k, v, cu_seqlens, max(lengths)


def test_forward_and_backward_match_plain_attention(stand_in):
    q, k, v, cu_seqlens, longest = packed()
    grad = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = flash.varlen_flash_attention(q, k, v, cu_seqlens, longest)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    expected, _ = causal_attention(q, k, v, cu_seqlens)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_the_operator_passes_opcheck(stand_in):
    q, k, v, cu_seqlens, longest = packed()
    torch.library.opcheck(flash._FORWARD.op, (q, k, v, cu_seqlens, longest))


@pytest.mark.parametrize("grouped_heads", [True, False], ids=["enable_gqa", "repeated_kv_heads"])
def test_the_compiled_dense_model_runs_it_and_matches_eager(stand_in, monkeypatch, grouped_heads):
    """With flash attention usable (as on CUDA), eager runs `varlen_attn` and the compiled graph this operator; a
    torch whose operator takes no grouped heads (2.11) gets one kv head per query head."""
    monkeypatch.setattr(modeling, "TAKES_GROUPED_HEADS", grouped_heads)
    monkeypatch.setattr(modeling, "flash_varlen_usable", lambda q: True)
    monkeypatch.setattr(modeling, "VARLEN_PARAMETERS",
                        frozenset({"is_causal", "enable_gqa"} if grouped_heads else {"is_causal"}))

    def eager_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, **options):
        assert set(options) <= modeling.VARLEN_PARAMETERS and options["is_causal"]
        assert options.get("enable_gqa", False) == (q.shape[1] != k.shape[1])
        return causal_attention(q, k, v, cu_q)[0]

    monkeypatch.setattr(modeling, "varlen_attn", eager_varlen_attn)
    calls = []
    monkeypatch.setattr(flash, "FLASH_OPERATORS",
                        (lambda *args, **kwargs: calls.append(1) or stand_in_forward(*args, **kwargs),
                         stand_in_backward))
    config = BlossomRecConfig(n_items=40, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                              attention_type="dense")
    torch.manual_seed(0)
    model = BlossomRecForSequentialRecommendation(config)
    ids = torch.randint(1, 41, (1, 20), generator=torch.Generator().manual_seed(2))
    batch = dict(input_ids=ids, position_ids=torch.tensor([list(range(12)) + list(range(8))]), labels=ids,
                 cu_seq_lens_q=torch.tensor([0, 12, 20], dtype=torch.int32), max_length_q=12)

    def loss_and_grads(forward):
        model.zero_grad()
        loss = forward(**batch).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    eager_loss, eager_grads = loss_and_grads(model)
    assert not calls
    compiled_loss, compiled_grads = loss_and_grads(torch.compile(model, fullgraph=True))
    assert calls
    torch.testing.assert_close(compiled_loss, eager_loss)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, msg=name)
