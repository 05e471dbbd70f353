"""Train a BlossomRec (or dense SASRec-style) next-item recommender with Accelerate.

    accelerate launch -q scripts/train.py                                   # built-in synthetic data, a few minutes
    accelerate launch -q scripts/train.py --dataset ../shared/data/Beauty.txt --max_seq_length 50
    accelerate launch -q --multi_gpu --num_processes 2 scripts/train.py ...  # same run on two GPUs
    accelerate launch -q scripts/train.py --resume_from_checkpoint latest    # continue an interrupted run
    accelerate launch -q scripts/train.py --torch_compile                    # compiled steps, batches of one shape

The best model by validation NDCG@10 is saved in ``output_dir`` (``save_pretrained``: safetensors and remote code,
plus the item vocabulary, ``training_args.json``, ``metrics.json`` and ``training_curves.png``);
``output_dir/checkpoints`` holds the resumable checkpoints. SIGINT/SIGTERM write a checkpoint at the next step and
exit (the README says how long launchers wait for that); the same signal again stops at once. Bad input is one
``error: ...`` line and exit status 2; repeated events in the data are one ``warning: ...`` line. The loop itself is
``blossomrec_hf.training.train``.
"""

import sys
import warnings

from accelerate import Accelerator
from transformers.utils import logging as transformers_logging

from blossomrec_hf.data import DataWarning, one_line_data_warnings
from blossomrec_hf.errors import EXIT_INTERRUPTED
from blossomrec_hf.training import train
from blossomrec_hf.training_args import parse_training_arguments


def main(argv: list[str] | None = None) -> None:
    one_line_data_warnings()
    data_args, eval_args, args, model_overrides = parse_training_arguments(argv)
    transformers_logging.disable_progress_bar()  # one progress bar: ours
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(args.resolve_output_dir(data_args.dataset)),
    )
    if not accelerator.is_main_process:  # every process reads the data: its warnings are printed once
        warnings.simplefilter("ignore", DataWarning)
    try:
        status = train(accelerator, data_args, eval_args, args, model_overrides)
    except KeyboardInterrupt:  # a second Ctrl-C, while the first one's checkpoint was awaited
        print("interrupted: stopped at once, without a new checkpoint", file=sys.stderr)
        raise SystemExit(EXIT_INTERRUPTED) from None
    # Only once the model and data loaders of `train` are gone: destroying the process group first hangs gloo.
    accelerator.end_training()
    raise SystemExit(status)


if __name__ == "__main__":
    main()
