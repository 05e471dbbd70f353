"""torch.compile(fullgraph=True) of the training step, evaluation and recommend: equal to eager, one graph per shape.

Backends: most tests compile with "aot_eager". It runs what this package's code decides: Dynamo's full-graph capture
(any host sync -- `.item()`, `bool(tensor)`, `nonzero`, a data-dependent shape -- fails it) and AOTAutograd's joint
forward and backward graph, in 1-4 s per graph here. Inductor, the default of `--torch_compile`, works on this CPU too
(same losses and gradients) but needs 20-35 s per training graph on a 2-core machine, so it compiles once, in
`test_static_batches_of_every_size_run_one_inductor_graph`; the `train.py --torch_compile` test uses aot_eager.
Dropout is 0 throughout: compiled and eager dropout draw different random numbers.
"""

import re

import pytest
import torch
from datasets import Dataset
from torch._dynamo.utils import counters

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.batching import PackedTrainingCollator, TrainingCollator, training_dataloader
from triton_support import requires_triton

N_ITEMS = 60
# windows as a data loader gives them: several lengths, one longer than a selection block several times over
WINDOWS = [[5, 9, 1, 33, 2], [7] * 3 + list(range(1, 12)), [4, 8], list(range(20, 29)), [60, 1, 60]]
MAX_SEQ_LENGTH = 13  # windows of up to 14 items

MODELS = {  # SASRec's absolute positions for dense attention, RoPE for BlossomRec: both position paths compile
    "dense-sdpa": dict(attention_type="dense", attn_implementation="sdpa", position_embedding_type="absolute",
                       max_position_embeddings=MAX_SEQ_LENGTH + 1),
    "blossom-torch": dict(attention_type="blossom", attn_implementation="blossom_torch"),
}


def make_model(name, seed=0, layers=2):
    config = BlossomRecConfig(n_items=N_ITEMS, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                              num_key_value_heads=2, intermediate_size=32, hidden_dropout_prob=0.0,
                              compress_block_size=4, compress_stride=2, selection_block_size=4, num_selected_blocks=2,
                              stis_window=2, initializer_range=0.1, **MODELS[name])
    torch.manual_seed(seed)
    return BlossomRecForSequentialRecommendation(config)


def batch_of(layout, windows=WINDOWS):
    rows = [{"input_ids": window} for window in windows]
    if layout == "padded":  # left padding, plus a gap inside a row: the model drops padding wherever it is
        batch = TrainingCollator(MAX_SEQ_LENGTH)(rows)
        batch["input_ids"][1, 6] = batch["labels"][1, 6] = 0
    elif layout == "packed":  # DataCollatorWithFlattening's convention: position_ids only
        batch = PackedTrainingCollator(MAX_SEQ_LENGTH)(rows)
    else:  # static: filled to a fixed size, with the flash-attention kwargs
        batch = PackedTrainingCollator(MAX_SEQ_LENGTH, static_shape=(64, 9))(rows)
    return {name: value for name, value in batch.items() if name != "num_targets"}


def step(model, batch, call=None):
    """Loss and every parameter's gradient of one forward and backward of `model`, through `call` (compiled) if given."""
    model.zero_grad()
    loss = (model if call is None else call)(**batch).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_step(got, want):
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("layout", ["padded", "packed", "static"])
@pytest.mark.parametrize("name", list(MODELS))
def test_compiled_training_step_and_scores_equal_eager(name, layout):
    model = make_model(name)
    batch = batch_of(layout)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_step(step(model, batch, compiled), step(model, batch))
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    with torch.no_grad():
        if layout != "static":  # scores at every position, in the caller's layout (zeros' scores at padding)
            torch.testing.assert_close(compiled(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
        if layout != "packed":  # per-history rows need their number known without the data
            last = compiled(**inputs, logits_to_keep=2).logits
            torch.testing.assert_close(last, model(**inputs, logits_to_keep=2).logits, rtol=1e-5, atol=1e-5)
            assert last.shape[0] == (9 if layout == "static" else len(WINDOWS))
    assert counters["stats"]["unique_graphs"] == 1 + (layout != "static") + (layout != "packed")


@pytest.mark.parametrize("layout", ["padded", "packed", "static"])
def test_no_binary_search_runs_over_a_slice(layout):
    """Inductor on CUDA failed to lower torch.searchsorted over a slice of a tensor computed in the graph (torch 2.11,
    "NotImplementedError: SliceView", first in the evaluation forward of `train.py` on an H100): the model's graphs,
    training step and scores, search whole tensors only."""
    import operator

    searched = []

    def record(graph_module, example_inputs):
        for node in graph_module.graph.nodes:
            if node.op == "call_function" and node.target is torch.searchsorted:
                source = node.args[0]
                searched.append(source.op == "call_function" and source.target is operator.getitem
                                and isinstance(source.args[1], slice))
        return graph_module.forward

    model = make_model("blossom-torch")
    batch = batch_of(layout)
    compiled = torch.compile(model, fullgraph=True, backend=record)
    compiled(**batch).loss.backward()
    if layout != "packed":
        with torch.no_grad():
            compiled(**{key: value for key, value in batch.items() if key != "labels"}, logits_to_keep=1)
    assert searched and not any(searched)


@pytest.mark.parametrize("name", list(MODELS))
def test_a_static_batch_is_the_packed_batch(name):
    """Filled to a fixed size (padding histories, an empty history, cu_seq_lens_q), the batch gives the packed batch's
    loss, gradients and per-history scores (its own histories first), in eager mode too."""
    model = make_model(name)
    static, packed = batch_of("static"), batch_of("packed")
    assert_same_step(step(model, static), step(model, packed))
    with torch.no_grad():
        scores = model(**{key: value for key, value in static.items() if key != "labels"}, logits_to_keep=1).logits
        expected = model(packed["input_ids"], position_ids=packed["position_ids"], logits_to_keep=1).logits
    torch.testing.assert_close(scores[:len(WINDOWS)], expected, rtol=1e-5, atol=1e-5)


@requires_triton
@pytest.mark.parametrize("layout", ["packed", "static"])
def test_the_triton_attention_compiles_into_the_step(layout):
    """blossom_triton (here through Triton's interpreter): its custom operators take the layout's cu_seqlens and a
    host int max_length, so the compiled step is one graph equal to eager; static batches also hand it compressed
    rows past cu_compressed[-1] (a host-side bound), which must get no gradient."""
    config = BlossomRecConfig(n_items=N_ITEMS, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=32, hidden_dropout_prob=0.0,
                              compress_block_size=16, compress_stride=16, selection_block_size=16,
                              num_selected_blocks=2, stis_window=2, attn_implementation="blossom_triton")
    torch.manual_seed(0)
    model = BlossomRecForSequentialRecommendation(config)
    windows = [[(3 * window + item) % N_ITEMS + 1 for item in range(length)]
               for window, length in enumerate([5, 40, 2, 38])]
    rows = [{"input_ids": window} for window in windows]
    batch = PackedTrainingCollator(39, static_shape=(100, 6) if layout == "static" else None)(rows)
    batch.pop("num_targets")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_step(step(model, batch, compiled), step(model, batch))
    assert counters["stats"]["unique_graphs"] == 1
    if layout == "static":  # the same as the packed batch: the spare compressed rows change nothing
        packed = PackedTrainingCollator(39)(rows)
        packed.pop("num_targets")
        assert_same_step(step(model, batch), step(model, packed))


def test_compiled_recommend_equals_eager():
    model = make_model("blossom-torch").eval()
    batch = batch_of("padded")
    compiled = torch.compile(model.recommend, fullgraph=True, backend="aot_eager")
    got = compiled(batch["input_ids"], top_k=5, exclude_history=True)
    want = model.recommend(batch["input_ids"], top_k=5, exclude_history=True)
    assert torch.equal(got.item_ids, want.item_ids)
    torch.testing.assert_close(got.scores, want.scores)


def test_static_batches_of_every_size_run_one_inductor_graph():
    """A loader of static shapes (packed, filled to the token budget) gives batches of 1 to 5 windows of 2 to 14
    items; inductor compiles the training step once, and every batch's loss and gradients are eager's."""
    lengths = [5, 14, 2, 9, 3, 4, 14, 2, 8, 3, 5, 11, 2, 14, 7]
    windows = Dataset.from_dict({"input_ids": [[(7 * window + item) % N_ITEMS + 1 for item in range(length)]
                                               for window, length in enumerate(lengths)]})
    loader = training_dataloader(windows, MAX_SEQ_LENGTH, batch_size=4, seed=0, max_tokens_per_batch=30,
                                 static_shapes=True)
    batches = [{key: value for key, value in batch.items() if key != "num_targets"} for batch in loader]
    assert len({len(batch["labels"][batch["labels"] > 0]) for batch in batches}) > 3  # batches of several sizes
    model = make_model("blossom-torch", layers=1)  # one layer: half inductor's compile time
    compiled = torch.compile(model, fullgraph=True)  # inductor
    for batch in batches:
        assert_same_step(step(model, batch, compiled), step(model, batch))
    assert counters["stats"]["unique_graphs"] == 1


def test_padded_static_batches_compile_once():
    """Padded batches of a static-shape loader: every batch [batch_size, max_seq_length + 1], the last one filled
    with all-padding rows; one graph for all."""
    windows = Dataset.from_dict({"input_ids": WINDOWS + [[3, 4, 5]]})
    loader = training_dataloader(windows, MAX_SEQ_LENGTH, batch_size=4, seed=0, max_tokens_per_batch=0,
                                 static_shapes=True)
    batches = [{key: value for key, value in batch.items() if key != "num_targets"} for batch in loader]
    assert [tuple(batch["input_ids"].shape) for batch in batches] == [(4, MAX_SEQ_LENGTH + 1)] * 2
    model = make_model("dense-sdpa")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in batches:
        assert_same_step(step(model, batch, compiled), step(model, batch))
    assert counters["stats"]["unique_graphs"] == 1


def test_flash_attention_kwargs_are_checked_in_eager():
    model = make_model("blossom-torch")
    batch = batch_of("static")
    ids, positions, boundaries = batch["input_ids"], batch["position_ids"], batch["cu_seq_lens_q"]

    def run(**changes):
        return model(**{"input_ids": ids, "position_ids": positions, "cu_seq_lens_q": boundaries,
                        "max_length_q": MAX_SEQ_LENGTH + 1, **changes})

    with pytest.raises(ValueError, match="max_length_q=3 but a history of cu_seq_lens_q has 14 tokens"):
        run(max_length_q=3)
    with pytest.raises(ValueError, match="max_length_q must be a positive int"):
        run(max_length_q=torch.tensor(14))
    with pytest.raises(ValueError, match="rise from 0 to the number of tokens"):
        run(cu_seq_lens_q=boundaries[:-2])
    with pytest.raises(ValueError, match="position_ids at token 1 is 5"):
        run(position_ids=positions.index_fill(1, torch.tensor([1]), 5))
    gap = ids.clone()
    gap[0, 3] = 0
    with pytest.raises(ValueError, match="the item at token 4 follows padding inside its history"):
        run(input_ids=gap)
    with pytest.raises(ValueError, match="cu_seq_lens_k must equal cu_seq_lens_q"):
        run(cu_seq_lens_k=boundaries.flip(0))
    with pytest.raises(ValueError, match="max_length_q is given without cu_seq_lens_q"):
        run(cu_seq_lens_q=None)
    same = run(cu_seq_lens_k=boundaries.clone(), max_length_k=MAX_SEQ_LENGTH + 1).logits
    torch.testing.assert_close(same, run().logits)


def test_compile_flags_follow_transformers():
    from blossomrec_hf.training_args import parse_training_arguments

    assert not parse_training_arguments([])[2].torch_compile
    args = parse_training_arguments(["--torch_compile_mode", "reduce-overhead"])[2]
    assert args.torch_compile and args.torch_compile_backend is None
    assert parse_training_arguments(["--torch_compile_backend", "aot_eager"])[2].torch_compile
    with pytest.raises(SystemExit) as stop:
        parse_training_arguments(["--torch_compile_mode", "fastest"])
    assert stop.value.code == 2
    with pytest.raises(SystemExit) as stop:
        parse_training_arguments(["--torch_compile", "false", "--torch_compile_mode", "reduce-overhead"])
    assert stop.value.code == 2


@pytest.mark.parametrize("device, processes, flags, expected", [
    ("cuda", 1, [], (True, None, True)),
    ("cuda", 1, ["--cuda_graph_step"], (True, None, True)),
    ("cuda", 1, ["--cuda_graph_step", "false"], (True, "reduce-overhead", False)),
    ("cuda", 1, ["--torch_compile_mode", "max-autotune"], (True, "max-autotune", False)),
    ("cuda", 1, ["--torch_compile_mode", "reduce-overhead"], (True, "reduce-overhead", False)),
    ("cuda", 1, ["--torch_compile_mode", "default"], (True, "default", True)),
    ("cuda", 1, ["--torch_compile_mode", "default", "--cuda_graph_step", "false"], (True, "default", False)),
    ("cuda", 1, ["--torch_compile"], (True, None, True)),
    ("cuda", 1, ["--torch_compile", "false"], (False, None, False)),
    ("cuda", 2, [], (False, None, False)),
    ("cuda", 2, ["--torch_compile"], (True, None, False)),
    ("cuda", 1, ["--gradient_accumulation_steps", "2"], (True, None, True)),
    ("cuda", 1, ["--gradient_accumulation_steps", "2", "--cuda_graph_step", "false"], (True, None, False)),
    ("cuda", 1, ["--torch_compile_backend", "aot_eager"], (True, None, False)),
    ("cuda", 1, ["--torch_compile_backend", "cudagraphs"], (True, None, False)),
    ("cpu", 1, [], (False, None, False)),
    ("cpu", 1, ["--torch_compile"], (True, None, False)),
])
def test_compilation_defaults_to_cuda_graphs_on_one_cuda_gpu(device, processes, flags, expected):
    """Unset, --torch_compile is on where one process trains on a CUDA GPU, and off elsewhere; a compiled step there
    is captured whole in one CUDA graph (the model compiled in torch's default mode, or the mode named), unless
    --cuda_graph_step false, a mode or backend with CUDA graphs of its own, or another backend than inductor asks
    otherwise (without a step graph, mode reduce-overhead replays the forward and backward graphs); what the user set
    is kept."""
    from types import SimpleNamespace

    from blossomrec_hf.training.trainer import default_compilation
    from blossomrec_hf.training_args import parse_training_arguments

    args = parse_training_arguments(flags)[2]
    decided = default_compilation(args, SimpleNamespace(device=torch.device(device), num_processes=processes))
    assert (decided.torch_compile, decided.torch_compile_mode, decided.cuda_graph_step) == expected


@pytest.mark.parametrize("device, processes, precision, flags, missing", [
    ("cpu", 1, "no", ["--torch_compile"], "one process on a CUDA GPU"),
    ("cuda", 2, "no", ["--torch_compile"], "one process on a CUDA GPU"),
    ("cuda", 1, "no", ["--torch_compile", "false"], "--torch_compile (the eager model"),
    ("cuda", 1, "no", ["--torch_compile_mode", "reduce-overhead"], "not reduce-overhead"),
    ("cuda", 1, "fp16", [], "not fp16"),
    ("cuda", 1, "no", ["--torch_compile_backend", "cudagraphs"], "not cudagraphs"),
])
def test_an_impossible_cuda_graph_step_is_refused_by_name(device, processes, precision, flags, missing):
    from types import SimpleNamespace

    from blossomrec_hf.training.trainer import default_compilation
    from blossomrec_hf.training_args import parse_training_arguments

    args = parse_training_arguments(flags + ["--cuda_graph_step"])[2]
    accelerator = SimpleNamespace(device=torch.device(device), num_processes=processes, mixed_precision=precision)
    with pytest.raises(ValueError, match=f"--cuda_graph_step needs .*{re.escape(missing)}"):
        default_compilation(args, accelerator)


def test_fp16_keeps_reduce_overhead_by_default():
    """fp16's loss scaler decides on the host whether a step is taken: unset, --cuda_graph_step is off there (not
    refused) and the compiled step replays torch's own graphs."""
    from types import SimpleNamespace

    from blossomrec_hf.training.trainer import default_compilation
    from blossomrec_hf.training_args import parse_training_arguments

    accelerator = SimpleNamespace(device=torch.device("cuda"), num_processes=1, mixed_precision="fp16")
    decided = default_compilation(parse_training_arguments([])[2], accelerator)
    assert (decided.torch_compile, decided.torch_compile_mode, decided.cuda_graph_step) == (True, "reduce-overhead",
                                                                                            False)


def test_compilation_stays_off_by_default_without_triton(monkeypatch):
    """Inductor needs Triton for a GPU's kernels: where it is missing, an unset --torch_compile means eager steps."""
    from types import SimpleNamespace

    from blossomrec_hf.training import trainer
    from blossomrec_hf.training_args import parse_training_arguments

    monkeypatch.setattr(trainer, "triton_installed", lambda: False)
    one_gpu = SimpleNamespace(device=torch.device("cuda"), num_processes=1)
    decided = trainer.default_compilation(parse_training_arguments([])[2], one_gpu)
    assert not decided.torch_compile and decided.torch_compile_mode is None


def test_train_script_with_torch_compile_matches_eager(tmp_path):
    """`train.py --torch_compile` (aot_eager, see the module docstring) trains 2 epochs with the eager run's losses,
    evaluates with its metrics, and captures two graphs: the training step and the evaluation forward, whatever the
    batch sizes."""
    from train_helpers import TINY_MODEL, TRAIN, check, logged_losses, python_command, read_json, run_script, \
        write_sequences_file

    log = write_sequences_file(tmp_path / "log.txt")
    runs = {}
    for name, flags in (("eager", []), ("compiled", ["--torch_compile_backend", "aot_eager"])):
        output_dir = tmp_path / name
        result = check(run_script(python_command(
            TRAIN, "--dataset", str(log), "--output_dir", str(output_dir), *TINY_MODEL, "--hidden_dropout_prob", "0",
            "--num_train_epochs", "2", "--per_device_train_batch_size", "16", "--logging_steps", "1", *flags)))
        runs[name] = result, output_dir
    compiled_stdout = runs["compiled"][0].stdout
    assert "torch.compile: 2 graphs captured" in compiled_stdout, compiled_stdout
    losses = {name: logged_losses(output_dir) for name, (_, output_dir) in runs.items()}
    assert len(losses["eager"]) == 10
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    metrics = {name: read_json(output_dir / "metrics.json")["test"]["model"] for name, (_, output_dir) in runs.items()}
    assert metrics["compiled"] == pytest.approx(metrics["eager"], abs=1e-6)


def test_the_compressor_recompute_compiles_and_equals_eager(monkeypatch):
    """Long batches recompute the compressor in the backward (activation checkpointing): it traces with fullgraph."""
    import blossomrec_hf.model.modeling_blossomrec as modeling
    monkeypatch.setattr(modeling, "RECOMPUTE_COMPRESSOR_FROM", 1)
    model = make_model("blossom-torch")
    batch = batch_of("static")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    assert_same_step(step(model, batch, compiled), step(model, batch))


def test_a_model_the_kernels_do_not_cover_warns_once_built_and_compiles_whole(monkeypatch):
    """A blossom_triton model of a shape the kernels do not cover (blocks of 8) warns when it is built, and its
    compiled step, which takes the PyTorch path, still traces as one graph (a warning inside it would break it)."""
    import warnings

    config = BlossomRecConfig(n_items=30, hidden_size=32, num_attention_heads=2, num_key_value_heads=1,
                              compress_block_size=8, compress_stride=8, selection_block_size=8, num_selected_blocks=2,
                              max_position_embeddings=24, hidden_dropout_prob=0.0, attn_implementation="blossom_triton")
    with pytest.warns(UserWarning, match="falls back to the PyTorch path for this model: .*selection_block_size"):
        model = BlossomRecForSequentialRecommendation(config)
    ids = torch.randint(1, 31, (2, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eager = model(input_ids=ids, labels=ids).loss
    from blossomrec_hf.model import blossom_attention_triton

    monkeypatch.setattr(blossom_attention_triton, "_warned", set())  # as if the compiled call came first
    compiled = torch.compile(model, fullgraph=True)(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
