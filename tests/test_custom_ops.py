"""The fused loss and RoPE as PyTorch custom operators: torch.library.opcheck, torch.compile(fullgraph=True) of forward
and backward against eager, and a second copy of the code (a checkpoint's remote code) loading beside the installed
one. Triton runs through its interpreter here; the kernels' numerics are tested in test_fused_cross_entropy.py and
test_rotary_embedding.py.
"""

import importlib
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from blossomrec_hf.model import chunked_cross_entropy, custom_ops, fused_cross_entropy, rotary_embedding
from blossomrec_hf.model.fused_cross_entropy import linear_cross_entropy
from blossomrec_hf.model.rotary_embedding import rotary_tables, rotate_queries_and_keys
from blossomrec_hf.model.sampled_softmax import sampled_softmax_loss
from triton_support import requires_triton

HEADS, KV_HEADS, DIM = 2, 1, 16
FUSED = [False, pytest.param(True, marks=requires_triton)]
MODULES = ("custom_ops", "chunked_cross_entropy", "fused_cross_entropy", "rotary_embedding")


def loss_inputs(rows=10, items=12, seed=0):
    """hidden, weight (both needing gradients) and targets with every third row ignored."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, DIM, generator=generator, requires_grad=True)
    weight = torch.randn(items, DIM, generator=generator, requires_grad=True)
    targets = torch.randint(1, items, (rows,), generator=generator)
    targets[::3] = -100
    return hidden, weight, targets


def projection_view(batch=2, length=5, seed=0):
    """Queries and keys as the model has them: a strided view [B, L, H + H_kv, D] into a wider projection."""
    generator = torch.Generator().manual_seed(seed)
    projection = torch.randn(batch, length, (HEADS + KV_HEADS) * DIM + 7, generator=generator, requires_grad=True)
    return projection, projection[..., :(HEADS + KV_HEADS) * DIM].view(batch, length, HEADS + KV_HEADS, DIM)


@pytest.mark.parametrize("hidden_grad, weight_grad", [(True, True), (False, True), (False, False)])
def test_opcheck_chunked_loss(hidden_grad, weight_grad):
    hidden, weight, targets = loss_inputs()
    torch.library.opcheck(chunked_cross_entropy._FORWARD.op, (hidden.detach().requires_grad_(hidden_grad),
                                                           weight.detach().requires_grad_(weight_grad), targets,
                                                           -100, 4, hidden_grad, weight_grad))


@requires_triton
@pytest.mark.parametrize("programs_per_sm", [4, 64])  # 64: items split in the forward, rows in the item gradient
def test_opcheck_fused_loss(monkeypatch, programs_per_sm):
    monkeypatch.setitem(fused_cross_entropy.TUNING, "programs_per_sm", programs_per_sm)
    hidden, weight, targets = loss_inputs(rows=70, items=150)
    torch.library.opcheck(fused_cross_entropy._FORWARD.op, (hidden, weight, targets, -100, torch.float32, True))
    with torch.no_grad():
        _, lse, _ = fused_cross_entropy._FORWARD(hidden, weight, targets, -100, torch.float32, False)
    torch.library.opcheck(fused_cross_entropy._BACKWARD.op, (hidden.detach(), weight.detach(), targets, lse,
                                                          torch.tensor(0.25), -100, torch.float32))


@requires_triton
def test_opcheck_fused_rotary():
    _, query_key = projection_view()
    cos, sin = rotary_tables(5, DIM, 10000.0, "cpu", torch.float32)
    torch.library.opcheck(rotary_embedding._FORWARD.op, (query_key, cos, sin, HEADS))
    dq, dk = torch.randn(2, 5, HEADS, DIM), torch.randn(2, KV_HEADS, 5, DIM).transpose(1, 2)  # keys' grads strided
    torch.library.opcheck(rotary_embedding._BACKWARD.op, (dq, dk, cos, sin))


def attention_free_step(projection, weight, targets, cos, sin, fused: bool):
    """RoPE and the item loss of a tiny stand-in for the model: what a compiled training step runs through."""
    batch, length = projection.shape[:2]
    query_key = projection[..., :(HEADS + KV_HEADS) * DIM].view(batch, length, HEADS + KV_HEADS, DIM)
    q, k = rotate_queries_and_keys(query_key, cos, sin, HEADS, fused=fused)
    hidden = torch.tanh(q.sum(2) + k.sum(2)).flatten(0, 1)
    return linear_cross_entropy(hidden, weight, targets, fused=fused)


@pytest.mark.parametrize("fused", FUSED)
def test_compiled_step_matches_eager_forward_and_backward(fused):
    """One graph (fullgraph: a graph break fails), compiled by inductor, dynamic shapes (batches of 5 and 7 items)."""
    compiled = torch.compile(attention_free_step, fullgraph=True, dynamic=True, backend="inductor")
    for length in (5, 7):
        projection, _ = projection_view(length=length, seed=length)
        _, weight, targets = loss_inputs(rows=2 * length, seed=length)
        cos, sin = rotary_tables(length, DIM, 10000.0, "cpu", torch.float32)
        results = []
        for step in (compiled, attention_free_step):
            loss = step(projection, weight, targets, cos, sin, fused)
            results.append([loss, *torch.autograd.grad(loss, [projection, weight])])
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@requires_triton
def test_compiled_fused_loss_takes_the_autocast_dtype():
    hidden, weight, targets = loss_inputs()
    compiled = torch.compile(linear_cross_entropy, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = compiled(hidden, weight, targets, fused=True)
        want = linear_cross_entropy(hidden, weight, targets, fused=True)
    assert torch.equal(got, want)
    assert not torch.equal(want, linear_cross_entropy(hidden, weight, targets, fused=True))  # bf16 operands


def meta_inputs():
    hidden = torch.empty(10, DIM, device="meta", requires_grad=True)
    weight = torch.empty(12, DIM, device="meta", requires_grad=True)
    return hidden, weight, torch.empty(10, device="meta", dtype=torch.long)


def test_the_pytorch_losses_never_read_tensor_values():
    """Meta tensors have no values: .item(), nonzero() or a branch on a tensor fail on them. The PyTorch losses run on
    them, forward and backward, so they never make the host wait for the GPU."""
    hidden, weight, targets = meta_inputs()
    chunked_cross_entropy._forward(hidden.detach(), weight.detach(), targets, -100, 4, True, True)
    for loss in (linear_cross_entropy(hidden, weight, targets, fused=False),
                 sampled_softmax_loss(hidden, weight, targets, 8, "mixed")):
        assert loss.device.type == "meta"
        torch.autograd.grad(loss, [hidden, weight])


@requires_triton
def test_the_host_code_around_the_kernels_never_reads_tensor_values():
    """The autograd formulas and the PyTorch code between the kernels, on meta tensors (the operators themselves run
    their fake implementations there)."""
    hidden, weight, targets = meta_inputs()
    loss, _, _ = fused_cross_entropy._FORWARD(hidden, weight, targets, -100, torch.float32, True)
    torch.autograd.grad(loss, [hidden, weight])
    parts = torch.empty(3, 10, device="meta")
    fused_cross_entropy._combine_parts(parts, parts, torch.empty(3, 10, DIM, device="meta"), weight, targets,
                                       targets != -100, with_grad=True)
    query_key = torch.empty(2, 5, HEADS + KV_HEADS, DIM, device="meta", requires_grad=True)
    cos, sin = rotary_tables(5, DIM, 10000.0, "meta", torch.float32)
    torch.autograd.grad(rotate_queries_and_keys(query_key, cos, sin, HEADS, fused=True), query_key,
                        [torch.empty(2, 5, heads, DIM, device="meta") for heads in (HEADS, KV_HEADS)])


@pytest.fixture
def load_copy(tmp_path, monkeypatch):
    """load_copy(package, edit=None): this package's operator files copied into `package` (and changed by `edit`),
    imported as transformers imports a checkpoint's remote code: same files, another module name."""
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = []

    def load(package: str, edit=None):
        directory = tmp_path / package
        directory.mkdir()
        (directory / "__init__.py").write_text("")
        for name in custom_ops.OPERATOR_FILES:
            shutil.copy(Path(custom_ops.__file__).with_name(name), directory / name)
        if edit is not None:
            edit(directory)
        loaded.append(package)
        return SimpleNamespace(**{module: importlib.import_module(f"{package}.{module}") for module in MODULES})

    yield load
    for name in [name for name in sys.modules if name.split(".")[0] in loaded]:
        del sys.modules[name]


def installed_and_copied_operators(copy):
    for installed in (chunked_cross_entropy, fused_cross_entropy, rotary_embedding):
        yield installed._FORWARD.op, getattr(copy, installed.__name__.split(".")[-1])._FORWARD.op


@pytest.mark.parametrize("fused", FUSED)
def test_a_copy_of_the_same_code_uses_the_packages_operators(load_copy, fused):
    copy = load_copy(f"checkpoint_code_same_{fused}")
    assert copy.fused_cross_entropy.linear_cross_entropy is not linear_cross_entropy
    assert copy.custom_ops.LIBRARY == custom_ops.LIBRARY
    assert all(installed is copied for installed, copied in installed_and_copied_operators(copy))
    hidden, weight, targets = loss_inputs()
    got = copy.fused_cross_entropy.linear_cross_entropy(hidden, weight, targets, fused=fused)
    assert torch.equal(got, linear_cross_entropy(hidden, weight, targets, fused=fused))
    _, query_key = projection_view()
    cos, sin = rotary_tables(5, DIM, 10000.0, "cpu", torch.float32)
    for a, b in zip(copy.rotary_embedding.rotate_queries_and_keys(query_key, cos, sin, HEADS, fused=fused),
                    rotate_queries_and_keys(query_key, cos, sin, HEADS, fused=fused)):
        assert torch.equal(a, b)


def double_the_chunked_loss(directory):
    path = directory / "chunked_cross_entropy.py"
    source = path.read_text()
    assert "return total / kept_count" in source
    path.write_text(source.replace("return total / kept_count", "return 2 * total / kept_count"))


def test_a_copy_of_other_code_defines_and_runs_its_own_operators(load_copy):
    hidden, weight, targets = loss_inputs()
    before = linear_cross_entropy(hidden, weight, targets, fused=False)
    copy = load_copy("checkpoint_code_other", edit=double_the_chunked_loss)
    assert copy.custom_ops.LIBRARY != custom_ops.LIBRARY
    assert all(installed is not copied for installed, copied in installed_and_copied_operators(copy))
    got = copy.fused_cross_entropy.linear_cross_entropy(hidden, weight, targets, fused=False)
    assert torch.equal(got, 2 * before)
    assert torch.equal(linear_cross_entropy(hidden, weight, targets, fused=False), before)



class LaunchRecorder:
    """Stands in for a Triton kernel: `kernel[grid](...)` records the launch's arguments instead of running it."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.kernel, kwargs))


@requires_triton
@pytest.mark.parametrize("dtype, setting, expected", [
    (torch.float32, "highest", "ieee"), (torch.float32, "high", "tf32x3"), (torch.float32, "medium", "tf32"),
    (torch.bfloat16, "highest", "tf32")])
def test_kernels_take_torchs_float32_matmul_precision(monkeypatch, dtype, setting, expected):
    """Every loss and attention kernel launch gets the dot precision of the setting in force when it runs."""
    from blossomrec_hf.model import blossom_attention_triton as attention
    launches = []
    for module in (fused_cross_entropy, attention):
        for name, value in list(vars(module).items()):
            if hasattr(value, "arg_names"):  # a kernel, compiled or interpreted
                monkeypatch.setattr(module, name, LaunchRecorder(value, launches))
    length, compressed = 40, 2
    q, k, v = torch.zeros(3, length, 2, DIM, dtype=dtype)
    ck, cv = torch.zeros(2, compressed, 2, DIM, dtype=dtype)
    bounds = torch.tensor([0, length], dtype=torch.int32), torch.tensor([0, compressed], dtype=torch.int32)
    hidden, weight = torch.zeros(8, DIM, dtype=dtype), torch.zeros(12, DIM, dtype=dtype)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: setting)
    attention._forward(q, k, v, ck, cv, *bounds, length, 32, 16, 16, 4, 8)
    fused_cross_entropy._forward(hidden, weight, torch.ones(8, dtype=torch.long), -100, dtype, True)
    kernels = {kernel.__name__ for kernel, kwargs in launches if kwargs.get("DOT_PREC") == expected}
    assert {"compressed_forward", "softmax_forward"} <= kernels
    assert all(kwargs["DOT_PREC"] == expected for kernel, kwargs in launches if "DOT_PREC" in kernel.arg_names)


@requires_triton
@pytest.mark.parametrize("operator", ["rotary", "fused_loss", "chunked_loss"])
def test_the_eager_path_equals_the_operator(operator):
    """Eager calls run the operators' implementation and autograd formula as a plain autograd.Function (no
    torch.library dispatch); `.op` is what torch.compile traces. Outputs and gradients are bitwise equal."""
    if operator == "rotary":
        projection, query_key = projection_view()
        cos, sin = rotary_tables(5, DIM, 10000.0, "cpu", torch.float32)
        wrapper, arguments, leaves = rotary_embedding._FORWARD, (query_key, cos, sin, HEADS), [projection]
    else:
        hidden, weight, targets = loss_inputs()
        module = fused_cross_entropy if operator == "fused_loss" else chunked_cross_entropy
        wrapper, leaves = module._FORWARD, [hidden, weight]
        arguments = ((hidden, weight, targets, -100, torch.float32, True) if operator == "fused_loss"
                     else (hidden, weight, targets, -100, 4, True, True))
    results = []
    for call in (wrapper, wrapper.op):
        outputs = [o for o in call(*arguments) if o.is_floating_point() and o.requires_grad]
        # the eager path's autograd node is its autograd.Function's, not the operator's
        assert ("_eager" in type(outputs[0].grad_fn).__name__) == (call is wrapper)
        grads = torch.autograd.grad([o.sum() for o in outputs], leaves)
        results.append([*outputs, *grads])
    for eager, traced in zip(*results):
        assert torch.equal(eager, traced)


@requires_triton
def test_a_double_backward_through_a_kernel_refuses_as_the_operator_does():
    """The backward operators have no autograd formula: differentiating them raises (as torch.library does), rather
    than giving second derivatives that silently leave their terms out."""
    projection, query_key = projection_view()
    cos, sin = rotary_tables(5, DIM, 10000.0, "cpu", torch.float32)
    q, k = rotate_queries_and_keys(query_key, cos, sin, HEADS, fused=True)
    (grad,) = torch.autograd.grad(q.square().sum() + k.sum(), projection, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.square().sum().backward()


@requires_triton
def test_torch_func_transforms_take_the_operator():
    """Under vmap the tensors are functorch wrappers that the kernels cannot read: calls go to the operator."""
    _, query_key = projection_view()
    cos, sin = rotary_tables(5, DIM, 10000.0, "cpu", torch.float32)
    batched = torch.stack([query_key.detach(), 2 * query_key.detach()])
    got = torch.func.vmap(lambda x: rotary_embedding._FORWARD(x, cos, sin, HEADS))(batched)
    for index in range(2):
        for a, b in zip(got, rotary_embedding._FORWARD(batched[index], cos, sin, HEADS)):
            torch.testing.assert_close(a[index], b)
