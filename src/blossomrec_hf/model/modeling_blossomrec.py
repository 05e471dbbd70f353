"""BlossomRec: a SASRec-style next-item recommender whose attention is BlossomRec sparse attention.

This file and the modules it imports travel with every checkpoint as remote code, so a model saved with
`save_pretrained` loads anywhere with `AutoModel.from_pretrained(path, trust_remote_code=True)` and only torch and
transformers installed.

Layout: callers pass histories padded on either side, or packed with `position_ids`; the model computes on their real
items only, history by history (`history_layout.py`), and returns hidden states in the caller's layout.

torch.compile: `torch.compile(model, fullgraph=True)` traces the whole forward and backward with no host sync and no
data-dependent shape: while compiling, the layout is static (every input position is a token; padding is computed but
never seen by an item nor counted) and the checks that read the data are left out. Packed batches of a fixed size
should pass their histories' boundaries (`cu_seq_lens_q`, a tensor [S + 1]) and a bound on their length
(`max_length_q`, an int), as `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` or this package's static
collators give them: then every batch has the same shapes, one graph serves them all, and CUDA graphs can replay it.
"""

import dataclasses
import inspect
import math
import numbers
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.utils import ModelOutput

from .blossom_attention_torch import blossom_attention_torch_varlen
from .blossom_attention_triton import (blossom_attention_triton_varlen, gated_sum, shape_fallback_reason,
                                       triton_unavailable_reason)
from .block_compressor import BlockCompressor
from .fused_cross_entropy import linear_cross_entropy
from .sampled_softmax import sampled_softmax_loss
from .strict_loading import check_finite, check_loaded_keys, no_safetensors_message, refuse_pickled_source
from .configuration_blossomrec import BlossomRecConfig
from .history_layout import HistoryLayout, check_ids_tensor, check_item_ids
from .rotary_embedding import rotary_tables, rotate_queries_and_keys
from .sparse_patterns import SparseGeometry
from .varlen_flash_attention import FLASH_OPERATORS, TAKES_GROUPED_HEADS, varlen_flash_attention

try:  # variable-length flash attention (torch >= 2.10)
    from torch.nn.attention.varlen import varlen_attn
    VARLEN_PARAMETERS = frozenset(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, VARLEN_PARAMETERS = None, frozenset()

IGNORE_INDEX = -100


@dataclass
class SequentialRecommenderOutput(ModelOutput):
    """Output of `BlossomRecForSequentialRecommendation.forward`.

    loss: next-item cross-entropy (when `labels` are given): full softmax over every item, or sampled softmax
        (`config.loss_type`).
    logits: [B, L, n_items + 1] scores of the next item at every position (no labels, `logits_to_keep=0`), or
        [B, k, n_items + 1] after each history's last k items (`logits_to_keep=k`); column 0 (padding) is the lowest
        finite value. Not computed when labels are given with `logits_to_keep=0`: the loss never needs them.
    hidden_states: with `output_hidden_states`, the embeddings and each layer's output, [B, L, hidden_size] each,
        in the caller's layout (zeros at padding).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class BlossomRecModelOutput(ModelOutput):
    """Output of `BlossomRecModel.forward`: the last layer's states and, on request, every layer's, caller layout."""

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class RecommendationOutput(ModelOutput):
    """Top-k next items per history: item ids [B, k] (1..n_items) and their scores [B, k], best first."""

    item_ids: torch.LongTensor | None = None
    scores: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Attention backends: each maps (q, k, v, ...) of one layer to its per-head output.
# ----------------------------------------------------------------------------------------------------------------
# Dense attention never builds an [L, L] tensor: histories are left-aligned, so causality is sdpa's `is_causal` (no
# mask), and the eager reference scores a block of queries at a time.
EAGER_MAX_SCORES = 2**25  # scores per eager query block: 128 MiB in float32


def sdpa_groups_heads_natively(device_type: str, dtype: torch.dtype, head_dim: int, capability=None) -> bool:
    """Whether `scaled_dot_product_attention(..., enable_gqa=True)` runs a fused kernel, without [B, H, L, L] scores.

    The CPU kernel does for every dtype. On CUDA only FlashAttention does (fp16/bf16, head dim a multiple of 8 up to
    256, compute capability 8.0+); otherwise, notably in the float32 copy that evaluation runs, enable_gqa leaves
    only the math kernel, which materialises the scores (2 TiB at batch 256, L = 16,384).
    """
    if device_type == "cpu":
        return True
    if device_type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    return head_dim % 8 == 0 and head_dim <= 256 and (capability is None or capability[0] >= 8)


@torch.compiler.assume_constant_result
def cuda_capability(device: torch.device) -> tuple[int, int]:
    """A CUDA device's compute capability; torch.compile takes it as a constant (Dynamo does not fold
    torch.cuda.get_device_capability itself)."""
    return torch.cuda.get_device_capability(device)


def dense_attention_sdpa(q, k, v):
    group = q.shape[1] // k.shape[1]
    if group > 1:
        capability = cuda_capability(q.device) if q.device.type == "cuda" else None
        if sdpa_groups_heads_natively(q.device.type, q.dtype, q.shape[-1], capability):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        # one key/value head per query head (linear memory) lets the memory-efficient kernel run
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def dense_attention_eager(q, k, v):
    """Plain softmax attention, a block of queries at a time against the keys up to the block's end."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    batch, heads, length, head_dim = q.shape
    block = max(1, EAGER_MAX_SCORES // max(1, batch * heads * length))
    outputs = []
    for start in range(0, length, block):
        stop = min(length, start + block)
        scores = (q[:, :, start:stop] @ k[:, :, :stop].transpose(-1, -2)) / math.sqrt(head_dim)
        future = (torch.arange(start, stop, device=q.device)[:, None]
                  < torch.arange(stop, device=q.device)[None, :])
        outputs.append(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1) @ v[:, :, :stop])
    return torch.cat(outputs, dim=2)


DENSE_BACKENDS = {"sdpa": dense_attention_sdpa, "eager": dense_attention_eager}
BLOSSOM_BACKENDS = {"blossom_torch": blossom_attention_torch_varlen, "blossom_triton": blossom_attention_triton_varlen}


def flash_varlen_usable(q: torch.Tensor) -> bool:
    """Whether torch's variable-length flash attention takes these queries (CUDA, fp16/bf16, flash-capable GPU)."""
    if varlen_attn is None or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    return sdpa_groups_heads_natively("cuda", q.dtype, q.shape[-1], cuda_capability(q.device))


def causal_varlen_attention(q, k, v, cu_seqlens, max_length: int) -> torch.Tensor:
    """Causal flash attention over packed histories. Compiled: this package's operator around torch's
    (varlen_flash_attention.py). Eager: `varlen_attn`, which spells causality `is_causal` in some torch releases and
    `window_size=(-1, 0)` in others; grouped heads need `enable_gqa` where it exists (else one kv head per query
    head)."""
    group = q.shape[1] // k.shape[1]
    compiled = torch.compiler.is_compiling() and FLASH_OPERATORS is not None
    grouped = TAKES_GROUPED_HEADS if compiled else "enable_gqa" in VARLEN_PARAMETERS
    if group > 1 and not grouped:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    if compiled:
        return varlen_flash_attention(q, k, v, cu_seqlens, max_length)
    options = {"is_causal": True} if "is_causal" in VARLEN_PARAMETERS else {"window_size": (-1, 0)}
    if group > 1 and grouped:
        options["enable_gqa"] = True
    cu_seqlens = cu_seqlens.to(torch.int32)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_length, max_length, **options)


def dense_attention_varlen(q, k, v, layout: HistoryLayout, implementation: str) -> torch.Tensor:
    """Dense causal attention over packed tokens q [T, H, D], k, v [T, Hkv, D] -> [T, H, D]: varlen flash attention
    where it runs, else each history as a row of a [histories, longest history] buffer."""
    if implementation == "sdpa" and flash_varlen_usable(q):
        return causal_varlen_attention(q, k, v, layout.cu_seqlens, layout.max_length)
    rows = [layout.pad(x).transpose(1, 2) for x in (q, k, v)]
    return layout.unpad(DENSE_BACKENDS[implementation](*rows).transpose(1, 2))


# Batches of histories this long (max_length) recompute the compressor's activations in the backward: there they
# take memory in proportion to the tokens while the few extra launches are spread over many tokens per history;
# shorter batches keep them (their step is bound by launches, not memory). Compiled packed input that comes with
# position_ids alone has no bound on its histories but its token count: pass cu_seq_lens_q and max_length_q (as
# train.py's collator does) for the short-batch paths here and in the kernels.
RECOMPUTE_COMPRESSOR_FROM = 1024

# The published gate initialisation (gate_init="published"): zero gate weights and these biases per branch, i.e.
# short-term first (sigmoid(2) = 0.88 against sigmoid(-2) = 0.12).
PUBLISHED_GATE_BIAS = {"selected": -2.0, "compressed": -2.0, "stis": 2.0}


class BlossomRecAttention(nn.Module):
    """Grouped-query self-attention: BlossomRec's gated sparse branches, or dense causal attention.

    One input projection gives the queries, keys, values and (BlossomRec, learned gate) the branch gate logits, so the
    step costs one matmul each way instead of four. The branches (`config.attention_branches`: all of them, or an
    ablation's subset) are mixed by the gate, learned or fixed at 0.5 each (`config.gate_type`).
    """

    def __init__(self, config: BlossomRecConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.is_blossom = config.attention_type == "blossom"
        self.branches = config.attention_branches  # in the gate's order
        self.num_branches = len(self.branches)
        self.learned_gate = self.is_blossom and config.gate_type == "learned"
        # queries and keys, values, and the gate's logits where the gate is learned (no empty slice otherwise)
        self.split_sizes = [(self.num_heads + self.num_kv_heads) * self.head_dim, self.num_kv_heads * self.head_dim]
        if self.learned_gate:
            self.split_sizes.append(self.num_heads * self.num_branches)
        self.input_proj = nn.Linear(config.hidden_size, sum(self.split_sizes))
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size)
        if self.is_blossom:
            self.geometry = SparseGeometry.from_config(config)
            # LTIS scores blocks by their compressed keys; STIS alone needs none
            self.compressor = BlockCompressor(config) if "selected" in self.branches else None
        if self.learned_gate and config.gate_init == "published":
            # the initial biases of the projection's last rows, the gate logits (head h, branch i at row
            # h * num_branches + i); `_init_weights` zeroes those rows' weights and sets these biases
            self.input_proj.gate_bias_init = [PUBLISHED_GATE_BIAS[name] for name in self.branches] * self.num_heads

    def forward(self, hidden: torch.Tensor, layout: HistoryLayout,
                rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """hidden [T, d] (the batch's real items, history by history) -> [T, d]. Attention reads each history where it
        lies ([T, heads, head_dim] bounded by `layout.cu_seqlens`); rotary tables are per token ([T, head_dim])."""
        tokens = hidden.shape[0]
        if layout.num_histories == 0:  # packed input of padding only: nothing to attend
            return self.o_proj(hidden.new_zeros(0, self.num_heads * self.head_dim))
        query_key, v, *gate_logits = self.input_proj(hidden).split(self.split_sizes, dim=-1)
        query_key = query_key.view(1, tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        if rotary is not None:
            q, k = rotate_queries_and_keys(query_key, *rotary, self.num_heads)
        else:
            q, k = query_key.split([self.num_heads, self.num_kv_heads], dim=2)
        # squeeze, not [0]: indexing's backward fills a zero tensor and copies into it, a squeeze's is a view
        q, k, v = q.squeeze(0), k.squeeze(0), v.view(tokens, self.num_kv_heads, self.head_dim)
        implementation = self.config._attn_implementation
        if not self.is_blossom:
            out = dense_attention_varlen(q, k, v, layout, implementation)
        else:
            branches = self.blossom_branches(q, k, v, layout, implementation)
            outputs = [branches[name] for name in self.branches]
            if self.learned_gate:
                gate_logits = gate_logits[0].view(tokens, self.num_heads, self.num_branches)
            else:  # fixed gate: sigmoid(0) = 0.5 for every branch (exactly), through the same (fused) sum
                gate_logits = outputs[0].new_zeros(tokens, self.num_heads, self.num_branches)
            out = gated_sum(gate_logits, outputs, fused=implementation == "blossom_triton")
        return self.o_proj(out.reshape(tokens, self.num_heads * self.head_dim))

    def blossom_branches(self, q, k, v, layout: HistoryLayout, implementation: str) -> dict[str, torch.Tensor]:
        """The outputs [T, H, D] of the branches this attention mixes, by name (`self.branches`).

        blossom_torch computes only those. blossom_triton's kernels compute the selected blocks and STIS together, so
        an LTIS-only model drops the STIS output; an STIS-only model runs them without compressed keys (no compressor,
        no compressed branch) and with one selected block instead of `num_selected_blocks` (STIS does not depend on
        it), and drops the selected output: exact, but not the cost of STIS alone."""
        ltis, stis = "selected" in self.branches, "stis" in self.branches
        geometry = self.geometry
        # dense copies, shared by the compressor and the attention (views would keep the projection's whole output
        # alive for the backward)
        k, v = k.contiguous(), v.contiguous()
        if ltis:
            blocks = layout.compressed_blocks(geometry.compress_block_size, geometry.compress_stride)
            recompute = layout.max_length >= RECOMPUTE_COMPRESSOR_FROM
            compressed_keys, compressed_values = self.compressor(k, v, blocks, recompute,
                                                                 fused=implementation == "blossom_triton")
            cu_compressed = blocks.cu_seqlens
        else:
            compressed_keys, compressed_values = k.new_zeros(0, *k.shape[1:]), None
            cu_compressed = torch.zeros_like(layout.cu_seqlens)
            geometry = dataclasses.replace(geometry, num_selected_blocks=1)
        options = dict(selected=ltis, stis=stis) if implementation == "blossom_torch" else {}
        outputs = BLOSSOM_BACKENDS[implementation](
            q, k, v, compressed_keys, compressed_values, cu_seqlens=layout.cu_seqlens, cu_compressed=cu_compressed,
            max_length=layout.max_length, geometry=geometry, **options)
        return dict(zip(("selected", "stis", "compressed"), outputs))


class BlossomRecLayer(nn.Module):
    """Post-LN transformer block as published: x = LN(x + Drop(Attn(x))); x = LN(x + Drop(FFN(x)))."""

    def __init__(self, config: BlossomRecConfig):
        super().__init__()
        self.attention = BlossomRecAttention(config)
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.feed_forward = nn.Sequential(
            nn.Linear(config.hidden_size, config.intermediate_size),
            ACT2FN[config.hidden_act],
            nn.Linear(config.intermediate_size, config.hidden_size),
        )
        self.feed_forward_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, layout: HistoryLayout, rotary) -> torch.Tensor:
        hidden = self.attention_norm(hidden + self.dropout(self.attention(hidden, layout, rotary)))
        return self.feed_forward_norm(hidden + self.dropout(self.feed_forward(hidden)))


class BlossomRecPreTrainedModel(PreTrainedModel):
    config_class = BlossomRecConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["BlossomRecLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
            if getattr(module, "gate_bias_init", None) is not None:  # gate_init="published": the gate rows
                self._init_gate_rows(module, module.gate_bias_init)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.padding_idx is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[module.padding_idx])
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, BlockCompressor) and module.learned:
            for parameter in (module.positions, module.hidden_weight, module.output_weight):
                init.normal_(parameter, mean=0.0, std=std)
            init.zeros_(module.hidden_bias)
            init.zeros_(module.output_bias)
        elif isinstance(module, BlossomRecForSequentialRecommendation) and module.output_item_embeddings is not None:
            init.normal_(module.output_item_embeddings, mean=0.0, std=std)

    @staticmethod
    def _init_gate_rows(projection: nn.Linear, biases: list[float]) -> None:
        """Zero weights and the given biases in the last len(biases) rows of `projection` (the attention's gate
        logits), for the parts not loaded from a checkpoint (a slice does not carry its tensor's flag)."""
        rows = len(biases)
        if not getattr(projection.weight, "_is_hf_initialized", False):
            init.zeros_(projection.weight[-rows:])
        if not getattr(projection.bias, "_is_hf_initialized", False):
            init.copy_(projection.bias[-rows:],
                       torch.tensor(biases, dtype=projection.bias.dtype, device=projection.bias.device))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, strict, so that a checkpoint never loads into silently wrong scores:

        - weights come from safetensors only (`model.safetensors` or its shards); a folder or repo with only
          `pytorch_model.bin` (or other pickles) is an `OSError`, and `use_safetensors=False` a `ValueError`;
        - every weight the config describes must be in the checkpoint and every checkpoint weight must be used: a
          `config.json` that disagrees with the weights (`num_hidden_layers`, `position_embedding_type`, ...) is a
          `ValueError` naming the weights and the field (transformers only warns and leaves them random);
        - every weight must be finite: NaN or infinity is a `ValueError` naming the tensor.

        Everything else is as in transformers, `output_loading_info=True` included.
        """
        if kwargs.get("use_safetensors") is False:
            raise ValueError("use_safetensors=False: BlossomRec loads weights from safetensors only and never "
                             "unpickles a checkpoint")
        kwargs["use_safetensors"] = True
        output_loading_info = kwargs.pop("output_loading_info", False)
        source = pretrained_model_name_or_path
        refuse_pickled_source(source, kwargs.get("subfolder", ""))
        try:
            model, loading_info = super().from_pretrained(source, *model_args, output_loading_info=True, **kwargs)
        except OSError as error:  # a Hub repo (or cache) without safetensors weights
            if "does not appear to have a file named" in str(error) and ".safetensors" in str(error):
                raise OSError(no_safetensors_message(source, [])) from None
            raise
        check_loaded_keys(model, loading_info, source, backbone_only=cls is BlossomRecModel)
        check_finite(model, source)
        return (model, loading_info) if output_loading_info else model

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Attention backends: `blossom_torch` / `blossom_triton` for BlossomRec, `sdpa` / `eager` for dense.

        Without a request, the fastest one available: `blossom_triton` where triton and CUDA are present.
        """
        if self.config.attention_type == "dense":
            choices, default = tuple(DENSE_BACKENDS), "sdpa"
        else:
            choices = tuple(BLOSSOM_BACKENDS)
            default = "blossom_triton" if torch.cuda.is_available() and triton_unavailable_reason() is None \
                else "blossom_torch"
        chosen = requested_attention or default
        if chosen not in choices:
            raise ValueError(
                f"attn_implementation={requested_attention!r} is not available for attention_type="
                f"{self.config.attention_type!r}; choose one of {choices}"
            )
        if chosen == "blossom_triton":
            if (reason := triton_unavailable_reason()) is not None:
                raise ValueError(f"attn_implementation='blossom_triton' cannot be used: {reason}")
            config = self.config
            if (reason := shape_fallback_reason(SparseGeometry.from_config(config), head_dim=config.head_dim,
                                                heads=config.num_attention_heads,
                                                kv_heads=config.num_key_value_heads)) is not None:
                warnings.warn(f"blossom_triton falls back to the PyTorch path for this model: {reason}", stacklevel=2)
        return chosen


class BlossomRecModel(BlossomRecPreTrainedModel):
    """Item embeddings and the transformer layers: histories in, one hidden state per position out."""

    def __init__(self, config: BlossomRecConfig):
        super().__init__(config)
        self.item_embeddings = nn.Embedding(config.n_items + 1, config.hidden_size, padding_idx=0)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, config.hidden_size)
            if config.position_embedding_type == "absolute" else None
        )
        self.embedding_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.layers = nn.ModuleList([BlossomRecLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.item_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.item_embeddings = value

    def encode(self, input_ids, attention_mask=None, position_ids=None, cu_seq_lens_q=None, max_length_q=None
               ) -> tuple[HistoryLayout, list[torch.Tensor]]:
        """Check the histories and encode their tokens: the layout and the hidden states of every token
        ([embeddings, layer 1, ..., layer N], each [T, d])."""
        layout = HistoryLayout.from_inputs(input_ids, attention_mask, self.config.n_items, position_ids,
                                           cu_seq_lens_q, max_length_q)
        hidden = self.item_embeddings(layout.tokens(input_ids))
        rotary = None
        if self.position_embeddings is not None:
            hidden = hidden + self.position_embeddings(self._absolute_positions(layout))
        else:
            cos, sin = rotary_tables(max(layout.max_length, 1), self.config.head_dim, self.config.rope_theta,
                                     hidden.device, hidden.dtype)
            rotary = cos[layout.positions], sin[layout.positions]
        states = [self.dropout(self.embedding_norm(hidden))]
        for layer in self.layers:
            states.append(layer(states[-1], layout, rotary))
        return layout, states

    def _absolute_positions(self, layout: HistoryLayout) -> torch.Tensor:
        """Each token's row of the position table; a history longer than the table is an error (eager), a device
        assertion (compiling). Padding tokens of a static layout may lie past the table: they take its last row."""
        limit = self.config.max_position_embeddings
        if not torch.compiler.is_compiling():
            longest = layout.longest_history()
            if longest > limit:
                raise ValueError(
                    f"histories of length {longest} exceed max_position_embeddings={limit} of this absolute-position "
                    f"model; keep the most recent {limit} items")
        elif layout.is_static:
            torch._assert_async(((layout.positions < limit) | ~layout.items).all(),
                                "a history exceeds max_position_embeddings of this absolute-position model")
        return layout.positions.clamp(max=limit - 1) if layout.is_static else layout.positions

    def caller_hidden_states(self, layout: HistoryLayout, states, output_hidden_states):
        """Every layer's states in the caller's layout when asked for (argument, else config), else None."""
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return tuple(layout.to_caller(s) for s in states) if output_hidden_states else None

    def forward(self, input_ids, attention_mask=None, position_ids=None, output_hidden_states=None, return_dict=None,
                cu_seq_lens_q=None, max_length_q=None, cu_seq_lens_k=None, max_length_k=None):
        """Hidden states of padded input, or of packed input (`position_ids`, optionally with the flash-attention
        kwargs `cu_seq_lens_q` [S + 1] and `max_length_q`, as in `BlossomRecForSequentialRecommendation.forward`)."""
        boundaries = _packed_boundaries(cu_seq_lens_q, max_length_q, cu_seq_lens_k, max_length_k)
        layout, states = self.encode(input_ids, attention_mask, position_ids, *boundaries)
        output = BlossomRecModelOutput(
            last_hidden_state=layout.to_caller(states[-1]),
            hidden_states=self.caller_hidden_states(layout, states, output_hidden_states),
        )
        return output if return_dict is not False else output.to_tuple()


def _packed_boundaries(cu_seq_lens_q, max_length_q, cu_seq_lens_k, max_length_k) -> tuple:
    """The histories' boundaries and length bound of packed input, from Transformers' flash-attention kwargs: this is
    self-attention, so the key-side ones, if given, must be the query-side ones."""
    if cu_seq_lens_k is not None:
        same = cu_seq_lens_k is cu_seq_lens_q or (
            isinstance(cu_seq_lens_q, torch.Tensor) and isinstance(cu_seq_lens_k, torch.Tensor)
            and (torch.compiler.is_compiling() or (cu_seq_lens_k.shape == cu_seq_lens_q.shape
                                                   and torch.equal(cu_seq_lens_k.to(cu_seq_lens_q), cu_seq_lens_q))))
        if not same:
            raise ValueError("cu_seq_lens_k must equal cu_seq_lens_q: BlossomRec attends within each history")
    if max_length_k is not None and max_length_k != max_length_q:
        raise ValueError(f"max_length_k={max_length_k!r} must equal max_length_q={max_length_q!r}")
    return cu_seq_lens_q, max_length_q


def _count_argument(value, name: str, minimum: int, maximum: int | None = None) -> int:
    """An int argument such as `top_k`: a TypeError for bools, floats and other types, a ValueError out of range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in [{minimum}, n_items={maximum}]" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an int {bound}, got {value}")
    return value


class BlossomRecForSequentialRecommendation(BlossomRecPreTrainedModel):
    """BlossomRec with next-item scores `h_t . E[i]` over the whole item vocabulary, a loss, and `recommend`."""

    def __init__(self, config: BlossomRecConfig):
        super().__init__(config)
        self.model = BlossomRecModel(config)
        self.output_item_embeddings = (
            None if config.tie_word_embeddings
            else nn.Parameter(torch.zeros(config.n_items + 1, config.hidden_size))
        )
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.item_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.item_embeddings = value

    @property
    def item_score_weight(self) -> torch.Tensor:
        """[n_items + 1, d]: row i scores item i (the input embeddings when tied)."""
        if self.output_item_embeddings is not None:
            return self.output_item_embeddings
        return self.model.item_embeddings.weight

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores of every item id after each hidden state; the padding id gets the lowest finite value."""
        logits = hidden @ self.item_score_weight.T
        logits[..., 0] = torch.finfo(logits.dtype).min
        return logits

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int = 0,
        position_ids: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        max_length_q: int | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_k: int | None = None,
    ) -> SequentialRecommenderOutput | tuple:
        """Next-item scores and, with `labels`, the next-item loss.

        input_ids: [B, L] item ids, 0 = padding on either side. attention_mask: optional [B, L], 1 = item.
        position_ids: packed input ([B, T], several histories per row): each history's positions 0, 1, 2, ... from its
            first item, as `transformers.DataCollatorWithFlattening` makes them.
        labels: [B, L] aligned with input_ids (the model shifts them): the target of an item is the label of the next
            item of the same history (never across histories); 0 and -100 are ignored.
        logits_to_keep: 0 = scores at every position ([B, L, n_items + 1]); k > 0 = scores after each history's last
            k items ([histories, k, n_items + 1]; one history per row of padded input).
        cu_seq_lens_q, max_length_q: packed input's histories as Transformers' flash-attention kwargs (what
            `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` gives): boundaries [S + 1] over the flattened
            input, from 0 to its size, and an int >= the longest history. Histories may be empty or all padding (a
            batch filled to a fixed size); each holds its items first. With them no shape depends on the data, so
            `torch.compile` needs one graph for batches of one size. `cu_seq_lens_k` / `max_length_k` must equal them.
        """
        logits_to_keep = _count_argument(logits_to_keep, "logits_to_keep", minimum=0)
        boundaries = _packed_boundaries(cu_seq_lens_q, max_length_q, cu_seq_lens_k, max_length_k)
        if logits_to_keep > 0 and position_ids is not None and boundaries[0] is None \
                and torch.compiler.is_compiling():
            raise ValueError("compiled packed input with logits_to_keep needs cu_seq_lens_q and max_length_q: the "
                             "number of histories (rows of the output) must not depend on the data")
        layout, states = self.model.encode(input_ids, attention_mask, position_ids, *boundaries)
        last = states[-1]

        loss = None
        if labels is not None:
            loss = self.next_item_loss(last, layout, labels, input_ids.shape)

        logits = None
        if logits_to_keep > 0:
            logits = self.score(self.last_items_hidden(last, layout, logits_to_keep))
        elif labels is None:
            logits = self.score(layout.to_caller(last))

        output = SequentialRecommenderOutput(
            loss=loss,
            logits=logits,
            hidden_states=self.model.caller_hidden_states(layout, states, output_hidden_states),
        )
        return output if return_dict is not False else output.to_tuple()

    @staticmethod
    def last_items_hidden(hidden, layout: HistoryLayout, count: int) -> torch.Tensor:
        """[S, count, d]: hidden states after each history's last `count` items (zeros where a history is shorter)."""
        index, present = layout.last_tokens(count)
        if hidden.shape[0] == 0:
            return hidden.new_zeros(*index.shape, hidden.shape[-1])
        return hidden[index] * present[..., None]

    def next_item_loss(self, hidden, layout: HistoryLayout, labels, input_shape) -> torch.Tensor:
        """Cross-entropy of predicting, at every item, the label of the next item of its history (`config.loss_type`:
        full softmax over every item, or sampled softmax over shared negatives)."""
        check_ids_tensor(labels, "labels")
        if tuple(labels.shape) != tuple(input_shape):
            raise ValueError(f"labels have shape {tuple(labels.shape)} but input_ids have shape {tuple(input_shape)}")
        check_item_ids(labels, self.config.n_items, "labels", allowed_extra=(IGNORE_INDEX,))
        targets, predicts = layout.next_targets(labels)
        targets = targets.masked_fill(~predicts, IGNORE_INDEX)  # every token stays: no data-dependent shape
        if self.config.loss_type == "sampled":
            return sampled_softmax_loss(hidden, self.item_score_weight, targets, self.config.num_negatives,
                                        self.config.negative_sampling, self.config.logq_correction,
                                        ignore_index=IGNORE_INDEX)
        return linear_cross_entropy(hidden, self.item_score_weight, targets, ignore_index=IGNORE_INDEX)

    @torch.no_grad()
    def recommend(self, input_ids, attention_mask=None, top_k: int = 10, exclude_history: bool = False,
                  position_ids=None, cu_seq_lens_q=None, max_length_q=None):
        """The `top_k` best next items for each history (in eval mode), optionally leaving out items already seen:
        [B, top_k] for padded input, [histories, top_k] for packed input (`position_ids`, optionally with
        `cu_seq_lens_q` and `max_length_q` as in `forward`). Compiled (`torch.compile(model.recommend)`), it checks
        nothing that needs the data: empty histories and too few candidates then give -inf scores."""
        top_k = _count_argument(top_k, "top_k", minimum=1, maximum=self.config.n_items)
        was_training = self.training
        if was_training:  # (a model already in eval mode is left alone: nothing for a compiled call to trace)
            self.eval()
        try:
            layout, states = self.model.encode(input_ids, attention_mask, position_ids, cu_seq_lens_q, max_length_q)
        finally:
            if was_training:
                self.train()
        checking = not torch.compiler.is_compiling()
        if checking:
            empty = ((layout.lengths if layout.item_counts is None else layout.item_counts) == 0).nonzero()
            if len(empty):
                raise ValueError(f"cannot recommend for empty histories (rows {empty.flatten().tolist()} hold only "
                                 f"padding)")
        scores = self.score(self.last_items_hidden(states[-1], layout, 1))[:, 0].float()
        scores[:, 0] = float("-inf")
        if exclude_history:
            seen = layout.tokens(input_ids).long()
            if layout.is_static:  # padding tokens are in the layout: they exclude column 0 (already -inf) only
                seen = seen.where(layout.items, 0)
            scores[layout.history_of_token, seen] = float("-inf")
        best_scores, best_items = scores.topk(top_k, dim=-1)
        if checking:
            short = torch.isinf(best_scores).any(dim=-1).nonzero().flatten().tolist()
            if short:
                raise ValueError(f"rows {short} have fewer than top_k={top_k} items outside their history; lower "
                                 f"top_k")
        return RecommendationOutput(item_ids=best_items, scores=best_scores)


BlossomRecConfig.register_for_auto_class()
BlossomRecModel.register_for_auto_class("AutoModel")
BlossomRecForSequentialRecommendation.register_for_auto_class("AutoModel")
