"""Training batches for any number of processes: one global sequence of batches per epoch, dealt by optimizer step,
and a loss normalised by the step's targets, so N processes compute the gradient of one process accumulating N
batches. In-process: the dealing, the normalisation (DDP's average simulated), resuming mid-epoch, checkpoints of
another number of processes."""

import numpy as np
import pytest
import torch

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.batching import (EpochShuffleSampler, PackedTrainingCollator, ShuffledBatchSampler,
                                    TokenBudgetBatchSampler, TrainingCollator)
from blossomrec_hf.checkpointing import (STATE_FILE, TrainerState, check_same_run, checkpoint_problem,
                                         resumable_files)

SPLITS = [(1, 4), (2, 2), (4, 1)]  # (processes, accumulated batches): 4 batches per step each


def heavy_tailed_lengths(count=203, longest=51, seed=0):
    rng = np.random.default_rng(seed)
    return np.minimum(np.exp(rng.uniform(np.log(2), np.log(200), count)).astype(int), longest).tolist()


def samplers(make, num_processes, accumulation):
    return [make(num_processes=num_processes, process_index=rank, accumulation_steps=accumulation)
            for rank in range(num_processes)]


def steps_of(processes, epoch, start_step=0):
    """{step: (sorted real windows of the step, step_targets, [padding flags])} over all processes."""
    steps = {}
    for sampler in processes:
        sampler.set_epoch(epoch, start_step)
        for planned in sampler.plan():
            windows, targets, padding = steps.setdefault(planned.step, ([], planned.step_targets, []))
            assert planned.step_targets == targets  # every process knows the step's count
            padding.append(planned.padding)
            if not planned.padding:
                windows.extend(planned.indices)
    return {step: (sorted(windows), targets, sorted(padding)) for step, (windows, targets, padding) in steps.items()}


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_every_split_of_a_step_trains_the_same_windows_and_knows_their_targets(layout):
    lengths = heavy_tailed_lengths()
    targets = np.array(lengths) - 1

    def make(**dealing):
        if layout == "packed":
            return TokenBudgetBatchSampler(lengths, max_tokens=256, seed=3, **dealing)
        return ShuffledBatchSampler(lengths, batch_size=8, seed=3, **dealing)

    one = make()
    assert one.num_batches() % 4 != 0  # the last step of an epoch has fewer batches than places: padding
    steps_per_epoch = -(-one.num_batches() // 4)
    for epoch in range(2):
        reference = None
        for num_processes, accumulation in SPLITS:
            processes = samplers(make, num_processes, accumulation)
            assert {len(s) for s in processes} == {steps_per_epoch * accumulation}  # DDP: same count each
            steps = steps_of(processes, epoch)
            assert sorted(steps) == list(range(steps_per_epoch))
            windows = [i for step in steps.values() for i in step[0]]
            assert sorted(windows) == list(range(len(lengths)))  # every window once per epoch
            for step_windows, step_targets, padding in steps.values():
                assert step_targets == targets[step_windows].sum()
                assert len(padding) == 4
            assert [any(step[2]) for step in steps.values()] == [False] * (steps_per_epoch - 1) + [True]
            if reference is None:
                reference = steps
            assert steps == reference, (num_processes, accumulation)
        # one process, no accumulation: the sequence itself, no padding (the one-process order of before)
        one.set_epoch(epoch)
        assert list(one) == one.global_batches()


def test_a_resumed_epoch_continues_at_its_step_and_padding_repeats_a_batch_of_the_step():
    lengths = heavy_tailed_lengths()
    processes = samplers(lambda **d: TokenBudgetBatchSampler(lengths, 256, seed=1, **d), 2, 2)
    for sampler in processes:
        sampler.set_epoch(1)
        whole = sampler.plan()
        sampler.set_epoch(1, start_step=3)
        assert sampler.plan() == whole[3 * 2:]
        assert list(sampler) == [planned.indices for planned in whole[3 * 2:]]
        for planned in whole:
            if planned.padding:
                assert planned.loss_scale(2, 2) == 0.0 and planned.targets > 0
    steps = steps_of(processes, 1)
    last = max(steps)
    padded = [p for s in processes for p in s.plan() if p.padding]
    assert padded and all(p.step == last and set(p.indices) <= set(steps[last][0]) for p in padded)
    with pytest.raises(ValueError, match="not a step of an epoch"):
        processes[0].set_epoch(0, start_step=processes[0].steps_per_epoch + 1)


def test_static_shapes_and_padded_order_do_not_depend_on_the_split():
    lengths = heavy_tailed_lengths()
    shapes = {TokenBudgetBatchSampler(lengths, 256, 0, num_processes=n, process_index=0,
                                      accumulation_steps=a).static_shape(51) for n, a in SPLITS}
    assert len(shapes) == 1
    # padded batches of one process: EpochShuffleSampler's order cut into batches, as the DataLoader did before
    sampler = ShuffledBatchSampler(lengths, batch_size=16, seed=4)
    sampler.set_epoch(2)
    shuffle = EpochShuffleSampler(len(lengths), seed=4)
    shuffle.set_epoch(2)
    order = list(shuffle)
    assert list(sampler) == [order[i:i + 16] for i in range(0, len(order), 16)]


def tiny_model():
    config = BlossomRecConfig(n_items=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              num_key_value_heads=1, intermediate_size=32, hidden_dropout_prob=0.0,
                              compress_block_size=4, compress_stride=2, selection_block_size=4, num_selected_blocks=2,
                              stis_window=2, attn_implementation="blossom_torch")
    torch.manual_seed(0)
    return BlossomRecForSequentialRecommendation(config)


def gradients(model, batches, scales, divide_by):
    """Accelerate's backward (each loss / accumulation steps) of every batch, summed as accumulation does."""
    model.zero_grad()
    for batch, scale in zip(batches, scales):
        loss = model(**{k: v for k, v in batch.items() if k != "num_targets"}).loss
        (loss * scale / divide_by).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_the_normalised_loss_gives_every_split_the_one_batch_gradient(layout):
    """Per step: N processes (DDP's mean simulated) and 1 process accumulating give the gradient of the step's
    windows as one batch, the mean over all their targets, though the batches hold different numbers of targets."""
    rng = np.random.default_rng(0)
    windows = [rng.integers(1, 31, size=length).tolist() for length in [2, 3, 13, 5, 9, 13, 4, 2, 7, 11, 6]]
    rows = [{"input_ids": window} for window in windows]
    lengths = [len(window) for window in windows]
    collate = PackedTrainingCollator(12) if layout == "packed" else TrainingCollator(12)

    def make(**dealing):
        if layout == "packed":
            return TokenBudgetBatchSampler(lengths, max_tokens=20, seed=0, **dealing)
        return ShuffledBatchSampler(lengths, batch_size=2, seed=0, **dealing)

    model = tiny_model()
    assert make().num_batches() % 4 != 0  # the last step has padding batches
    whole_steps = steps_of(samplers(make, 1, 4), 0)
    for step, (step_windows, _, padding) in whole_steps.items():
        assert len({lengths[i] for i in step_windows}) > 1 or any(padding)  # batches of different target counts
        want = gradients(model, [PackedTrainingCollator(12)([rows[i] for i in step_windows])], [1.0], 1)
        for num_processes, accumulation in SPLITS:
            per_process = []
            for sampler in samplers(make, num_processes, accumulation):
                plan = [p for p in sampler.plan() if p.step == step]
                batches = [collate([rows[i] for i in planned.indices]) for planned in plan]
                assert [b["num_targets"] for b in batches] == [p.targets for p in plan]
                scales = [p.loss_scale(num_processes, accumulation) for p in plan]
                per_process.append(gradients(model, batches, scales, accumulation))
            for name, gradient in want.items():  # DDP's mean over processes
                got = sum(g[name] for g in per_process) / num_processes
                torch.testing.assert_close(got, gradient, rtol=1e-5, atol=1e-7,
                                           msg=f"{name}, step {step}, {num_processes} x {accumulation}")


def test_a_checkpoint_resumes_on_another_split_of_the_same_batches_per_step(tmp_path):
    two = {"hidden_size": 32, "num_processes": 2, "gradient_accumulation_steps": 1, "batches_per_step": 2}
    check_same_run("step-4", two, {**two, "num_processes": 1, "gradient_accumulation_steps": 2})
    old = {key: value for key, value in two.items() if key != "batches_per_step"}  # written before it was recorded
    check_same_run("step-4", old, {**two, "num_processes": 1, "gradient_accumulation_steps": 2})
    with pytest.raises(ValueError, match=r"batches_per_step 2 \(now 1\) \(batches_per_step is processes x "
                                         r"--gradient_accumulation_steps: it was 2 x 1; keep the product, e\.g\. "
                                         r"--gradient_accumulation_steps 2 on one process\)"):
        check_same_run("step-4", old, {**two, "num_processes": 1, "batches_per_step": 1})

    # a checkpoint of 2 processes resumes on 1, which needs only its own RNG state; a missing one of the writer's
    # processes is still damage
    class OneProcess:
        num_processes, scaler = 1, None

    checkpoint = tmp_path / "step-4"
    checkpoint.mkdir()
    for name in ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "random_states_1.pkl"]:
        (checkpoint / name).write_bytes(b"state")
    TrainerState(global_step=4, run_config=two).save(checkpoint / STATE_FILE)
    required = resumable_files(OneProcess())
    assert "random_states_1.pkl" not in required and "random_states_0.pkl" in required
    assert checkpoint_problem(checkpoint, required) is None
    (checkpoint / "random_states_1.pkl").unlink()
    assert checkpoint_problem(checkpoint, required) == "missing random_states_1.pkl"
