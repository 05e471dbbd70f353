"""Publishing to the Hub: folder checks, the model card, and the push/load round trip through the Hub stand-in.

The round trip runs the real CLI and a fresh Python process per step, with HF_ENDPOINT pointing at the stand-in
(huggingface_hub reads it at import) and fresh caches, as a stranger loading the model by repo id would.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation
from blossomrec_hf.hub import PICKLE_SUFFIXES, HubPublishError, collect_upload_files, push_to_hub, render_model_card
from hub_standin import DEFAULT_TOKEN, HubStandIn

REPO_ROOT = Path(__file__).resolve().parent.parent
PUSH_SCRIPT = REPO_ROOT / "scripts" / "push_to_hub.py"
HISTORIES = [[0, 0, 0, 0, 3, 1, 4, 1, 5, 9, 2, 6], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 8]]
METRICS = {"dataset": "synthetic", "eval_mode": "full", "exclude_history": False,  # laid out as scripts/train.py does
           "validation": {"model": {"recall@10": 0.3, "ndcg@10": 0.15, "num_users": 2},
                          "popularity": {"recall@10": 0.05, "ndcg@10": 0.02, "num_users": 2}},
           "test": {"model": {"recall@10": 0.25, "ndcg@10": 0.125, "num_users": 2},
                    "popularity": {"recall@10": 0.04, "ndcg@10": 0.01, "num_users": 2}}}
TRAINING_ARGS = {"dataset": "synthetic", "max_seq_length": 11, "num_train_epochs": 1, "push_to_hub": True,
                 "hub_model_id": "org/tiny", "model_overrides": {"hidden_size": 16}, "num_processes": 1,
                 "mixed_precision": "no"}  # a part of what scripts/train.py records
CODE_MARKER = "SECOND_PUSH = True"
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE")

# Run in a fresh process: load by repo id at each (revision, code_revision), then run the model card's usage code.
LOADER = """
import inspect, json, re, sys
import torch
from huggingface_hub import hf_hub_download
from transformers import AutoModel

repo_id, histories, loads, marker = json.loads(sys.argv[1])
results = []
for revision, code_revision in loads:
    model = AutoModel.from_pretrained(repo_id, trust_remote_code=True, revision=revision, code_revision=code_revision)
    with torch.no_grad():
        scores = model.eval()(torch.tensor(histories), logits_to_keep=1).logits[:, -1]
    source = open(inspect.getsourcefile(type(model))).read()
    results.append({"scores": scores.tolist(), "second_push_code": marker in source})
card = open(hf_hub_download(repo_id, "README.md")).read()
exec(re.search(r"```python\\n(.*?)```", card, re.S).group(1), {})
print(json.dumps({"loads": results, "imported_blossomrec_hf": "blossomrec_hf" in sys.modules}))
"""


def save_tiny_model(directory: Path, seed: int) -> list:
    """Save a small BlossomRec checkpoint as scripts/train.py leaves it; return its scores on HISTORIES."""
    torch.manual_seed(seed)
    config = BlossomRecConfig(n_items=40, max_position_embeddings=12, hidden_size=16, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
                              compress_block_size=4, compress_stride=2, selection_block_size=2,
                              num_selected_blocks=2, stis_window=2)
    model = BlossomRecForSequentialRecommendation(config).eval()
    model.save_pretrained(directory)
    vocabulary = {"padding_id": 0, "items": [f"sku-{i}" for i in range(1, 41)]}  # as ItemVocabulary saves it
    (directory / "item_vocabulary.json").write_text(json.dumps(vocabulary))
    (directory / "metrics.json").write_text(json.dumps(METRICS))
    (directory / "training_args.json").write_text(json.dumps(TRAINING_ARGS))
    with torch.no_grad():
        return model(torch.tensor(HISTORIES), logits_to_keep=1).logits[:, -1].tolist()


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "model"
    return directory, save_tiny_model(directory, seed=0)


@pytest.fixture
def model_dir(saved_model, tmp_path):
    """A fresh copy of the saved checkpoint, plus the pickles a Trainer run leaves behind (never to be pushed)."""
    directory = shutil.copytree(saved_model[0], tmp_path / "model")
    (directory / "training_args.bin").write_bytes(b"pickle")
    (directory / "optimizer.pt").write_bytes(b"pickle")
    (directory / "runs").mkdir()
    return directory


def hub_env(hub: HubStandIn, home: Path, token: str | None) -> dict:
    env = {key: value for key, value in os.environ.items()
           if key not in (*TOKEN_VARIABLES, "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(home), HF_MODULES_CACHE=str(home / "modules"),
               HF_HUB_DISABLE_TELEMETRY="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "src"),
                                                                         env.get("PYTHONPATH", "")]))
    if token:
        env["HF_TOKEN"] = token
    return env


def run_push(hub, home, model_dir, *extra) -> str:
    """Push with the CLI in a fresh process; return the weights commit sha it reports."""
    done = subprocess.run([sys.executable, str(PUSH_SCRIPT), "--model_dir", str(model_dir), *extra],
                          env=hub_env(hub, home, DEFAULT_TOKEN), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.split("revision='")[1].split("'")[0]


def test_only_what_a_stranger_needs_goes_up_and_never_pickles(model_dir):
    files = collect_upload_files(model_dir)
    saved_code = {path.name for path in model_dir.glob("*.py")}
    assert {"model.safetensors", "config.json", "item_vocabulary.json", "training_args.json", "metrics.json"} < set(files)
    assert {"configuration_blossomrec.py", "modeling_blossomrec.py"} <= saved_code
    assert {name for name in files if name.endswith(".py")} == saved_code
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]


def _drop(name):
    return lambda directory: (directory / name).unlink()


def _import_own_package(directory):
    with open(directory / "modeling_blossomrec.py", "a") as f:
        f.write("\nfrom blossomrec_hf.model import BlossomRecConfig\n")


def _record_a_token(directory):
    (directory / "training_args.json").write_text(json.dumps({"dataset": "synthetic", "hub_token": "hf_secret"}))


def _no_auto_map(directory):
    config = json.loads((directory / "config.json").read_text())
    del config["auto_map"]
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("break_folder, message", [
    (_drop("model.safetensors"), "no model.safetensors .*pickled weights are never pushed"),
    (_drop("item_vocabulary.json"), "no item_vocabulary.json"),
    (_drop("configuration_blossomrec.py"), "lacks configuration_blossomrec.py"),
    (_no_auto_map, "no auto_map"),
    (_import_own_package, "imports blossomrec_hf"),
    (_record_a_token, "records hub_token; remove the access token"),
])
def test_folders_a_stranger_could_not_load_are_refused(model_dir, break_folder, message):
    break_folder(model_dir)
    with pytest.raises(HubPublishError, match=message):
        collect_upload_files(model_dir)


def test_a_relatively_imported_code_file_is_required(model_dir):
    imported = next(path.name for path in model_dir.glob("*.py")
                    if path.name not in ("configuration_blossomrec.py", "modeling_blossomrec.py"))
    (model_dir / imported).unlink()
    with pytest.raises(HubPublishError, match=f"lacks {imported}"):
        collect_upload_files(model_dir)


def test_model_card_metadata_usage_and_card_only_mode(model_dir, tmp_path):
    card = render_model_card(model_dir, repo_id="org/tiny", revision="a" * 40)
    data = ModelCard(card).data
    assert data.library_name == "transformers"
    assert {"recommendation", "sequential-recommendation", "custom_code", "blossomrec"} <= set(data.tags)
    assert data.datasets == ["synthetic"]
    measured = {(result.dataset_split, result.metric_type): result.metric_value for result in data.eval_results}
    assert measured == {("test", "recall@10"): 0.25, ("test", "ndcg@10"): 0.125,
                        ("validation", "recall@10"): 0.3, ("validation", "ndcg@10"): 0.15}  # no baseline rows
    assert f'revision = "{"a" * 40}"' in card and 'repo_id = "org/tiny"' in card
    assert "code_revision=revision" in card
    assert "python scripts/train.py --max_seq_length 11 --num_train_epochs 1 --hidden_size 16\n" in card
    assert "Full ranking over all items" in card

    script = runpy.run_path(str(PUSH_SCRIPT), run_name="push_to_hub_cli")
    output = tmp_path / "README.md"
    assert script["main"](["--model_dir", str(model_dir), "--card_only", "--repo_id", "org/tiny",
                           "--card_revision", "a" * 40, "--card_output", str(output)]) == 0
    assert output.read_text() == card


def test_push_without_a_token_names_where_tokens_come_from(model_dir, tmp_path, monkeypatch, capsys):
    for variable in TOKEN_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    script = runpy.run_path(str(PUSH_SCRIPT), run_name="push_to_hub_cli")
    assert script["main"](["--model_dir", str(model_dir), "--repo_id", "org/tiny"]) == 2
    error = capsys.readouterr().err
    assert "No Hugging Face token" in error and "HF_TOKEN" in error and "hf auth login" in error
    assert "--token" in error


def test_push_then_load_by_repo_id_with_pinned_revisions(saved_model, model_dir, tmp_path):
    first_scores = saved_model[1]
    with HubStandIn() as hub:
        first = run_push(hub, tmp_path / "push1", model_dir, "--repo_id", "org/tiny")
        second_scores = save_tiny_model(model_dir, seed=1)
        with open(model_dir / "modeling_blossomrec.py", "a") as f:
            f.write(f"\n{CODE_MARKER}\n")
        second = run_push(hub, tmp_path / "push2", model_dir, "--repo_id", "org/tiny", "--commit_message", "v2")

        loads = [(first, first), ("main", None), (second, first)]
        done = subprocess.run([sys.executable, "-c", LOADER, json.dumps(["org/tiny", HISTORIES, loads, CODE_MARKER])],
                              env=hub_env(hub, tmp_path / "stranger", token=None), cwd=tmp_path,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
        loaded = json.loads(done.stdout.strip().splitlines()[-1])

        api = HfApi(endpoint=hub.url)
        files = api.list_repo_files("org/tiny")
        card = Path(hf_hub_download("org/tiny", "README.md", endpoint=hub.url, cache_dir=tmp_path / "cache"))

    assert first_scores != second_scores
    pinned_first, latest, new_weights_old_code = loaded["loads"]
    assert pinned_first == {"scores": first_scores, "second_push_code": False}
    assert latest == {"scores": second_scores, "second_push_code": True}
    assert new_weights_old_code == {"scores": second_scores, "second_push_code": False}
    assert not loaded["imported_blossomrec_hf"]
    assert "README.md" in files and "model.safetensors" in files and "item_vocabulary.json" in files
    assert not [name for name in files if name.endswith(PICKLE_SUFFIXES)]
    assert f'revision = "{second}"' in card.read_text()


def test_push_to_a_branch_and_as_a_pull_request(model_dir, monkeypatch):
    with HubStandIn() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        api = HfApi(endpoint=hub.url, token=DEFAULT_TOKEN)
        on_branch = push_to_hub(model_dir, "org/branchy", revision="experiment", token=DEFAULT_TOKEN)
        proposal = push_to_hub(model_dir, "org/branchy", create_pr=True, token=DEFAULT_TOKEN)
        main_files = api.list_repo_files("org/branchy")
        branch_files = api.list_repo_files("org/branchy", revision="experiment")
        pr_files = api.list_repo_files("org/branchy", revision="refs/pr/1")
        with pytest.raises(HubPublishError, match="either revision or create_pr"):
            push_to_hub(model_dir, "org/branchy", revision="experiment", create_pr=True, token=DEFAULT_TOKEN)

    assert main_files == [".gitattributes"]
    assert "model.safetensors" in branch_files and "README.md" in branch_files
    assert proposal.pr_url.endswith("/org/branchy/discussions/1") and "README.md" in pr_files
    assert on_branch.commit_sha != on_branch.weights_commit_sha


def test_uploaded_records_hold_no_local_paths_and_the_local_files_stay(model_dir, tmp_path):
    local = {**TRAINING_ARGS, "dataset": "/home/alice/data/Beauty.txt", "output_dir": "/home/alice/runs/beauty-blossom",
             "resume_from_checkpoint": "/home/alice/runs/beauty-blossom/checkpoints/step-40",
             "command": "/home/alice/venv/bin/python /home/alice/blossomrec-hf/scripts/train.py "
                        "--dataset /home/alice/data/Beauty.txt --output_dir=/home/alice/runs/beauty-blossom"}
    (model_dir / "training_args.json").write_text(json.dumps(local))
    (model_dir / "metrics.json").write_text(json.dumps({**METRICS, "dataset": "/home/alice/data/Beauty.txt"}))
    before = {name: (model_dir / name).read_bytes() for name in ("training_args.json", "metrics.json")}
    with HubStandIn() as hub:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
            push_to_hub(model_dir, "org/records", token=DEFAULT_TOKEN)
        uploaded = {name: json.loads(Path(hf_hub_download("org/records", name, endpoint=hub.url,
                                                          cache_dir=tmp_path / "cache")).read_text())
                    for name in before}

    args = uploaded["training_args.json"]
    assert (args["dataset"], args["output_dir"], args["resume_from_checkpoint"]) == \
        ("Beauty.txt", "beauty-blossom", "step-40")
    assert args["command"] == "python scripts/train.py --dataset Beauty.txt --output_dir=beauty-blossom"
    paths = ("dataset", "output_dir", "resume_from_checkpoint", "command")
    assert {key: value for key, value in args.items() if key not in paths} == \
        {key: value for key, value in local.items() if key not in paths}  # nothing else changed
    assert uploaded["metrics.json"] == {**METRICS, "dataset": "Beauty.txt"}
    assert "/home/alice" not in json.dumps(uploaded)
    assert {name: (model_dir / name).read_bytes() for name in before} == before
