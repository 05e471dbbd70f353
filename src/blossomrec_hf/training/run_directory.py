"""The run's output folder: refusing one the user did not ask to overwrite, and writing into it without tearing.

Every check here runs before the data is prepared, so a wrong ``--output_dir`` costs seconds, not a data pass.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ..checkpointing import (CHECKPOINTS_DIR, INCOMPLETE, fsync_dir, fsync_files, remove_tree, resolve_checkpoint,
                             resumable_files, step_dirs, write_json_atomic)
from ..data.prepared import INFO_FILE
from ..errors import user_input_errors

BEST_MODEL_STAGING = ".best-model" + INCOMPLETE
TRAINING_ARGS_FILE = "training_args.json"


def check_output_dir(output_dir: Path, *, dataset: str, resuming: bool, overwrite: bool) -> None:
    """Raise ``ValueError`` unless ``output_dir`` may receive this run: it is absent, empty, this run's own (when
    resuming), or ``overwrite`` says to write over it. Never a file, never the dataset's own folder."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file, not a folder")
    if Path(dataset).is_dir() and Path(dataset).resolve() == output_dir.resolve():
        raise ValueError(f"--output_dir {output_dir} is the dataset folder; the run would write its model and item "
                         f"vocabulary over the dataset's: choose another folder")
    if resuming or overwrite or not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    if step_dirs(output_dir):
        raise ValueError(f"{output_dir} already holds checkpoints of an earlier run; pass --resume_from_checkpoint "
                         f"latest to continue it or --overwrite_output_dir to start over")
    raise ValueError(f"--output_dir {output_dir} is not empty (it holds {_describe(output_dir)}); pass "
                     f"--overwrite_output_dir to write over it, or choose another folder")


def _describe(folder: Path) -> str:
    names = sorted(path.name for path in folder.iterdir())
    if INFO_FILE in names:
        return "a prepared dataset"
    if "config.json" in names or "model.safetensors" in names:
        return "a saved model"
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def check_writable(output_dir: Path) -> None:
    """Create ``output_dir`` and write a nameless file in it, or raise ``OSError`` saying why that is impossible."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as error:
        raise OSError(f"--output_dir {output_dir} cannot be written ({error.strerror or error})") from None


def prepare_output_dir(accelerator, args, dataset: str) -> tuple[Path, Path | None]:
    """The output folder and the checkpoint to resume (or None), after every check; exits with one ``error:`` line
    (from the main process; status 2 on every process) when the folder must not or cannot be used. With
    ``--overwrite_output_dir`` the old checkpoints go."""
    output_dir = args.resolve_output_dir(dataset)
    with user_input_errors("arguments", accelerator):
        resuming = args.resume_from_checkpoint is not None
        check_output_dir(output_dir, dataset=dataset, resuming=resuming, overwrite=args.overwrite_output_dir)
        resume_dir, warnings = None, []
        if resuming:
            resume_dir, warnings = resolve_checkpoint(output_dir, args.resume_from_checkpoint,
                                                      resumable_files(accelerator))
    if accelerator.is_main_process:
        for warning in warnings:
            print(warning, file=sys.stderr)
    # user_input_errors waited for every process: nobody writes into output_dir before every process has looked at it
    with user_input_errors("arguments", accelerator):
        check_writable(output_dir)
    if args.overwrite_output_dir and resume_dir is None and accelerator.is_main_process:
        remove_tree(output_dir / CHECKPOINTS_DIR)
    return output_dir, resume_dir


def save_best_model(model, vocab, output_dir: Path) -> None:
    """``save_pretrained`` the model and the item vocabulary into ``output_dir``, each file replaced in one rename,
    so a kill mid-save leaves the previous best model readable."""
    staging = output_dir / BEST_MODEL_STAGING
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging)
        vocab.save_pretrained(staging)
        fsync_files(staging)
    except BaseException:  # e.g. a full disk: the previous best model is untouched
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in staging.iterdir():
        os.replace(path, output_dir / path.name)
    fsync_dir(output_dir)
    staging.rmdir()


def write_training_args(output_dir: Path, accelerator, arguments: tuple, model_overrides: dict) -> None:
    """``training_args.json``: every argument dataclass, with the output folder as resolved (not ``null``)."""
    merged = {key: value for group in arguments for key, value in dataclasses.asdict(group).items()}
    write_json_atomic(output_dir / TRAINING_ARGS_FILE, {
        **merged, "output_dir": str(output_dir), "model_overrides": model_overrides,
        "num_processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision})
