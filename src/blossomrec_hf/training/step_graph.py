"""The whole optimizer step in one CUDA graph (``--cuda_graph_step``): forward, backward, clipping and AdamW,
captured once and replayed for every later batch.

torch.compile's mode reduce-overhead replays the forward and the backward from two CUDA graphs, but the autograd
engine, gradient clipping, the optimizer and the graphs' own bookkeeping still run on the host at every step:
2.4-2.9 ms per step on an H100 host (benchmarks/README.md, ninth session), which bounds short steps such as
ML-100K's (3.7 ms for 2.1 ms of kernels). Replaying the whole step leaves the host copying the batch into the
graph's input buffers: 0.11-0.14 ms per step, and ML-100K's step took 2.3 ms.

What a capture needs, and where it comes from:
- static shapes and no host sync in the step: the model compiled with ``fullgraph=True`` in a mode without CUDA
  graphs of its own, on the loaders' static batches (a batch field that changes anyway is refused, by name);
- gradients and optimizer state at fixed addresses: the first ``warmup_steps`` optimizer steps run as ordinary
  steps (they train: they are the run's first steps) and make the optimizer's state; the gradients are set to None
  before the capture, so the captured backward writes them afresh at every replay (nothing to zero), or, with
  gradient accumulation, allocated before the captures and added into in place (`CudaGraphStep`);
- a learning rate the scheduler changes between replays: AdamW is capturable and each group's ``lr`` a device
  tensor, filled by the scheduler (a float would be frozen into the graph), `make_capturable`;
- dropout: the graph advances the generator's offset at every replay, so each step draws new masks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

OPTIMIZER_HOW = ("capturable", "fused", "foreach", "differentiable")  # how a group steps, not what it learns


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Prepare a fused AdamW (before its scheduler is made) for a captured step: step counts on the device, and each
    group's learning rate a float32 device tensor. The groups' ``initial_lr`` stays a float, so that the scheduler
    computes floats and fills the tensors with them."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        lr = float(group["lr"])
        group.update(capturable=True, initial_lr=lr, lr=torch.tensor(lr, dtype=torch.float32, device=device))


def optimizer_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """How each group steps (`OPTIMIZER_HOW`) and its learning rate's kind, to restore after loading a checkpoint."""
    return [{**{key: group.get(key) for key in OPTIMIZER_HOW}, "lr": group["lr"]} for group in optimizer.param_groups]


def restore_optimizer_settings(optimizer: torch.optim.Optimizer, settings: list[dict]) -> None:
    """After ``load_state_dict``: the groups step as this run's optimizer was made to (a checkpoint's groups carry
    the writer's settings: a captured step's device tensors, or an eager run's floats), with the loaded learning
    rates, and each ``step`` count where that way of stepping keeps it."""
    for group, kept in zip(optimizer.param_groups, settings, strict=True):
        lr = float(group["lr"])
        group.update({key: kept[key] for key in OPTIMIZER_HOW})
        if isinstance(kept["lr"], torch.Tensor):
            group["lr"] = kept["lr"].fill_(lr)
        else:
            group["lr"] = lr
        if isinstance(group.get("initial_lr"), torch.Tensor):
            group["initial_lr"] = float(group["initial_lr"])
        on_device = bool(group["capturable"] or group["fused"])
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(dtype=torch.float32, device=param.device if on_device else "cpu")


class CudaGraphStep:
    """``step(inputs) -> loss`` (forward, backward, and where the batch ends an optimizer step, clipping and the
    optimizer step; no zeroing), run as an ordinary step for the first ``warmup_steps`` optimizer steps, then captured
    and replayed: calling this with a batch's inputs trains on them and returns the loss, a tensor the next call
    overwrites (read it, or enqueue what reads it, before).

    Without gradient accumulation one graph is captured, with the gradients unset: its backward writes them afresh at
    every replay. With accumulation the batches that only add their gradients and those that end an optimizer step are
    two graphs (``optimizer_step``), sharing one memory pool (they never run at once): the gradients then stay
    allocated, each backward adds into them in place, and the optimizer step's graph zeroes them after stepping."""

    def __init__(self, step: Callable[[dict], torch.Tensor], optimizer, warmup_steps: int = 3,
                 accumulation_steps: int = 1):
        self.step, self.optimizer, self.warmup_steps = step, optimizer, warmup_steps
        self.accumulating = accumulation_steps > 1
        self.optimizer_steps_run = 0
        self.captured: dict[bool, CapturedStep] = {}  # by whether the batch ends an optimizer step

    def __call__(self, inputs: dict, optimizer_step: bool = True) -> torch.Tensor:
        if not self.captured and self.optimizer_steps_run < self.warmup_steps:
            loss = self._ordinary_step(inputs, optimizer_step)
        else:
            captured = self.captured.get(optimizer_step) or self._capture(inputs, optimizer_step)
            loss = captured.replay(inputs)
        self.optimizer_steps_run += optimizer_step
        return loss

    def _ordinary_step(self, inputs: dict, optimizer_step: bool) -> torch.Tensor:
        """One step on a side stream (as CUDA's capture rules ask of the steps before a capture)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.step(inputs)
            if optimizer_step:
                self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def _capture(self, inputs: dict, optimizer_step: bool) -> CapturedStep:
        buffers = {key: _buffer(value) for key, value in inputs.items()}
        if not self.accumulating:
            self.optimizer.zero_grad(set_to_none=True)  # the captured backward allocates them in the graph's pool
        elif not self.captured:  # at fixed addresses, outside the graphs: each backward adds into them in place
            for group in self.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = torch.zeros_like(param)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        pool = next(iter(self.captured.values())).graph.pool() if self.captured else None
        # thread_local, as torch.compile's own CUDA graphs: a loader's pin-memory thread may allocate meanwhile
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            loss = self.step(buffers)
            if self.accumulating and optimizer_step:
                self.optimizer.zero_grad(set_to_none=False)
        self.captured[optimizer_step] = CapturedStep(graph, buffers, loss)
        return self.captured[optimizer_step]


class CapturedStep:
    """One captured step: its graph, its input buffers (tensors) and the values it was captured with (the rest), and
    its loss."""

    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: dict, loss: torch.Tensor):
        self.graph, self.inputs, self.loss = graph, inputs, loss

    def replay(self, inputs: dict) -> torch.Tensor:
        """Train on ``inputs`` (the capture itself ran nothing: its batch is replayed too)."""
        self.copy_in(inputs)
        self.graph.replay()
        return self.loss

    def copy_in(self, inputs: dict) -> None:
        """The batch into the graph's input buffers; a field of another shape, dtype or value is refused by name."""
        if inputs.keys() != self.inputs.keys():
            raise ValueError(f"a captured training step takes the batch fields {sorted(self.inputs)}, got "
                             f"{sorted(inputs)}")
        for key, value in inputs.items():
            buffer = self.inputs[key]
            if isinstance(buffer, torch.Tensor) and isinstance(value, torch.Tensor):
                if value.shape != buffer.shape or value.dtype != buffer.dtype:
                    raise ValueError(f"batch field {key} is {value.dtype} {tuple(value.shape)} where the captured "
                                     f"step took {buffer.dtype} {tuple(buffer.shape)}: --cuda_graph_step needs "
                                     f"batches of one shape (--torch_compile's static batches)")
                buffer.copy_(value, non_blocking=True)
            elif isinstance(buffer, torch.Tensor) and isinstance(value, float):
                buffer.fill_(value)
            elif value != buffer:
                raise ValueError(f"batch field {key} is {value!r} where the captured step took {buffer!r}: "
                                 f"--cuda_graph_step needs batches of one shape (--torch_compile's static batches)")


def _buffer(value):
    """A graph input: a tensor's copy, a float as a device scalar (it may change between replays), anything else as
    it is (it must not change)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float32, device=torch.cuda.current_device())
    return value
