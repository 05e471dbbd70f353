"""Configuration of the BlossomRec sequential recommender.

This file travels with every checkpoint as remote code: it imports only `transformers`.
"""

from transformers import PretrainedConfig

ATTENTION_TYPES = ("blossom", "dense")
LOSS_TYPES = ("full", "sampled")
NEGATIVE_SAMPLING = ("uniform", "in_batch", "mixed")
POSITION_EMBEDDING_TYPES = ("rope", "absolute")
BLOSSOM_BRANCHES = ("all", "ltis", "stis")
GATE_TYPES = ("learned", "fixed")
GATE_INITS = ("normal", "published")


class BlossomRecConfig(PretrainedConfig):
    """Hyper-parameters of a BlossomRec model (defaults: the published BlossomRec setting).

    Items are integer ids `1..n_items`; id 0 is padding. `attention_type="dense"` keeps the same backbone with full
    causal attention (SASRec with RoPE and grouped-query attention), for side-by-side comparisons.

    BlossomRec attention has three gated branches per head (see `../shared/SPEC.md`, section 2):
    - LTIS, long-term interest selection: keys are compressed per block of `compress_block_size` positions taken every
      `compress_stride` positions; each query picks the `num_selected_blocks` past blocks of `selection_block_size`
      positions that its kv-head group scores highest and attends to them plus its own block.
    - STIS, short-term interest selection: each query attends to the `stis_window` most recent positions and to the
      positions 1, 2, 4, 8, ... items back.
    - the compressed branch (`use_compressed_branch`): attention over the compressed block keys themselves; it is what
      trains the compression MLP. Without it, blocks are scored with parameter-free mean pooling.

    Ablations (the paper's table; the defaults are the full model):
    - `blossom_branches`: `all` (default); `ltis`, long-term only: the selected blocks with the query's own block, and
      the compressed branch when `use_compressed_branch` (it belongs to LTIS: it scores the blocks); `stis`, short-term
      only: no block selection, no compressed keys and no compressor (`use_compressed_branch` is then ignored).
    - `gate_type`: `learned` (default): `sigmoid(W_g x + b_g)` per head and branch, from the attention's input
      projection; `fixed`: every branch's weight is the constant 0.5 (= sigmoid(0)), with no gate parameters.
    - `gate_init` (learned gate): `normal` (default): gate weights N(0, initializer_range) and zero biases like every
      linear layer, so each gate starts near 0.5; `published`: what the published code's gate init says (and its
      global init overwrites): zero gate weights, bias -2 on the LTIS branches (selected and compressed) and +2 on
      STIS, i.e. short-term first (gates start at 0.12 and 0.88).
    These apply to BlossomRec attention only; `attention_type="dense"` ignores them.

    The training loss (`loss_type`): `full` is the exact softmax over every item at every position; `sampled` scores
    each target against `num_negatives` items drawn once per batch (`negative_sampling`: `uniform` over the
    catalogue, `in_batch` from the batch's targets, or `mixed`), with the log-Q correction of popularity-biased draws
    (`logq_correction`). See sampled_softmax.py. Ranking and `recommend` always score every item.
    """

    model_type = "blossomrec"

    def __init__(
        self,
        n_items: int = 1,
        hidden_size: int = 128,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 8,
        num_key_value_heads: int = 2,
        intermediate_size: int = 256,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.2,
        layer_norm_eps: float = 1e-12,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 50,
        position_embedding_type: str = "rope",
        rope_theta: float = 10000.0,
        attention_type: str = "blossom",
        compress_block_size: int = 32,
        compress_stride: int = 16,
        selection_block_size: int = 16,
        num_selected_blocks: int = 4,
        stis_window: int = 8,
        use_compressed_branch: bool = True,
        blossom_branches: str = "all",
        gate_type: str = "learned",
        gate_init: str = "normal",
        tie_word_embeddings: bool = True,
        loss_type: str = "full",
        num_negatives: int = 1024,
        negative_sampling: str = "uniform",
        logq_correction: bool = True,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.n_items = n_items
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.position_embedding_type = position_embedding_type
        self.rope_theta = rope_theta
        self.attention_type = attention_type
        self.compress_block_size = compress_block_size
        self.compress_stride = compress_stride
        self.selection_block_size = selection_block_size
        self.num_selected_blocks = num_selected_blocks
        self.stis_window = stis_window
        self.use_compressed_branch = use_compressed_branch
        self.blossom_branches = blossom_branches
        self.gate_type = gate_type
        self.gate_init = gate_init
        self.tie_word_embeddings = tie_word_embeddings
        self.loss_type = loss_type
        self.num_negatives = num_negatives
        self.negative_sampling = negative_sampling
        self.logq_correction = logq_correction
        self.pad_token_id = pad_token_id
        super().__init__(pad_token_id=pad_token_id, tie_word_embeddings=tie_word_embeddings, **kwargs)
        self._check_fields()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_branches(self) -> tuple[str, ...]:
        """The BlossomRec branches the attention computes and mixes, in the gate's order (a subset of `selected`,
        `stis`, `compressed`); empty for dense attention."""
        if self.attention_type != "blossom":
            return ()
        ltis = ("selected",) if self.blossom_branches in ("all", "ltis") else ()
        stis = ("stis",) if self.blossom_branches in ("all", "stis") else ()
        compressed = ("compressed",) if ltis and self.use_compressed_branch else ()
        return ltis + stis + compressed

    def _check_fields(self) -> None:
        """Reject impossible settings at construction, with the field name in the message."""

        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"BlossomRecConfig: {message}")

        def positive_int(name: str) -> None:
            value = getattr(self, name)
            require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                    f"`{name}` must be a positive integer, got {value!r}")

        for name in ("n_items", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "max_position_embeddings", "compress_block_size", "compress_stride",
                     "selection_block_size", "num_selected_blocks", "stis_window", "num_negatives"):
            positive_int(name)
        require(self.hidden_size % self.num_attention_heads == 0,
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})")
        require(self.num_attention_heads % self.num_key_value_heads == 0,
                f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of `num_key_value_heads` "
                f"({self.num_key_value_heads})")
        require(self.head_dim % 2 == 0 or self.position_embedding_type != "rope",
                f"RoPE needs an even head dimension, got hidden_size / num_attention_heads = {self.head_dim}")
        require(self.compress_stride <= self.compress_block_size,
                f"`compress_stride` ({self.compress_stride}) must not exceed `compress_block_size` "
                f"({self.compress_block_size}): blocks would leave gaps")
        require(self.attention_type in ATTENTION_TYPES,
                f"`attention_type` must be one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        require(self.blossom_branches in BLOSSOM_BRANCHES,
                f"`blossom_branches` must be one of {BLOSSOM_BRANCHES}, got {self.blossom_branches!r}")
        require(self.gate_type in GATE_TYPES, f"`gate_type` must be one of {GATE_TYPES}, got {self.gate_type!r}")
        require(self.gate_init in GATE_INITS, f"`gate_init` must be one of {GATE_INITS}, got {self.gate_init!r}")
        require(self.gate_type == "learned" or self.gate_init == "normal",
                f"`gate_init` {self.gate_init!r} needs gate_type='learned': a fixed gate has no parameters to "
                f"initialise")
        require(self.loss_type in LOSS_TYPES, f"`loss_type` must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        require(self.negative_sampling in NEGATIVE_SAMPLING,
                f"`negative_sampling` must be one of {NEGATIVE_SAMPLING}, got {self.negative_sampling!r}")
        require(isinstance(self.logq_correction, bool), f"`logq_correction` must be true or false, got "
                f"{self.logq_correction!r}")
        require(self.position_embedding_type in POSITION_EMBEDDING_TYPES,
                f"`position_embedding_type` must be one of {POSITION_EMBEDDING_TYPES}, "
                f"got {self.position_embedding_type!r}")
        require(isinstance(self.hidden_dropout_prob, (int, float)) and 0.0 <= self.hidden_dropout_prob < 1.0,
                f"`hidden_dropout_prob` must be in [0, 1), got {self.hidden_dropout_prob!r}")
        require(self.layer_norm_eps > 0, f"`layer_norm_eps` must be positive, got {self.layer_norm_eps!r}")
        require(self.initializer_range > 0, f"`initializer_range` must be positive, got {self.initializer_range!r}")
        require(self.pad_token_id == 0, f"`pad_token_id` must be 0 (item id 0 is padding), got {self.pad_token_id!r}")
        weights_file = getattr(self, "transformers_weights", None)  # a config.json may name the weights file
        require(weights_file is None or str(weights_file).endswith((".safetensors", ".safetensors.index.json")),
                f"`transformers_weights` must name a .safetensors file, got {weights_file!r}: BlossomRec loads "
                f"weights from safetensors only and never unpickles a checkpoint")
