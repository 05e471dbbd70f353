"""Push a saved BlossomRec checkpoint folder to the Hugging Face Hub, or only render its model card.

    python scripts/push_to_hub.py --model_dir outputs/beauty --repo_id my-org/blossomrec-beauty [--private]
        [--revision BRANCH] [--create_pr] [--commit_message MSG] [--token TOKEN]
    python scripts/push_to_hub.py --model_dir outputs/beauty --card_only [--repo_id ...] [--card_output README.md]

The token comes from --token, else HF_TOKEN, else the `hf auth login` token file. HF_ENDPOINT selects another Hub.
"""

from __future__ import annotations

import argparse
import logging
import sys

from blossomrec_hf.hub import HubPublishError, push_to_hub, render_model_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", required=True, help="folder written by save_pretrained / scripts/train.py")
    parser.add_argument("--repo_id", help="namespace/name on the Hub (required unless --card_only)")
    parser.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                               "visibility)")
    parser.add_argument("--revision", help="branch to commit to (created from main if new); default main")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request against main instead")
    parser.add_argument("--commit_message", help="message of the commit carrying the model files")
    parser.add_argument("--token", help="Hub token with write access (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--card_only", action="store_true", help="render the model card and push nothing")
    parser.add_argument("--card_output", help="with --card_only: write the card here instead of stdout")
    parser.add_argument("--card_revision", help="with --card_only: the commit sha the card's usage code pins")
    parser.add_argument("--dataset", help="dataset name for the card (default: from training_args.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s")
    logging.getLogger("blossomrec_hf").setLevel(logging.INFO)
    if args.dataset and not args.card_only:
        parser.error("--dataset only applies with --card_only; a push names the dataset from training_args.json")
    if not args.card_only and not args.repo_id:
        parser.error("--repo_id is required to push (or pass --card_only)")

    from huggingface_hub.errors import HfHubHTTPError

    try:
        if args.card_only:
            card = render_model_card(args.model_dir, repo_id=args.repo_id, revision=args.card_revision,
                                     dataset=args.dataset)
            if args.card_output:
                with open(args.card_output, "w") as f:
                    f.write(card)
            else:
                sys.stdout.write(card)
            return 0
        result = push_to_hub(args.model_dir, args.repo_id, private=args.private, revision=args.revision,
                             create_pr=args.create_pr, commit_message=args.commit_message, token=args.token)
    except (HubPublishError, HfHubHTTPError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"pushed: {result}")
    print(f"load with: AutoModel.from_pretrained({args.repo_id!r}, trust_remote_code=True, "
          f"revision={result.weights_commit_sha!r}, code_revision={result.weights_commit_sha!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
