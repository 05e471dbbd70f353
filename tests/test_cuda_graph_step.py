"""--cuda_graph_step: the optimizer's settings for a captured step, which a checkpoint must not carry into another way
of stepping (on CPU), and, on a CUDA GPU, the captured step training as the same compiled step does uncaptured."""

import os

import pytest
import torch
from transformers import get_scheduler

from blossomrec_hf.training.step_graph import make_capturable, optimizer_settings, restore_optimizer_settings

# conftest.py interprets the Triton kernels on every machine; a capture needs them compiled (the interpreter copies
# each argument to the host)
requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="CUDA graphs need a CUDA GPU and compiled kernels: TRITON_INTERPRET=0 pytest tests/test_cuda_graph_step.py")


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one state per process: these tests' bf16 Accelerator must neither meet nor leave another."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def adamw(lr_tensor: bool = False) -> torch.optim.AdamW:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    lr = torch.tensor(0.01) if lr_tensor else 0.01
    return torch.optim.AdamW(model.parameters(), lr=lr, foreach=False)


def take_steps(optimizer, steps: int) -> None:
    for _ in range(steps):
        for param in optimizer.param_groups[0]["params"]:
            param.grad = torch.ones_like(param)
        optimizer.step()


def test_the_scheduler_fills_a_captured_steps_learning_rate_tensors():
    """make_capturable: each group's lr becomes a device tensor (a float would be frozen into the graph) that the
    scheduler fills in place, from float base rates."""
    optimizer = adamw()
    make_capturable(optimizer)
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and optimizer.param_groups[0]["capturable"]
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=4, num_training_steps=10)
    assert scheduler.base_lrs == [0.01]
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == 0.0
    with pytest.warns(UserWarning, match="optimizer.step"):
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.0025)


@pytest.mark.parametrize("writer_tensor_lr, reader_tensor_lr", [(True, False), (False, True)])
def test_a_checkpoint_keeps_its_learning_rate_but_not_its_way_of_stepping(writer_tensor_lr, reader_tensor_lr):
    """A captured step's checkpoint (lr tensors, capturable, float32 step counts) resumes in an ordinary run, and the
    other way round: the loaded rate and moments are taken, the reader keeps how it steps, and both continue alike."""
    writer = adamw(writer_tensor_lr)
    take_steps(writer, 3)
    saved = writer.state_dict()
    if writer_tensor_lr:  # as a captured step's optimizer writes it
        saved["param_groups"][0]["capturable"] = True
        saved["param_groups"][0]["lr"] = torch.tensor(0.005)
    else:
        saved["param_groups"][0]["lr"] = 0.005
    reader = adamw(reader_tensor_lr)
    with torch.no_grad():  # the weights come with the model's checkpoint
        for source, target in zip(writer.param_groups[0]["params"], reader.param_groups[0]["params"]):
            target.copy_(source)
    reader_lr = reader.param_groups[0]["lr"]
    settings = optimizer_settings(reader)
    reader.load_state_dict(saved)
    restore_optimizer_settings(reader, settings)
    group = reader.param_groups[0]
    assert not group["capturable"] and group["foreach"] is False
    if reader_tensor_lr:
        assert group["lr"] is reader_lr and float(reader_lr) == pytest.approx(0.005)
    else:
        assert type(group["lr"]) is float and group["lr"] == pytest.approx(0.005)
    assert all(state["step"].device.type == "cpu" for state in reader.state.values())
    writer.param_groups[0]["lr"] = 0.005
    take_steps(writer, 2)
    take_steps(reader, 2)
    for expected, got in zip(writer.param_groups[0]["params"], reader.param_groups[0]["params"]):
        torch.testing.assert_close(got, expected)


def test_a_batch_the_captured_step_cannot_take_is_refused_by_name():
    """Between replays only the values of the captured inputs may change: a tensor of another shape or dtype, a
    changed int (max_length_q) or a missing field is a one-line error naming the field; a float is a device scalar
    the next replay reads."""
    from blossomrec_hf.training.step_graph import CapturedStep

    step = CapturedStep(graph=None, inputs={"input_ids": torch.zeros(1, 8, dtype=torch.long), "max_length_q": 5,
                                            "loss_scale": torch.tensor(1.0)}, loss=None)
    batch = {"input_ids": torch.ones(1, 8, dtype=torch.long), "max_length_q": 5, "loss_scale": 0.5}
    step.copy_in(batch)
    assert step.inputs["input_ids"].sum() == 8 and float(step.inputs["loss_scale"]) == 0.5
    for field, value, message in [("input_ids", torch.ones(1, 9, dtype=torch.long), r"input_ids is .*\(1, 9\)"),
                                  ("input_ids", torch.ones(1, 8, dtype=torch.int32), "input_ids is torch.int32"),
                                  ("max_length_q", 6, "max_length_q is 6 where the captured step took 5")]:
        with pytest.raises(ValueError, match=message):
            step.copy_in({**batch, field: value})
    with pytest.raises(ValueError, match="takes the batch fields"):
        step.copy_in({"input_ids": batch["input_ids"]})


def tiny_trainer(tmp_path, *, graph: bool, dropout: float, learning_rate: float = 1e-3, accumulation: int = 1):
    """A Trainer on a small packed log, compiled in torch's default mode, its step captured or not."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from blossomrec_hf.data import check_trainable, prepare_data
    from blossomrec_hf.training_args import EvaluationArguments
    from blossomrec_hf.training.trainer import Trainer
    from blossomrec_hf.training_args import TrainingArguments, build_model_config
    from train_helpers import write_sequences_file

    tmp_path.mkdir(parents=True, exist_ok=True)
    log = write_sequences_file(tmp_path / "log.txt", num_users=1000)
    data = prepare_data(str(log), max_seq_length=12)
    windows = check_trainable(data, 12)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_seq_length=12, max_tokens_per_batch=256,
                             torch_compile=True, torch_compile_mode=None if graph else "default",
                             cuda_graph_step=graph, learning_rate=learning_rate, lr_scheduler_type="linear",
                             warmup_steps=4, max_steps=40, gradient_accumulation_steps=accumulation)
    config = build_model_config(args, {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                                       "hidden_dropout_prob": dropout}, data.vocab.n_items)
    set_seed(0)
    accelerator = Accelerator(mixed_precision="bf16", gradient_accumulation_steps=accumulation)
    trainer = Trainer(accelerator, args, EvaluationArguments(), tmp_path / "run", data,
                      windows, config, stop_signals=None)
    trainer.model.train()
    return trainer


def train_steps(trainer, steps: int, same_batch: bool = False) -> list[float]:
    losses, batches = [], trainer.epoch_batches(0)
    batch = next(batches)
    for _ in range(steps):
        trainer.training_step(batch)
        losses.append(float(trainer.window.sums[0]))  # the running sum of the logged losses
        batch = batch if same_batch else next(batches)
    return losses


@requires_cuda
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_captured_step_trains_as_the_compiled_step(tmp_path, accumulation):
    """Without dropout, 12 optimizer steps (3 ordinary, then captured and replayed; the learning rate warming up)
    give the losses and weights of the same compiled model stepped without the graph; with gradient accumulation
    the batches that only add their gradients are a graph of their own."""
    runs = []
    for graph in (True, False):
        trainer = tiny_trainer(tmp_path / str(graph), graph=graph, dropout=0.0, accumulation=accumulation)
        losses = train_steps(trainer, 12 * accumulation)
        assert trainer.optimizer.optimizer.state  # the optimizer stepped
        assert (trainer.graph_step is not None) == graph
        if graph:  # with accumulation, the batches that step and those that only add gradients
            assert set(trainer.graph_step.captured) == ({True, False} if accumulation > 1 else {True})
        runs.append((losses, [p.detach().float().cpu() for p in trainer.model.parameters()]))
        torch._dynamo.reset()
    (graph_losses, graph_weights), (plain_losses, plain_weights) = runs
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-5)
    # Adam moves a weight by up to ~lr (1e-3) per step whatever its gradient's size, so a rounding difference in a tiny
    # gradient (summed in another order, or the capturable AdamW's float32 step size) can move it by far more than the
    # gradient's own error: on an H100 the two runs' weights differed by up to 3.3e-6 (13 of the item embedding's 2,624
    # beyond 1e-6) while their losses agreed to 1e-5. A stale gradient, a frozen learning rate or a missed step moves
    # weights by orders of magnitude more
    for got, expected in zip(graph_weights, plain_weights, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@requires_cuda
@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_each_replay_draws_new_dropout_masks(tmp_path, dropout):
    """One batch again and again with a learning rate of 0: without dropout every step, ordinary or replayed, gives
    the same loss (so the replays do run the step); with dropout each replay gives another (the graph advances the
    generator at every replay)."""
    trainer = tiny_trainer(tmp_path, graph=True, dropout=dropout, learning_rate=0.0)
    sums = train_steps(trainer, 7, same_batch=True)
    losses = [b - a for a, b in zip([0.0, *sums], sums)]  # 3 ordinary steps, the capture's step, 3 replays
    if dropout:
        assert len(set(losses[3:])) == len(losses[3:])
    else:
        assert len(set(losses)) == 1
