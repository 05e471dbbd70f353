"""The rendered model card: no paths of the training machine, the project the training script comes from, and the
history length the model was really trained at (windows of max_seq_length inputs plus the next item as target)."""

import json
import re
from pathlib import Path

import pytest
import torch

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.hub import render_model_card

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint as scripts/train.py leaves it for --max_seq_length 11: max_position_embeddings = 12."""
    directory = tmp_path_factory.mktemp("card") / "model"
    torch.manual_seed(0)
    config = BlossomRecConfig(n_items=20, max_position_embeddings=12, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                              compress_block_size=4, compress_stride=2, selection_block_size=2,
                              num_selected_blocks=2, stis_window=2)
    BlossomRecForSequentialRecommendation(config).save_pretrained(directory)
    (directory / "item_vocabulary.json").write_text(json.dumps({"items": [f"sku-{i}" for i in range(1, 21)]}))
    return directory


def card_for(directory, args):
    (directory / "training_args.json").write_text(json.dumps(args))
    return render_model_card(directory, repo_id="org/tiny")


def section(card, title):
    return card.split(f"## {title}\n")[1].split("\n## ")[0]


def test_training_section_shows_no_local_path_and_names_the_project(saved):
    card = card_for(saved, {"dataset": "/home/alice/private/data/Beauty.txt", "max_seq_length": 11,
                            "output_dir": "/home/alice/runs/beauty", "num_train_epochs": 5})
    assert "/home/alice" not in card and "private" not in card
    training = section(card, "Training")
    assert "python scripts/train.py --dataset Beauty.txt --max_seq_length 11 --output_dir beauty " in training
    assert "`Beauty.txt` was a local file on the training machine" in training
    assert "blossomrec-hf" in training and "`scripts/train.py` of **blossomrec-hf**" in training
    assert "It was trained on\n**Beauty**." in card
    assert "mixed by a learned gate." in card  # gate_type learned, the default


def test_a_hub_dataset_id_and_a_recorded_command_are_shown_portably(saved):
    card = card_for(saved, {"dataset": "someorg/beauty-logs", "max_seq_length": 11})
    assert "--dataset someorg/beauty-logs" in card and "was a local" not in card
    command = ["/opt/venv/bin/python3", "/srv/checkout/scripts/train.py", "--dataset=../data/ml-1m/ratings.dat",
               "--output_dir", "/scratch/run7", "--max_seq_length", "11"]
    card = card_for(saved, {"dataset": "../data/ml-1m/ratings.dat", "max_seq_length": 11, "command": command})
    assert "python scripts/train.py --dataset=ratings.dat --output_dir run7 --max_seq_length 11\n" in card
    assert not re.search(r"/opt/|/srv/|/scratch/|\.\./data", card)


def test_history_length_is_max_seq_length_not_the_window_of_max_seq_length_plus_one(saved):
    for args in ({"dataset": "synthetic", "max_seq_length": 11}, {"dataset": "synthetic"}):  # from config when absent
        card = card_for(saved, args)
        assert "up to 11 items (training windows: 11 input items + the next item as target)" in card
        assert "histories of up to 11 items" in section(card, "Limitations")
        assert not re.search(r"up to 12 items|windows of up to", card)


def test_the_committed_beauty_card_is_the_current_template_rendered():
    card = (REPO_ROOT / "model_cards" / "blossomrec-beauty.md").read_text()
    training = section(card, "Training")
    assert "--dataset Beauty.txt" in training and "--output_dir beauty-blossom" in training
    assert "../.data" not in card and "/tmp/" not in card
    assert "blossomrec-hf" in training
    assert "up to 50 items" in card and "51 items" not in card
    # the README's Beauty recipe (chosen on validation): every branch weighted 0.5, as the card says
    assert "--gate_type fixed" in training and "weighted equally (gate_type fixed: 0.5 each)." in card
