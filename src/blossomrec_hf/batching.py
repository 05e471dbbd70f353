"""Turning prepared splits into model batches: padding, collators, resumable samplers and the data loaders.

Shared by ``scripts/train.py`` and ``scripts/evaluate.py``. Rows are plain mappings (a ``datasets.Dataset`` row, or
a dict), so nothing here needs the ``datasets`` library itself. Id sequences are batched as flat arrays (`Ragged`):
a packed batch of short histories holds thousands of them, and a Python loop over them cost more host time than the
GPU step (~100 ms a Beauty batch of 51,456 tokens).

Several processes: training batches come from one global sequence per epoch, the same for any number of processes,
of which each optimizer step takes ``num_processes x gradient_accumulation_steps`` batches (`StepBatchSampler`);
each process knows every step's number of targets, so the loss can be normalised by it without communication.
Evaluation batches are dealt round-robin (`evaluation_dataloader`): every user is scored by exactly one process.

Static shapes (``--torch_compile``): every batch of a loader then has the same shapes, so one compiled graph (and
one CUDA graph) serves them all. A packed batch is filled to its token budget with padding histories (id 0, labels
-100, at most ``max_length`` tokens each) and to a fixed number of histories with empty ones, and carries its
histories' boundaries as Transformers' flash-attention kwargs: ``cu_seq_lens_q`` (int32 [S + 1]) and
``max_length_q`` (an int, known here on the host, so the model never reads it from the device). A padded batch is
filled to its full size with all-padding rows, each row as wide as a window.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .data.tables import Ragged, read_columns

PADDING_ID = 0


def as_ragged(sequences) -> Ragged:
    """Id sequences (a `Ragged`, or lists / arrays of ids) as one flat int64 `Ragged`."""
    return sequences if isinstance(sequences, Ragged) else Ragged.from_lists(sequences)


def keep_last(sequences: Ragged, count: int) -> Ragged:
    """Each sequence's last ``count`` ids (all of them where it is shorter)."""
    ends = sequences.offsets[1:]
    return sequences.slices(np.maximum(sequences.offsets[:-1], ends - max(count, 0)), ends)


def training_windows_of(rows: Sequence[Mapping] | Ragged) -> Ragged:
    """A batch's windows: `TrainingWindows` gives them flat already; rows (mappings) have them in ``input_ids``."""
    return rows if isinstance(rows, Ragged) else as_ragged([row["input_ids"] for row in rows])


def left_pad(sequences, max_length: int | None = None, *, width: int | None = None,
             rows: int | None = None) -> torch.Tensor:
    """Stack id sequences into ``[B, L]``, keeping the last ``max_length`` ids of each and padding on the left with 0.

    ``L`` is the longest (truncated) sequence of the batch, so short batches stay short; ``width`` and ``rows`` fix
    the shape instead (at least that wide, at least that many rows: the extra rows are all padding).
    """
    sequences = as_ragged(sequences)
    if max_length is not None:
        sequences = keep_last(sequences, max_length)
    lengths = sequences.lengths
    longest = int(lengths.max()) if len(lengths) else 0
    batch = np.full((max(len(lengths), rows or 0), max(longest, width or 0, 1)), PADDING_ID, dtype=np.int64)
    row = np.repeat(np.arange(len(lengths)), lengths)
    column = positions_within(lengths) + np.repeat(batch.shape[1] - lengths, lengths)
    batch[row, column] = sequences.values
    return torch.from_numpy(batch)


def positions_within(lengths: np.ndarray) -> np.ndarray:
    """0, 1, ... restarting at each sequence of a flat concatenation of sequences of these lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)


class TrainingCollator:
    """Batches of training windows: ``input_ids = labels = window`` (the model shifts labels by one itself).

    ``num_rows``: static shapes, every batch ``[num_rows, max_seq_length + 1]`` (short batches get all-padding rows).
    """

    def __init__(self, max_seq_length: int, num_rows: int | None = None):
        self.window_length = max_seq_length + 1
        self.num_rows = num_rows

    def __call__(self, rows: Sequence[Mapping] | Ragged) -> dict:
        windows = keep_last(training_windows_of(rows), self.window_length)
        static = self.num_rows is not None
        input_ids = left_pad(windows, width=self.window_length if static else None, rows=self.num_rows)
        return {
            "input_ids": input_ids,
            "labels": input_ids.clone(),
            # Next-item targets in this batch (every real item except each window's first), for items/s.
            "num_targets": len(windows.values) - len(windows),
        }


def pack(sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """Id sequences back to back in one row, as `transformers.DataCollatorWithFlattening` packs them: ``input_ids``
    [1, T] and ``position_ids`` [1, T] restarting at 0 at each sequence's first item."""
    sequences = as_ragged(sequences)
    return (torch.from_numpy(sequences.values.astype(np.int64))[None],
            torch.from_numpy(positions_within(sequences.lengths))[None])


def static_history_lengths(lengths: Sequence[int], num_tokens: int, num_histories: int,
                           max_length: int) -> list[int]:
    """The histories of a packed batch of fixed size: ``lengths``, then padding histories of at most ``max_length``
    tokens up to ``num_tokens`` tokens, then empty ones up to ``num_histories`` histories."""
    tail = num_tokens - sum(lengths)
    if tail < 0 or any(length > max_length for length in lengths):
        raise ValueError(f"histories of lengths {list(lengths)} do not fit a batch of {num_tokens} tokens of "
                         f"histories of at most {max_length}")
    filled = [*lengths, *[max_length] * (tail // max_length), *([tail % max_length] if tail % max_length else [])]
    if len(filled) > num_histories:
        raise ValueError(f"{len(lengths)} histories and {len(filled) - len(lengths)} padding histories exceed the "
                         f"batch's {num_histories} histories")
    return filled + [0] * (num_histories - len(filled))


def static_num_histories(batches: Sequence[Sequence[int]], num_tokens: int, max_length: int) -> int:
    """The fewest histories per batch that every batch (the lengths of its histories) fits in with its padding
    histories (`static_history_lengths`)."""
    return max((len(lengths) + -(-(num_tokens - sum(lengths)) // max_length) for lengths in batches), default=1)


def pack_static(sequences, num_tokens: int, num_histories: int, max_length: int) -> dict:
    """`pack` filled to a fixed size (`static_history_lengths`): ``input_ids``, ``position_ids`` [1, num_tokens], and
    the flash-attention kwargs ``cu_seq_lens_q`` (int32 [num_histories + 1]) and ``max_length_q``."""
    sequences = as_ragged(sequences)
    lengths = static_history_lengths(sequences.lengths.tolist(), num_tokens, num_histories, max_length)
    input_ids = np.zeros(num_tokens, dtype=np.int64)  # numpy: torch's CPU fills and copies were ~5x slower here
    input_ids[:len(sequences.values)] = sequences.values
    cu_seq_lens = np.zeros(num_histories + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu_seq_lens[1:])
    return {"input_ids": torch.from_numpy(input_ids)[None],
            "position_ids": torch.from_numpy(positions_within(lengths))[None],
            "cu_seq_lens_q": torch.from_numpy(cu_seq_lens), "max_length_q": max_length}


class PackedTrainingCollator:
    """Batches of training windows packed into one row (`pack`), with ``labels`` -100 at each window's first item, so
    that no target crosses from one window into the next. No padding anywhere.

    ``static_shape=(num_tokens, num_histories)``: every batch filled to that size (`pack_static`, padding labelled
    -100), with the flash-attention kwargs."""

    def __init__(self, max_seq_length: int, static_shape: tuple[int, int] | None = None):
        self.window_length = max_seq_length + 1
        self.static_shape = static_shape

    def __call__(self, rows: Sequence[Mapping] | Ragged) -> dict:
        windows = keep_last(training_windows_of(rows), self.window_length)
        num_targets = len(windows.values) - len(windows)
        if self.static_shape is not None:
            batch = pack_static(windows, *self.static_shape, self.window_length)
        else:
            input_ids, position_ids = pack(windows)
            batch = {"input_ids": input_ids, "position_ids": position_ids}
        # built in numpy: torch's CPU masked_fill took ~20 ms for a batch of 51,456 tokens
        labels = np.full(batch["input_ids"].shape[1], -100, dtype=np.int64)
        labels[:len(windows.values)] = windows.values
        labels[windows.offsets[:-1][windows.lengths > 0]] = -100
        return {**batch, "labels": torch.from_numpy(labels)[None], "num_targets": num_targets}


class TrainingWindows(Dataset):
    """The training windows (column ``input_ids``) held flat, each cut to its last ``window_length`` items. A
    DataLoader fetches a batch with ``__getitems__``, which gathers the batch's windows as one `Ragged` with a few
    numpy operations, where a dataset of rows would build a Python object per window."""

    def __init__(self, windows, window_length: int):
        self.windows = keep_last(read_columns(windows, ["input_ids"], what="the training windows")["input_ids"],
                                 window_length)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.windows[index].tolist()}

    def __getitems__(self, indices: Sequence[int]) -> Ragged:
        indices = np.asarray(indices, dtype=np.int64)
        return self.windows.slices(self.windows.offsets[indices], self.windows.offsets[indices + 1])


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of this process in an epoch's plan (`StepBatchSampler.plan`).

    ``indices``: rows of the dataset. ``step``: the optimizer step of the epoch it belongs to. ``targets``: its
    next-item targets (the collators' ``num_targets``). ``step_targets``: the targets of the whole step, every process
    and every accumulated batch together: what the step's loss is normalised by. ``padding``: a stand-in that only
    lets this process take part in a step with fewer batches than processes (the last of an epoch); it repeats a batch
    of the step and must be weighted 0.
    """

    indices: list[int]
    step: int
    targets: int
    step_targets: int
    padding: bool = False

    def loss_scale(self, num_processes: int, accumulation_steps: int) -> float:
        """The factor on this batch's mean loss that makes a step's gradient the mean over ``step_targets``: Accelerate
        divides each backward by the accumulation steps and DDP (like FSDP) averages over the processes, so the factor
        is ``targets x processes x accumulation steps / step_targets`` (0 for padding)."""
        if self.padding or self.step_targets == 0:
            return 0.0
        return self.targets * num_processes * accumulation_steps / self.step_targets


class StepBatchSampler(Sampler[list[int]]):
    """Training batches for any number of processes: one seeded global sequence of batches, dealt by optimizer step.

    Each epoch, a subclass orders every window exactly once into a global sequence of batches that depends only on
    ``seed + epoch`` (``global_batches``), never on the number of processes. An optimizer step takes the next
    ``num_processes x accumulation_steps`` batches of it: accumulated batch ``a`` of process ``p`` is batch
    ``a x num_processes + p`` of the step. So two runs whose ``num_processes x accumulation_steps`` agree (2 processes,
    or 1 process accumulating 2 batches) train every step on the same windows, and with the loss normalised by the
    step's targets (``PlannedBatch.loss_scale``) on the same gradient. The number is known on every process without
    communication: every process holds the window lengths and draws the same sequence.

    Every process gets ``steps_per_epoch x accumulation_steps`` batches per epoch, as DDP needs (it synchronises each
    step). The last step of an epoch may have fewer batches than that; its missing places are ``padding``: a batch of
    the step repeated, weighted 0, so the gradient is still exactly the step's. One process never needs them unless
    it accumulates. ``set_epoch(epoch, start_step)`` skips the steps already trained (a resumed run), without loading
    their data. Private generators only: the global RNG that dropout uses is never touched.

    Iterating gives this process's batches as lists of row indices; ``plan()`` gives the same batches as
    ``PlannedBatch`` with their place in the step.
    """

    def __init__(self, lengths: Sequence[int], seed: int, *, num_processes: int = 1, process_index: int = 0,
                 accumulation_steps: int = 1):
        if num_processes < 1 or not 0 <= process_index < num_processes:
            raise ValueError(f"process {process_index} of {num_processes}: not a process of the run")
        if accumulation_steps < 1:
            raise ValueError(f"--gradient_accumulation_steps must be >= 1, got {accumulation_steps}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.targets = np.maximum(self.lengths - 1, 0)  # a window of n items predicts n - 1 of them
        self.seed = seed
        self.num_processes, self.process_index = num_processes, process_index
        self.accumulation_steps = accumulation_steps
        self.epoch = 0
        self.start_step = 0
        self._cached_plan: tuple[tuple[int, int], list[PlannedBatch]] | None = None

    # what a subclass defines
    def num_batches(self) -> int:
        """Batches of the global sequence, the same every epoch."""
        raise NotImplementedError

    def global_batches(self) -> list[list[int]]:
        """The epoch's global sequence of batches (``self.epoch``): every window exactly once."""
        raise NotImplementedError

    @property
    def batches_per_step(self) -> int:
        return self.num_processes * self.accumulation_steps

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_batches() // self.batches_per_step)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        """The epoch to iterate, from its optimizer step ``start_step`` on (0: the whole epoch)."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"step {start_step} is not a step of an epoch of {self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        """This process's batches in a whole epoch."""
        return self.steps_per_epoch * self.accumulation_steps

    def plan(self) -> list[PlannedBatch]:
        """This process's batches of the epoch from ``start_step`` on, in order."""
        key = (self.epoch, self.start_step)
        if self._cached_plan is not None and self._cached_plan[0] == key:
            return self._cached_plan[1]
        batches = self.global_batches()
        size, planned = self.batches_per_step, []
        for step in range(self.start_step, self.steps_per_epoch):
            group = batches[step * size:(step + 1) * size]
            step_targets = int(sum(self.targets[batch].sum() for batch in group))
            for accumulated in range(self.accumulation_steps):
                place = accumulated * self.num_processes + self.process_index
                batch = group[place % len(group)]
                planned.append(PlannedBatch(batch, step, int(self.targets[batch].sum()), step_targets,
                                            padding=place >= len(group)))
        self._cached_plan = (key, planned)
        return planned

    def __iter__(self) -> Iterator[list[int]]:
        for planned in self.plan():
            yield list(planned.indices)


class TokenBudgetBatchSampler(StepBatchSampler):
    """Batches of at most ``max_tokens`` items, of windows of similar length, in an order that depends only on
    ``seed + epoch``; dealt to processes and accumulated batches by `StepBatchSampler` (``max_tokens`` is the
    budget of one batch of one process).

    Windows are ordered by length and cut greedily into batches, so each batch's windows are about as long as each
    other (little padding where attention lays them out as rows). Each epoch shuffles which window of a given length
    lands in which batch, and the order of the batches; the cut points depend only on the lengths, so every epoch has
    the same number of batches (what a resumed run needs), and so does ``static_shape``.
    """

    def __init__(self, lengths: Sequence[int], max_tokens: int, seed: int, **dealing):
        super().__init__(lengths, seed, **dealing)
        self.max_tokens = max_tokens
        if len(self.lengths) and self.lengths.max() > max_tokens:
            raise ValueError(f"--max_tokens_per_batch {max_tokens} is smaller than the longest training window "
                             f"({int(self.lengths.max())} items = --max_seq_length + 1): raise it or lower "
                             f"--max_seq_length")
        self.by_length = np.argsort(self.lengths, kind="stable")
        self.cuts = self._cuts(self.lengths[self.by_length], max_tokens)

    @staticmethod
    def _cuts(sorted_lengths: np.ndarray, max_tokens: int) -> list[tuple[int, int]]:
        cuts, start, total = [], 0, 0
        for index, length in enumerate(sorted_lengths.tolist()):
            if total + length > max_tokens:
                cuts.append((start, index))
                start, total = index, 0
            total += length
        if start < len(sorted_lengths):
            cuts.append((start, len(sorted_lengths)))
        return cuts

    def static_shape(self, max_length: int) -> tuple[int, int]:
        """(tokens, histories) that every batch fits in, filled with padding histories of at most ``max_length``: the
        same for every epoch, since the cuts depend only on the lengths."""
        sorted_lengths = self.lengths[self.by_length].tolist()
        batches = [sorted_lengths[start:end] for start, end in self.cuts]
        return self.max_tokens, static_num_histories(batches, self.max_tokens, max_length)

    def num_batches(self) -> int:
        return len(self.cuts)

    def global_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        order = self.by_length.copy()
        sorted_lengths = self.lengths[order]
        for length in np.unique(sorted_lengths):  # shuffle windows among the places of their own length
            places = np.flatnonzero(sorted_lengths == length)
            order[places] = rng.permutation(order[places])
        return [order[start:end].tolist() for start, end in
                (self.cuts[batch] for batch in rng.permutation(len(self.cuts)).tolist())]


class ShuffledBatchSampler(StepBatchSampler):
    """Padded batches: ``batch_size`` windows each (the last one fewer), in a random order that depends only on
    ``seed + epoch`` (the order `EpochShuffleSampler` gives, cut into batches); dealt by `StepBatchSampler`."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, **dealing):
        super().__init__(lengths, seed, **dealing)
        if batch_size < 1:
            raise ValueError(f"--per_device_train_batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size

    def num_batches(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def global_batches(self) -> list[list[int]]:
        shuffle = EpochShuffleSampler(len(self.lengths), self.seed)
        shuffle.set_epoch(self.epoch)
        order = list(shuffle)
        return [order[start:start + self.batch_size] for start in range(0, len(order), self.batch_size)]


class NegativeSampler:
    """The ``uni100`` protocol: for each user, ``num_negatives`` distinct items the user never interacted with.

    The draw depends only on (seed, user id), so it is the same for any batch size, process count or run.
    """

    def __init__(self, n_items: int, num_negatives: int = 100, seed: int = 0):
        self.n_items = n_items
        self.num_negatives = num_negatives
        self.seed = seed

    def __call__(self, user: str, interacted: Sequence[int]) -> list[int]:
        seen = set(interacted)
        available = self.n_items - len(seen - {PADDING_ID})
        if available < self.num_negatives:
            raise ValueError(
                f"user {user!r} interacted with {self.n_items - available} of {self.n_items} items: fewer than "
                f"{self.num_negatives} items are left to sample as negatives; use full ranking (--mode full)"
            )
        rng = np.random.default_rng([self.seed, zlib.crc32(str(user).encode("utf-8"))])
        negatives: list[int] = []
        chosen: set[int] = set()
        while len(negatives) < self.num_negatives:
            for item in rng.integers(1, self.n_items + 1, size=2 * self.num_negatives).tolist():
                if item not in seen and item not in chosen:
                    chosen.add(item)
                    negatives.append(item)
                    if len(negatives) == self.num_negatives:
                        break
        return negatives


class EvaluationCollator:
    """Batches of evaluation rows (``user``, ``history``, ``target``, and ``index``, the row's place in its split).

    Gives the histories' last ``max_seq_length`` items packed (`pack`: ``input_ids`` and ``position_ids`` [1, T]),
    ``targets`` and ``user_index`` [S]; with ``exclude_history`` also ``history_items`` (each whole history,
    left-padded with 0) so the ranking can drop already-seen items; with a ``negative_sampler`` also ``candidates``
    (the sampled negatives the target is ranked against). ``static_shape=(num_tokens, num_histories)``: the model's
    input filled to that size (`pack_static`); the batch's users are its first histories.
    """

    def __init__(self, max_seq_length: int, *, exclude_history: bool = False,
                 negative_sampler: NegativeSampler | None = None, static_shape: tuple[int, int] | None = None):
        self.max_seq_length = max_seq_length
        self.exclude_history = exclude_history
        self.negative_sampler = negative_sampler
        self.static_shape = static_shape

    def __call__(self, rows: Sequence[Mapping] | dict) -> dict:
        """`rows`: row mappings, or a batch's columns as `EvaluationRows` fetches them."""
        columns = rows if isinstance(rows, dict) else evaluation_columns(rows)
        histories = columns["history"]
        recent = keep_last(histories, self.max_seq_length)
        if self.static_shape is not None:
            batch = pack_static(recent, *self.static_shape, self.max_seq_length)
        else:
            input_ids, position_ids = pack(recent)
            batch = {"input_ids": input_ids, "position_ids": position_ids}
        batch.update({"targets": torch.as_tensor(np.asarray(columns["target"], dtype=np.int64)),
                      "user_index": torch.as_tensor(np.asarray(columns["index"], dtype=np.int64))})
        if self.exclude_history:
            batch["history_items"] = left_pad(histories)
        if self.negative_sampler is not None:
            batch["candidates"] = torch.as_tensor(
                [self.negative_sampler(user, [*histories[row].tolist(), int(target)])
                 for row, (user, target) in enumerate(zip(columns["user"], columns["target"]))],
                dtype=torch.long,
            )
        return batch


def evaluation_columns(rows: Sequence[Mapping]) -> dict:
    """Row mappings (``user``, ``history``, ``target``, ``index``) as the columns `EvaluationRows` fetches."""
    return {"user": [row["user"] for row in rows], "history": as_ragged([row["history"] for row in rows]),
            "target": [row["target"] for row in rows], "index": [row["index"] for row in rows]}


def evaluation_batches(lengths: Sequence[int], max_tokens: int, max_histories: int) -> list[list[int]]:
    """Consecutive rows in split order, a batch ending before the row that would take it past ``max_tokens`` items or
    ``max_histories`` rows (a longer history gets a batch of its own). One model forward per batch, so memory is
    bounded by tokens whatever the history lengths."""
    batches, current, tokens = [], [], 0
    for index, length in enumerate(lengths):
        if current and (tokens + length > max_tokens or len(current) == max_histories):
            batches.append(current)
            current, tokens = [], 0
        current.append(index)
        tokens += length
    return batches + [current] if current else batches


class EvaluationRows(Dataset):
    """A split's rows (``user``, ``history``, ``target``) with their index added (``index``), so that ranks gathered
    from several processes can be put back in split order and counted once each. A DataLoader fetches a batch with
    ``__getitems__``: the batch's columns at once (histories as one `Ragged`), not a Python object per user."""

    def __init__(self, split):
        self.columns = read_columns(split, ["user", "history", "target"], what="the evaluation split")

    def __len__(self) -> int:
        return len(self.columns["target"])

    def __getitem__(self, index: int) -> dict:
        return {"user": self.columns["user"][index], "history": self.columns["history"][index].tolist(),
                "target": int(self.columns["target"][index]), "index": index}

    def __getitems__(self, indices: Sequence[int]) -> dict:
        indices = np.asarray(indices, dtype=np.int64)
        history = self.columns["history"]
        return {"user": self.columns["user"][indices], "target": self.columns["target"][indices], "index": indices,
                "history": history.slices(history.offsets[indices], history.offsets[indices + 1])}


class EpochShuffleSampler(Sampler[int]):
    """A random order that depends only on ``seed + epoch``.

    Every process draws the same order, and a resumed run re-creates the order of an interrupted epoch exactly, so
    skipping the batches already seen continues where the run stopped (`ShuffledBatchSampler` cuts it into padded
    batches). The order comes from a private generator: iterating never touches the global RNG that dropout uses.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        order_rng = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=order_rng).tolist())


def _private_generator(seed: int) -> torch.Generator:
    """The DataLoader draws a worker base seed from its generator each epoch; a private one keeps dropout's RNG intact."""
    return torch.Generator().manual_seed(seed)


def training_dataloader(windows, max_seq_length: int, batch_size: int, seed: int, num_workers: int = 0,
                        max_tokens_per_batch: int | None = None, static_shapes: bool = False, *,
                        num_processes: int = 1, process_index: int = 0, accumulation_steps: int = 1,
                        pin_memory: bool = False) -> DataLoader:
    """This process's shuffled batches of training windows (column ``input_ids``), reproducible from ``seed`` and the
    epoch: packed batches of at most ``max_tokens_per_batch`` items, or else padded batches of ``batch_size`` windows;
    with ``static_shapes`` every batch of the same shape (the module docstring says how). ``pin_memory`` (training
    on a CUDA GPU): batches in page-locked memory, so that their copies to the GPU need not wait for the GPU. Its
    ``batch_sampler`` (a `StepBatchSampler`) deals the global sequence of batches to the processes and accumulated
    batches itself: the loader must not be sharded again (not passed to ``accelerator.prepare``)."""
    windows = TrainingWindows(windows, max_seq_length + 1)
    lengths = windows.windows.lengths.tolist()
    dealing = dict(num_processes=num_processes, process_index=process_index, accumulation_steps=accumulation_steps)
    if max_tokens_per_batch:
        sampler = TokenBudgetBatchSampler(lengths, max_tokens_per_batch, seed, **dealing)
        collator = PackedTrainingCollator(max_seq_length,
                                          sampler.static_shape(max_seq_length + 1) if static_shapes else None)
    else:
        sampler = ShuffledBatchSampler(lengths, batch_size, seed, **dealing)
        collator = TrainingCollator(max_seq_length, batch_size if static_shapes else None)
    return DataLoader(windows, batch_sampler=sampler, collate_fn=collator, num_workers=num_workers,
                      generator=_private_generator(seed), pin_memory=pin_memory)


def evaluation_dataloader(split, collator: EvaluationCollator, *, max_seq_length: int, max_tokens: int,
                          max_histories: int, process_index: int = 0, num_processes: int = 1,
                          num_workers: int = 0, static_shapes: bool = False) -> DataLoader:
    """This process's share of the evaluation batches (`evaluation_batches`, dealt round-robin): every row lands in
    exactly one process, with no padding rows or duplicates. ``static_shapes``: the collator fills every batch to
    the size that every batch of every process fits in (the most tokens of a batch)."""
    rows = EvaluationRows(split)
    lengths = np.minimum(rows.columns["history"].lengths, max_seq_length).tolist()
    batches = evaluation_batches(lengths, max_tokens, max_histories)
    if static_shapes:
        batch_lengths = [[lengths[index] for index in batch] for batch in batches]
        num_tokens = max(max(sum(batch) for batch in batch_lengths), 1)
        collator.static_shape = (num_tokens, static_num_histories(batch_lengths, num_tokens, max_seq_length))
    batches = batches[process_index::num_processes]
    return DataLoader(rows, batch_sampler=batches, collate_fn=collator, num_workers=num_workers,
                      generator=_private_generator(0))
