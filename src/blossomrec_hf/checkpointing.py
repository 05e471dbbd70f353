"""Resumable training on disk: the trainer's state, checkpoints under ``output_dir/checkpoints``, and files that a
kill, a power cut or a full disk never leaves half-written.

A checkpoint is ``accelerator.save_state`` (model, optimizer, scheduler, every process's RNG state) plus
``trainer_state.json`` (position in the data, best validation result, patience, timings, logged losses, and the
settings the run must keep). It is written into ``step-N.incomplete``, flushed to disk, and only then renamed to
``step-N``, so ``step-N`` is whole or absent. Old checkpoints are renamed to ``step-N.deleting`` before they are
deleted. Resuming still checks each checkpoint (its state parses, its files are there), because a folder can be
damaged by other means, and skips damaged ones with a warning. A write that fails (a full disk) stops every process
with ``OutputWriteError``, naming the file and the OS error; what was written before stays as it was.

A checkpoint resumes on another number of processes as long as the batches per optimizer step (processes x gradient
accumulation) and the per-device batch stay (``check_same_run``): the steps then train on the same windows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from .errors import messages_of_all_processes

STATE_FILE = "trainer_state.json"
CHECKPOINTS_DIR = "checkpoints"
INCOMPLETE, DELETING = ".incomplete", ".deleting"


class OutputWriteError(RuntimeError):
    """A file or folder of the run could not be written (e.g. the disk is full); the message names it and the OS
    error. Checkpoints, the best model and the records written before are intact."""


def write_or_stop(accelerator, what: str | Path, write, *, main_process_only: bool = False):
    """Run ``write()`` (on the main process only, if asked) and return what it returns (None where it did not run);
    if it raises ``OSError`` on any process, raise ``OutputWriteError`` naming ``what`` on every process. A collective
    with several processes (so also a barrier): every process calls it at the same point, and none is left waiting
    for one that failed."""
    message = result = None
    if accelerator.is_main_process or not main_process_only:
        try:
            result = write()
        except OSError as error:
            message = f"could not write {what}: {error.strerror or error}"
    failed = messages_of_all_processes(accelerator, message)
    if failed:
        raise OutputWriteError(failed[0])
    return result


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in ``directory`` survive a power cut."""
    _fsync(directory)


def write_atomic(path: Path, write) -> None:
    """Write ``path`` through ``write(binary_file)`` so that it holds the old content or the new, never a torn mix.

    The content goes to a temporary file in the same folder, is flushed to disk, and replaces ``path`` in one rename.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data) -> None:
    write_atomic(path, lambda file: file.write(json.dumps(data, indent=2).encode()))


def fsync_files(directory: Path) -> None:
    """Flush every file of ``directory`` to disk (``accelerate.save_state`` and ``save_pretrained`` do not)."""
    for path in directory.iterdir():
        if path.is_file():
            _fsync(path)
    fsync_dir(directory)


def remove_tree(path: Path) -> None:
    """Delete a folder so that a kill half-way leaves no look-alike: it is renamed to ``*.deleting`` first."""
    if not path.exists():
        return
    doomed = path.with_name(path.name + DELETING)
    shutil.rmtree(doomed, ignore_errors=True)
    os.rename(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0  # epoch of the next batch
    # batches of that epoch already trained on by each process: steps x gradient_accumulation_steps (a run resumed
    # with another split of the same batches per step converts it)
    batches_in_epoch: int = 0
    train_seconds: float = 0.0  # time spent in training steps, without evaluation and checkpointing
    train_targets: int = 0  # next-item predictions trained on, all processes together (for items/s)
    # The open logging window, all processes together (kept here so a resumed run logs what an uninterrupted one
    # would): summed batch losses, batches, next-item targets, and train_seconds when the window opened.
    window_loss_sum: float = 0.0
    window_batches: int = 0
    window_targets: int = 0
    window_start_seconds: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    best_epoch: float | None = None
    best_train_seconds: float | None = None
    best_validation: dict | None = None
    evaluations_without_improvement: int = 0
    stopped_early: bool = False
    # A stop signal came at a step due for evaluation: the checkpoint was saved without waiting for the evaluation,
    # and the resumed run evaluates first (the same weights, so the same result as the uninterrupted run).
    evaluation_pending: bool = False
    log_history: list[dict] = field(default_factory=list)
    run_config: dict | None = None  # what a resuming run must share with this one (None in older checkpoints)

    def save(self, path: Path) -> None:
        write_json_atomic(path, dataclasses.asdict(self))

    @classmethod
    def load(cls, path: Path) -> "TrainerState":
        return cls(**json.loads(Path(path).read_text()))


def checkpoint_files(accelerator) -> list[str]:
    """The files ``accelerator.save_state`` (accelerate 1.16) writes for the trainer's model, optimizer, scheduler,
    gradient scaler (fp16 only) and the RNG state of each process."""
    return ["model.safetensors", "optimizer.bin", "scheduler.bin",
            *(["scaler.pt"] if getattr(accelerator, "scaler", None) is not None else []),
            *(f"random_states_{rank}.pkl" for rank in range(accelerator.num_processes))]


def resumable_files(accelerator) -> list[str]:
    """The files a checkpoint needs for this run to resume it, whatever number of processes wrote it: those of
    `checkpoint_files` but only the first process's RNG state (`checkpoint_problem` requires those of the processes
    that wrote it, which its ``trainer_state.json`` names)."""
    return [name for name in checkpoint_files(accelerator)
            if not name.startswith("random_states_") or name == "random_states_0.pkl"]


def written_rng_files(state: "TrainerState") -> list[str]:
    """The RNG states a checkpoint holds: one per process of the run that wrote it (none named in older states)."""
    return [f"random_states_{rank}.pkl" for rank in range((state.run_config or {}).get("num_processes") or 0)]


def checkpoint_problem(path: Path, required: list[str]) -> str | None:
    """Why ``path`` is not a whole checkpoint with the ``required`` files (and the RNG state of every process that
    wrote it), or None if it is one."""
    missing = [name for name in (*required, STATE_FILE) if not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    empty = [name for name in required if (path / name).stat().st_size == 0]
    if empty:
        return f"empty {', '.join(empty)}"
    try:
        state = TrainerState.load(path / STATE_FILE)
    except (ValueError, TypeError):
        return f"{STATE_FILE} is empty or cut off"
    missing = [name for name in written_rng_files(state) if name not in required and not (path / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    return None


def step_dirs(output_dir: Path) -> list[Path]:
    """Every ``step-N`` folder of ``output_dir/checkpoints`` (whole or not), oldest first."""
    found = [p for p in (Path(output_dir) / CHECKPOINTS_DIR).glob("step-*") if p.name[5:].isdigit() and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def resolve_checkpoint(output_dir: Path, requested: str, required: list[str]) -> tuple[Path, list[str]]:
    """The checkpoint meant by ``--resume_from_checkpoint`` (a path, or ``latest`` in ``output_dir``), and a warning
    for each incomplete newer one that ``latest`` skipped."""
    if requested != "latest":
        if not Path(requested).is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {requested}: no such folder")
        problem = checkpoint_problem(Path(requested), required)
        if problem:
            raise FileNotFoundError(f"--resume_from_checkpoint {requested}: not a complete checkpoint ({problem})")
        return Path(requested), []
    skipped = []
    for path in reversed(step_dirs(output_dir)):
        problem = checkpoint_problem(path, required)
        if problem is None:
            return path, [f"warning: skipping incomplete checkpoint {bad} ({why})" for bad, why in skipped]
        skipped.append((path, problem))
    incomplete = "".join(f"; {bad.name} is incomplete ({why})" for bad, why in skipped)
    raise FileNotFoundError(f"--resume_from_checkpoint latest: no complete checkpoint in "
                            f"{Path(output_dir) / CHECKPOINTS_DIR}{incomplete}")


# Settings a resumed run may change: how the global batch is split between processes and accumulated batches (their
# product, ``batches_per_step``, must stay, and so must the per-device batch: then every step trains on the same
# windows, and with its loss normalised by the step's targets, on the same gradient).
SPLIT_SETTINGS = ("num_processes", "gradient_accumulation_steps")


def batches_per_step(run_config: dict) -> int:
    """Batches of one optimizer step, all processes together (derived for run configs written before it was)."""
    if "batches_per_step" in run_config:
        return run_config["batches_per_step"]
    return (run_config.get("num_processes") or 1) * (run_config.get("gradient_accumulation_steps") or 1)


def check_same_run(path: Path, saved: dict | None, current: dict, defaults: dict | None = None) -> None:
    """Refuse to resume ``path`` (whose run config is ``saved``) with settings that change the model or the data
    (another number of processes is fine if the batches per step stay: ``SPLIT_SETTINGS``). A setting newer than
    the checkpoint (absent from ``saved``) passes at its value in ``defaults``, which keeps the older behaviour."""
    if saved is None:
        return
    defaults = defaults or {}
    saved = {**{key: value for key, value in defaults.items() if key in current}, **saved}
    saved = {**saved, "batches_per_step": batches_per_step(saved)} if any(key in saved for key in SPLIT_SETTINGS) \
        else saved
    differing = [f"{key} {saved.get(key)!r} (now {current.get(key)!r})"
                 for key in sorted(saved.keys() | current.keys())
                 if key not in SPLIT_SETTINGS and saved.get(key) != current.get(key)]
    if differing:
        hint = ""
        if saved.get("batches_per_step") != current.get("batches_per_step") and "num_processes" in saved:
            hint = (f" (batches_per_step is processes x --gradient_accumulation_steps: it was "
                    f"{saved.get('num_processes')} x {saved.get('gradient_accumulation_steps')}; keep the product, "
                    f"e.g. --gradient_accumulation_steps {batches_per_step(saved)} on one process)")
        raise ValueError(f"{path} was trained with other settings: {', '.join(differing)}{hint}; resume with the same "
                         f"settings, or start over with --overwrite_output_dir")


def save_checkpoint(accelerator, output_dir: Path, state: TrainerState, total_limit: int) -> Path:
    """Write ``step-N`` for ``state.global_step``, whole or not at all (all processes call this), then drop the
    oldest checkpoints beyond ``total_limit``. ``OutputWriteError`` (e.g. a full disk) if it cannot be written:
    then ``step-N`` is not created and the older checkpoints are untouched."""
    root = Path(output_dir) / CHECKPOINTS_DIR
    path = root / f"step-{state.global_step}"
    staging = path.with_name(path.name + INCOMPLETE)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        what = f"checkpoint {path}"
        write_or_stop(accelerator, what, lambda: accelerator.save_state(str(staging)))  # then every RNG state is in
        write_or_stop(accelerator, what, lambda: (fsync_files(staging), state.save(staging / STATE_FILE)),
                      main_process_only=True)
    except OutputWriteError:
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # frees the space it took; never a step-N
        raise
    if accelerator.is_main_process:
        remove_tree(path)  # a step-N of a continuation that a resume from an older checkpoint abandoned
        os.rename(staging, path)
        fsync_dir(root)
        prune_checkpoints(output_dir, state.global_step, total_limit, resumable_files(accelerator))
    accelerator.wait_for_everyone()
    return path


def prune_checkpoints(output_dir: Path, current_step: int, total_limit: int, required: list[str]) -> None:
    """Keep the newest ``total_limit`` whole checkpoints up to ``current_step``; delete the others (damaged ones,
    newer ones of an abandoned continuation) and what interrupted saves and deletions left."""
    kept = [p for p in step_dirs(output_dir)
            if int(p.name[5:]) <= current_step and checkpoint_problem(p, required) is None][-max(total_limit, 1):]
    for path in (Path(output_dir) / CHECKPOINTS_DIR).glob("step-*"):
        if path in kept or not path.is_dir():
            continue
        if path.name.endswith((INCOMPLETE, DELETING)):
            shutil.rmtree(path, ignore_errors=True)
        else:
            remove_tree(path)


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    """The trainer state of ``path``, with the model, optimizer, scheduler and RNG states loaded into ``accelerator``.

    A checkpoint of another number of processes loads too: the model, optimizer and scheduler are whole in it; each
    process takes its own RNG state, and one the checkpoint has none for (more processes now) keeps its seeded one,
    so only the dropout of those processes differs from a run that was never interrupted."""
    state = TrainerState.load(path / STATE_FILE)
    accelerator.load_state(str(path))
    # Accelerate restores its count of accumulated batches; checkpoints are written at optimizer steps, where it is 0
    # (and the saved count is of the writer's gradient accumulation, which may differ).
    accelerator.step = 0
    return state
