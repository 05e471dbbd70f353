"""The paper's ablations as config fields (issue 14): `blossom_branches` (all / LTIS only / STIS only), `gate_type`
(learned / fixed 0.5) and `gate_init` (normal / published), with `use_compressed_branch` as before.

Each ablation is checked against the PyTorch reference functions: the attention module's output equals the branches
of `blossom_attention_torch_varlen` (every branch computed), mixed by hand. The defaults leave the model bitwise
unchanged; blossom_triton (Triton's interpreter here) agrees with blossom_torch; the fields survive save/load; the
ablation runs of scripts/benchmark_quality.py give train.py the intended config.
"""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.model.blossom_attention_torch import blossom_attention_torch_varlen
from blossomrec_hf.model.rotary_embedding import rotate_queries_and_keys
from blossomrec_hf.training_args import build_model_config, parse_training_arguments
from conftest import script_module
from test_model import N_ITEMS, tiny_config
from triton_support import requires_triton

NEW_FIELDS = ("blossom_branches", "gate_type", "gate_init")
ABLATIONS = {
    "ltis": dict(blossom_branches="ltis"),
    "ltis-nocomp": dict(blossom_branches="ltis", use_compressed_branch=False),
    "stis": dict(blossom_branches="stis"),
    "fixed": dict(gate_type="fixed"),
    "fixed-nocomp": dict(gate_type="fixed", use_compressed_branch=False),
    "published": dict(gate_init="published"),
}


def tiny_model(seed=0, **overrides):
    """test_model's tiny model, left in training mode."""
    torch.manual_seed(seed)
    return BlossomRecForSequentialRecommendation(tiny_config(**overrides))


def histories(length=30, rows=3, seed=1):
    ids = torch.randint(1, N_ITEMS + 1, (rows, length), generator=torch.Generator().manual_seed(seed))
    ids[0, :length // 3] = 0  # a shorter history, left-padded
    return ids


def perturb(model, seed=3):
    """Move every parameter off its initial value, so that loading cannot pass for re-initialising."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))


# ----------------------------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------------------------
def test_defaults_are_the_full_model():
    config = BlossomRecConfig(n_items=10)
    assert (config.blossom_branches, config.gate_type, config.gate_init) == ("all", "learned", "normal")
    assert config.attention_branches == ("selected", "stis", "compressed")
    assert BlossomRecConfig(n_items=10, use_compressed_branch=False).attention_branches == ("selected", "stis")
    assert BlossomRecConfig(n_items=10, blossom_branches="ltis").attention_branches == ("selected", "compressed")
    assert BlossomRecConfig(n_items=10, blossom_branches="stis").attention_branches == ("stis",)
    assert BlossomRecConfig(n_items=10, attention_type="dense").attention_branches == ()


@pytest.mark.parametrize("fields, field", [
    ({"blossom_branches": "both"}, "blossom_branches"),
    ({"blossom_branches": None}, "blossom_branches"),
    ({"gate_type": "none"}, "gate_type"),
    ({"gate_init": "zero"}, "gate_init"),
    ({"gate_type": "fixed", "gate_init": "published"}, "gate_init"),
])
def test_bad_ablation_fields_are_one_line_errors_naming_the_field(fields, field):
    with pytest.raises(ValueError, match=f"`{field}`") as error:
        BlossomRecConfig(n_items=10, **fields)
    assert "\n" not in str(error.value)


def test_the_fields_are_train_py_flags():
    *_, overrides = parse_training_arguments(["--blossom_branches", "stis", "--gate_type", "fixed"])
    assert overrides == {"blossom_branches": "stis", "gate_type": "fixed"}
    *_, overrides = parse_training_arguments(["--gate_init", "published"])
    assert overrides == {"gate_init": "published"}


# ----------------------------------------------------------------------------------------------------------------
# defaults unchanged
# ----------------------------------------------------------------------------------------------------------------
def step(model, ids, call=None):
    """Loss and every parameter's gradient of one training step of `model`, through `call` (compiled) if given."""
    model.zero_grad()
    loss = (model if call is None else call)(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_the_defaults_are_bitwise_the_model_without_the_fields():
    """Explicit defaults build the same parameters (same random draws) and give the same loss and gradients, bit for
    bit; a checkpoint whose config.json predates the fields loads as the default model."""
    ids = histories()
    plain = tiny_model(hidden_dropout_prob=0.1)
    explicit = tiny_model(hidden_dropout_prob=0.1, blossom_branches="all", gate_type="learned", gate_init="normal")
    assert plain.state_dict().keys() == explicit.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), explicit.state_dict().values()))
    torch.manual_seed(5)
    loss, grads = step(plain.train(), ids)
    torch.manual_seed(5)
    loss_explicit, grads_explicit = step(explicit.train(), ids)
    assert torch.equal(loss, loss_explicit)
    assert all(torch.equal(grads[name], grads_explicit[name]) for name in grads)


def test_a_checkpoint_without_the_fields_loads_as_the_default_model(tmp_path):
    model = tiny_model().eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert all(config[name] == BlossomRecConfig(n_items=1).to_dict()[name] for name in NEW_FIELDS)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in NEW_FIELDS}))
    loaded = BlossomRecForSequentialRecommendation.from_pretrained(tmp_path).eval()
    assert (loaded.config.blossom_branches, loaded.config.gate_type, loaded.config.gate_init) == \
        ("all", "learned", "normal")
    with torch.no_grad():
        assert torch.equal(loaded(histories()).logits, model(histories()).logits)


# ----------------------------------------------------------------------------------------------------------------
# each ablation against the reference functions
# ----------------------------------------------------------------------------------------------------------------
def capture_attention_inputs(model, ids):
    """The first layer's attention module, its inputs (hidden [T, d], layout, rotary) and its output."""
    attention = model.model.layers[0].attention
    captured = {}
    handle = attention.register_forward_hook(lambda module, args, output: captured.update(args=args, out=output))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return attention, captured["args"], captured["out"]


def reference_branches(attention, hidden, layout, rotary):
    """Every branch of the PyTorch reference (selected, STIS, compressed: [T, H, D] each, compressed None without a
    learned compressor) from the module's own projections, and the gate logits [T, H, n] (None for a fixed gate)."""
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    tokens = hidden.shape[0]
    query_key, v, *gate_logits = attention.input_proj(hidden).split(attention.split_sizes, dim=-1)
    q, k = rotate_queries_and_keys(query_key.view(1, tokens, heads + kv_heads, dim), *rotary, heads)
    q, k, v = q[0], k[0], v.view(tokens, kv_heads, dim)
    geometry = attention.geometry
    blocks = layout.compressed_blocks(geometry.compress_block_size, geometry.compress_stride)
    if attention.compressor is not None:
        ck, cv = attention.compressor(k, v, blocks)
    else:  # STIS only: no compressor; any compressed keys do (STIS never reads them)
        ck, cv = blocks.gather(k).mean(dim=1), None
    outputs = blossom_attention_torch_varlen(q, k, v, ck, cv, cu_seqlens=layout.cu_seqlens,
                                             cu_compressed=blocks.cu_seqlens, max_length=layout.max_length,
                                             geometry=geometry)
    gates = gate_logits[0].view(tokens, heads, -1) if attention.learned_gate else None
    return dict(zip(("selected", "stis", "compressed"), outputs)), gates


def mixed(attention, branches, weights):
    """o_proj(sum_i weights[..., i] * branch_i): the attention output of branch outputs [T, H, D], weights [T, H, n]."""
    out = sum(weights[..., i, None] * branch for i, branch in enumerate(branches))
    return attention.o_proj(out.flatten(1))


@pytest.mark.parametrize("name, fields, used", [
    ("all", {}, ("selected", "stis", "compressed")),
    ("no-compressed-branch", dict(use_compressed_branch=False), ("selected", "stis")),
    ("ltis", dict(blossom_branches="ltis"), ("selected", "compressed")),
    ("ltis-nocomp", dict(blossom_branches="ltis", use_compressed_branch=False), ("selected",)),
    ("stis", dict(blossom_branches="stis"), ("stis",)),
])
def test_learned_gate_mixes_exactly_the_branches_of_the_ablation(name, fields, used):
    model = tiny_model(**fields).eval()
    perturb(model)  # gates well away from 0.5
    attention, (hidden, layout, rotary), out = capture_attention_inputs(model, histories())
    assert attention.branches == used
    with torch.no_grad():
        branches, gates = reference_branches(attention, hidden, layout, rotary)
        assert gates.shape[-1] == len(used)
        expected = mixed(attention, [branches[b] for b in used], torch.sigmoid(gates))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    if name == "stis":  # STIS alone: nothing of LTIS is built
        assert attention.compressor is None
        assert not any("compressor" in key for key in model.state_dict())


@pytest.mark.parametrize("fields", [{}, dict(use_compressed_branch=False), dict(blossom_branches="ltis"),
                                    dict(blossom_branches="stis")], ids=["all", "nocomp", "ltis", "stis"])
def test_fixed_gate_is_half_the_sum_of_the_branches(fields):
    model = tiny_model(gate_type="fixed", **fields).eval()
    perturb(model)
    attention, (hidden, layout, rotary), out = capture_attention_inputs(model, histories())
    assert len(attention.split_sizes) == 2  # no gate parameters
    with torch.no_grad():
        branches, gates = reference_branches(attention, hidden, layout, rotary)
        assert gates is None
        total = sum(branches[b] for b in attention.branches)
        expected = attention.o_proj((0.5 * total).flatten(1))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_fixed_gate_model_has_fewer_projection_rows_and_no_dead_parameters():
    learned, fixed = tiny_model(), tiny_model(gate_type="fixed")
    heads = learned.config.num_attention_heads
    for a, b in zip(learned.model.layers, fixed.model.layers):
        assert a.attention.input_proj.out_features - b.attention.input_proj.out_features == 3 * heads


@pytest.mark.parametrize("fields", [{}, dict(blossom_branches="ltis"), dict(blossom_branches="stis")],
                         ids=["all", "ltis", "stis"])
def test_published_gate_init_is_short_term_first(fields):
    """Zero gate weights, bias -2 on LTIS branches and +2 on STIS; every other parameter as the default init draws
    it (same random numbers), so the two inits differ in the gate rows only."""
    model, default = tiny_model(gate_init="published", **fields).eval(), tiny_model(**fields).eval()
    bias = {"selected": -2.0, "compressed": -2.0, "stis": 2.0}
    for layer, default_layer in zip(model.model.layers, default.model.layers):
        attention = layer.attention
        rows = attention.split_sizes[2]
        projection, default_projection = attention.input_proj, default_layer.attention.input_proj
        assert torch.equal(projection.weight[-rows:], torch.zeros_like(projection.weight[-rows:]))
        want = torch.tensor([bias[name] for name in attention.branches] * attention.num_heads)
        assert torch.equal(projection.bias[-rows:], want)
        assert torch.equal(projection.weight[:-rows], default_projection.weight[:-rows])
        assert torch.equal(projection.bias[:-rows], default_projection.bias[:-rows])
    others = [name for name in model.state_dict() if "input_proj" not in name]
    assert all(torch.equal(model.state_dict()[name], default.state_dict()[name]) for name in others)

    # at init every gate is the constant sigmoid(bias)
    attention, (hidden, layout, rotary), out = capture_attention_inputs(model, histories())
    with torch.no_grad():
        branches, gates = reference_branches(attention, hidden, layout, rotary)
        weights = torch.sigmoid(torch.tensor([bias[name] for name in attention.branches]))
        expected = mixed(attention, [branches[b] for b in attention.branches], weights.expand(*gates.shape))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_parameter_of_an_ablation_receives_a_gradient(name):
    model = tiny_model(**ABLATIONS[name]).train()
    _, grads = step(model, histories(length=40))
    dead = [key for key, grad in grads.items() if not grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


# ----------------------------------------------------------------------------------------------------------------
# backends, compile, save/load
# ----------------------------------------------------------------------------------------------------------------
def kernel_model(implementation, seed=0, **fields):
    """A model the Triton kernels take (selection block 16 = compress stride, head dim 16)."""
    config = BlossomRecConfig(n_items=N_ITEMS, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=32, hidden_dropout_prob=0.0,
                              compress_block_size=16, compress_stride=16, selection_block_size=16,
                              num_selected_blocks=1, stis_window=3, attn_implementation=implementation, **fields)
    torch.manual_seed(seed)
    return BlossomRecForSequentialRecommendation(config)


@requires_triton
@pytest.mark.filterwarnings("error:blossom_triton falls back")  # the kernels must run, not the reference
@pytest.mark.parametrize("name", ["ltis", "ltis-nocomp", "stis", "fixed", "published"])
def test_triton_backend_agrees_with_the_torch_backend(name):
    ids = histories(length=40)  # three selection blocks: blocks get selected
    torch_model, triton_model = (kernel_model(impl, **ABLATIONS[name]) for impl in ("blossom_torch", "blossom_triton"))
    perturb(torch_model)
    triton_model.load_state_dict(torch_model.state_dict())
    want, got = step(torch_model, ids), step(triton_model, ids)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    for key in want[1]:
        torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-4, atol=1e-6, msg=key)


def assert_compiled_step_equals_eager(model, ids, atol):
    """torch.compile(fullgraph=True, aot_eager) of a training step: one graph, the eager loss and gradients."""
    torch._dynamo.reset()
    counters.clear()
    try:
        want = step(model, ids)
        got = step(model, ids, torch.compile(model, fullgraph=True, backend="aot_eager"))
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=atol)
        for key in want[1]:
            torch.testing.assert_close(got[1][key], want[1][key], rtol=1e-5, atol=atol, msg=key)
        assert counters["stats"]["unique_graphs"] == 1
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("name", ["ltis", "stis", "fixed"])
def test_ablations_compile_fullgraph_and_equal_eager(name):
    assert_compiled_step_equals_eager(tiny_model(**ABLATIONS[name]).train(), histories(), atol=1e-5)


@requires_triton
@pytest.mark.parametrize("name", ["stis", "fixed"])
def test_triton_ablations_compile_fullgraph(name):
    """STIS alone hands the kernels no compressed keys and all-zero compressed bounds; the fixed gate's constant
    logits go through the fused gated sum: both trace into one graph equal to eager."""
    assert_compiled_step_equals_eager(kernel_model("blossom_triton", **ABLATIONS[name]), histories(length=40),
                                      atol=1e-6)


@pytest.mark.parametrize("fields", [dict(blossom_branches="ltis", gate_type="fixed"),
                                    dict(blossom_branches="stis", gate_init="published"),
                                    dict(gate_init="published", use_compressed_branch=False)],
                         ids=["ltis-fixed", "stis-published", "published-nocomp"])
def test_save_and_load_round_trip_the_fields(tmp_path, fields):
    model = tiny_model(**fields).eval()
    perturb(model)  # a loaded gate must keep its trained values, not get the published init again
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert all(saved[key] == value for key, value in fields.items())
    loaded = BlossomRecForSequentialRecommendation.from_pretrained(tmp_path).eval()
    assert all(getattr(loaded.config, key) == value for key, value in fields.items())
    assert loaded.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(histories()).logits, model(histories()).logits)


def test_remote_code_loads_an_ablation(tmp_path):
    from transformers import AutoModel

    model = tiny_model(blossom_branches="stis", gate_type="fixed").eval()
    perturb(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert type(loaded).__module__ != type(model).__module__  # the checkpoint's copy of the code
    assert (loaded.config.blossom_branches, loaded.config.gate_type) == ("stis", "fixed")
    with torch.no_grad():
        assert torch.equal(loaded(histories()).logits, model(histories()).logits)


def test_a_gate_config_that_does_not_match_the_weights_is_refused(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "gate_type": "fixed"}))
    # transformers refuses the mismatched projection shape (its load report names input_proj)
    with pytest.raises((ValueError, RuntimeError), match="mismatched"):
        BlossomRecForSequentialRecommendation.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# scripts/benchmark_quality.py: the ablation table
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quality_benchmark():
    yield from script_module("scripts/benchmark_quality.py", "benchmark_quality_ablations")


def test_the_ablation_table_plans_every_variant_on_both_logs(quality_benchmark, tmp_path):
    args = quality_benchmark.parse_args(["--table", "ablation", "--seeds", "0", "1", "2",
                                         "--output_root", str(tmp_path)])
    jobs = quality_benchmark.plan(args)
    names = [f"{d}-{v}" for d in ("beauty", "ml100k") for v in ("blossom", "ltis", "stis", "nogate", "nocomp",
                                                               "dense")]
    assert args.runs == names and len(jobs) == 36
    assert quality_benchmark.parse_args([]).runs == quality_benchmark.DEFAULT_RUNS  # the default table as before
    expected = {"blossom": {}, "ltis": dict(blossom_branches="ltis"), "stis": dict(blossom_branches="stis"),
                "nogate": dict(gate_type="fixed"), "nocomp": dict(use_compressed_branch=False), "dense": {}}
    for name in names:  # train.py's own parser and config builder take each run's flags
        flags = [flag.format(data=tmp_path) for flag in quality_benchmark.RUNS[name]]
        _, _, training_args, overrides = parse_training_arguments(flags)
        config = build_model_config(training_args, overrides, n_items=10)
        variant = name.split("-", 1)[1]
        assert config.attention_type == ("dense" if variant == "dense" else "blossom")
        defaults = BlossomRecConfig(n_items=10)
        for field in (*NEW_FIELDS, "use_compressed_branch"):
            assert getattr(config, field) == expected[variant].get(field, getattr(defaults, field)), (name, field)


def test_the_ablation_block_reports_quality_time_and_memory(quality_benchmark):
    def stats(name, ndcg, memory):
        described = {c: quality_benchmark.describe([ndcg, ndcg + 0.01]) for c in quality_benchmark.COLUMNS}
        return {"name": name, "layout": "packed", "n": 2, "test": described,
                **{key: quality_benchmark.describe([10.0, 12.0]) for key, _, _ in quality_benchmark.TRAINING
                   if key not in ("peak_gpu_memory_mib",)},
                "peak_gpu_memory_mib": quality_benchmark.describe(memory)}
    summary = {"beauty-stis": stats("beauty-stis", 0.05, [None, None]),
               "beauty-blossom": stats("beauty-blossom", 0.06, [900.0, 1000.0]),
               "beauty-blossom-sampled128": stats("beauty-blossom-sampled128", 0.04, [1.0, 1.0])}
    rows = quality_benchmark.ablation_rows(summary)
    assert [row[0] for row in rows] == ["beauty-blossom", "beauty-stis"]  # the paper's order; not the loss runs
    assert rows[0][1:6] == ["BlossomRec", "2", "0.0650 +- 0.0071", "0.0650 +- 0.0071", "11"]
    assert rows[0][6] == "950" and rows[1][6] == "n/a"
    assert quality_benchmark.describe([None]) == {"mean": None, "std": None, "se": None}
