"""Dense attention at long histories stays linear in memory: no [L, L] mask, scores or math-kernel fallback.

On the GPU, evaluation runs a float32 copy of the model; there `scaled_dot_product_attention(enable_gqa=True)` has
no fused kernel and falls back to the math one, which materialises [B, H, L, L] scores (2 TiB at batch 256 and
L = 16,384). These CPU tests check what the model asks sdpa for, and that no op of a whole evaluation forward at
L = 8,192 (sdpa and eager) produces a tensor with two dimensions of the history's length.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.evaluation import model_score_function
from blossomrec_hf.model import modeling_blossomrec

LENGTH = 8192


class LargestTensors(TorchDispatchMode):
    """Records the shape of every tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.shapes.append(tuple(tensor.shape))
        return out


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_dense_evaluation_at_8192_items_builds_no_length_squared_tensor(implementation):
    torch.manual_seed(0)
    config = BlossomRecConfig(n_items=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, attention_type="dense")
    model = BlossomRecForSequentialRecommendation(config).eval()
    model.set_attn_implementation(implementation)
    ids = torch.randint(1, 101, (2, LENGTH))
    ids[1, :100] = 0  # a shorter history, left-padded
    with torch.no_grad(), LargestTensors() as recorded:
        scores = model_score_function(model)({"input_ids": ids})
    assert scores.shape == (2, 101) and torch.isfinite(scores[:, 1:]).all()
    quadratic = [shape for shape in recorded.shapes if sum(size >= LENGTH // 2 for size in shape) >= 2]
    assert not quadratic, f"{implementation} built length x length tensors: {sorted(set(quadratic))[:3]}"
    largest = max(torch.Size(shape).numel() for shape in recorded.shapes)
    assert largest <= modeling_blossomrec.EAGER_MAX_SCORES, largest


def test_float32_cuda_attention_never_asks_sdpa_for_grouped_heads():
    natively = modeling_blossomrec.sdpa_groups_heads_natively
    assert not natively("cuda", torch.float32, 16, (9, 0))  # evaluation's float32 copy: only the math kernel
    assert natively("cuda", torch.bfloat16, 16, (9, 0))  # FlashAttention
    assert not natively("cuda", torch.bfloat16, 16, (7, 5))  # no FlashAttention before compute capability 8.0
    assert not natively("cuda", torch.float16, 12, (9, 0))  # nor for head dims that are not multiples of 8
    assert natively("cpu", torch.float32, 16)


def test_without_native_grouping_sdpa_gets_expanded_heads_and_no_mask(monkeypatch):
    q, k, v = torch.randn(2, 8, 300, 16), torch.randn(2, 2, 300, 16), torch.randn(2, 2, 300, 16)
    grouped = modeling_blossomrec.dense_attention_sdpa(q, k, v)
    calls, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(*args, **kwargs):
        calls.append((args, kwargs))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(modeling_blossomrec, "sdpa_groups_heads_natively", lambda *args: False)
    monkeypatch.setattr(modeling_blossomrec.F, "scaled_dot_product_attention", recording_sdpa)
    expanded = modeling_blossomrec.dense_attention_sdpa(q, k, v)
    (args, kwargs), = calls
    assert args[1].shape[1] == args[2].shape[1] == 8 and not kwargs.get("enable_gqa")
    assert kwargs.get("attn_mask") is None and kwargs["is_causal"] is True
    torch.testing.assert_close(expanded, grouped, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(modeling_blossomrec.dense_attention_eager(q, k, v), grouped, atol=1e-5, rtol=1e-5)
