"""Publish a saved BlossomRec checkpoint to the Hugging Face Hub, with a model card rendered from `model_cards/`.

A pushed repo must let a stranger load the model by repo id with `trust_remote_code=True`, so the folder is checked
first: safetensors weights, a config whose `auto_map` names remote-code files that are present (with every file they
import relatively, and no import of this package, which a stranger does not have), and the item vocabulary. Only an
explicit list of files goes up; pickles (`*.bin`, `*.pt`, `*.pkl`, ...) never do. The JSON records
(`training_args.json`, `metrics.json`) go up without the training machine's paths, as the model card shows them.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import os
import re
import shlex
import string
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "model_cards" / "model_card_template.md"
VOCABULARY_FILE = "item_vocabulary.json"
OPTIONAL_RECORDS = ("training_args.json", "metrics.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
OWN_PACKAGE = __name__.split(".")[0]
_METRIC_KEY = re.compile(r"(?:(?P<split>test|eval|validation|valid)_)?(?P<name>recall|hr|hit|ndcg|mrr)@(?P<k>\d+)", re.I)
_SPLITS = {"test": "test", "eval": "validation", "validation": "validation", "valid": "validation"}
_BASELINES = ("popularity", "pop", "baseline", "random")
_NOT_REPRODUCED = ("push_to_hub", "hub_model_id", "resume_from_checkpoint", "overwrite_output_dir")
_METRIC_LABELS = {"recall": "Recall", "ndcg": "NDCG", "mrr": "MRR"}
_ATTENTION_DESCRIPTIONS = {
    "blossom": "BlossomRec attention combines long-term interest selection (block-sparse attention over the blocks of "
               "the history that matter most to each position) with short-term interest selection (the most recent "
               "items plus items 1, 2, 4, 8, ... steps back), {mixing}.",
    "dense": "This checkpoint uses dense causal attention in the BlossomRec backbone (a SASRec-style baseline for "
             "comparison with BlossomRec attention).",
}


def _attention_description(config: dict) -> str:
    """The card's sentence on the attention, with how this checkpoint's branches are mixed (`gate_type`)."""
    fixed = config.get("gate_type") == "fixed"
    mixing = "weighted equally (gate_type fixed: 0.5 each)" if fixed else "mixed by a learned gate"
    return _ATTENTION_DESCRIPTIONS.get(config.get("attention_type"), "").format(mixing=mixing)


class HubPublishError(Exception):
    """A push that cannot go ahead: no token, or a checkpoint folder a stranger could not load."""


@dataclasses.dataclass(frozen=True)
class PushResult:
    """Where a push landed: `commit_sha` is the new head (the model card), which pins `weights_commit_sha`."""

    repo_id: str
    commit_sha: str
    commit_url: str
    weights_commit_sha: str
    pr_url: str | None = None

    def __str__(self) -> str:
        return self.pr_url or self.commit_url


def resolve_token(token: str | None = None) -> str:
    """The explicit token, else the one huggingface_hub finds (HF_TOKEN, then the `hf auth login` token file)."""
    from huggingface_hub import constants, get_token

    token = token or get_token()
    if not token:
        raise HubPublishError(
            "No Hugging Face token found. Pass one with --token (token= in Python), set the HF_TOKEN environment "
            f"variable, or run `hf auth login` (it stores the token in {constants.HF_TOKEN_PATH}). "
            "The token needs write access to the target namespace."
        )
    return token


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise HubPublishError(f"{what} {path} is not readable JSON: {error}") from error


def _weight_files(model_dir: Path) -> list[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index, "The weight index").get("weight_map", {}).values()))
        missing = [shard for shard in shards if not (model_dir / shard).is_file()]
        if not shards or missing:
            raise HubPublishError(f"{index} lists weight shards that are missing: {missing or 'none listed'}")
        return [index.name, *shards]
    if not (model_dir / "model.safetensors").is_file():
        pickled = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (found {', '.join(pickled)}: pickled weights are never pushed)" if pickled else ""
        raise HubPublishError(f"{model_dir} has no model.safetensors{hint}; save the model with save_pretrained().")
    return ["model.safetensors"]


def _imports(path: Path) -> tuple[list[str], list[str]]:
    """Relative module names (as file paths) and absolute top-level packages that a Python file imports."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as error:
        raise HubPublishError(f"Remote-code file {path} does not parse: {error}") from error
    relative, absolute = [], []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level > 1 or not node.module:
                raise HubPublishError(
                    f"{path.name} uses `from {'.' * node.level}{node.module or ''} import ...`; remote code can only "
                    "import sibling files as `from .module import name`."
                )
            relative.append(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.ImportFrom):
            absolute.append(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            absolute.extend(alias.name.split(".")[0] for alias in node.names)
    return relative, absolute


def _remote_code_files(model_dir: Path, config: dict) -> list[str]:
    """The `.py` files `auto_map` names, and every file they import relatively, transitively."""
    auto_map = config.get("auto_map")
    if not isinstance(auto_map, dict) or not auto_map:
        raise HubPublishError(
            f"{model_dir / 'config.json'} has no auto_map, so AutoModel cannot find the model code: save the model "
            "with save_pretrained() from the blossomrec_hf classes."
        )
    references = [ref for value in auto_map.values() for ref in (value if isinstance(value, list) else [value]) if ref]
    pending = [ref.split("--")[-1].rsplit(".", 1)[0].replace(".", "/") + ".py" for ref in references]
    found: list[str] = []
    while pending:
        name = pending.pop()
        if name in found:
            continue
        if not (model_dir / name).is_file():
            raise HubPublishError(f"{model_dir} lacks {name}, which config.json's auto_map or the model code imports.")
        relative, absolute = _imports(model_dir / name)
        if OWN_PACKAGE in absolute:
            raise HubPublishError(
                f"{name} imports {OWN_PACKAGE}, which people loading the model from the Hub do not have installed."
            )
        found.append(name)
        pending.extend(relative)
    return sorted(found)


def _refuse_secrets(args, name: str) -> None:
    """Training arguments are published as they are: a recorded access token would leak with them."""
    leaked = [key for key, value in (args.items() if isinstance(args, dict) else ())
              if "token" in key.lower() and isinstance(value, str) and value]
    if leaked:
        raise HubPublishError(f"{name} records {', '.join(leaked)}; remove the access token before publishing it.")


def collect_upload_files(model_dir: str | Path) -> list[str]:
    """Check that `model_dir` holds what a stranger needs and return the files to upload (relative names).

    Uploaded: the safetensors weights, config.json (and generation_config.json), the remote-code closure, the item
    vocabulary and any other top-level JSON record (training_args.json, metrics.json, ...). Anything else is skipped
    and named in a warning; pickles are never uploaded.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise HubPublishError(f"Model folder {model_dir} does not exist.")
    if not (model_dir / "config.json").is_file():
        raise HubPublishError(f"{model_dir} has no config.json; save the model with save_pretrained().")
    config = _read_json(model_dir / "config.json", "The model config")
    if not (model_dir / VOCABULARY_FILE).is_file():
        raise HubPublishError(
            f"{model_dir} has no {VOCABULARY_FILE}: without it, nobody can map the model's item ids back to items. "
            "Save the vocabulary next to the model (ItemVocabulary.save_pretrained)."
        )
    files = set(_weight_files(model_dir)) | set(_remote_code_files(model_dir, config))
    files |= {"config.json", VOCABULARY_FILE} | {name for name in OPTIONAL_RECORDS if (model_dir / name).is_file()}
    if (model_dir / "training_args.json").is_file():
        _refuse_secrets(_read_json(model_dir / "training_args.json", "The training arguments"), "training_args.json")
    missing_records = [name for name in OPTIONAL_RECORDS if name not in files]
    if missing_records:
        logger.warning("%s has no %s; the model card will say they were not recorded.", model_dir, missing_records)
    skipped = sorted(p.name + ("/" if p.is_dir() else "") for p in model_dir.iterdir() if p.name not in files)
    if skipped:
        logger.warning("Not uploading %s (only weights, config, remote code and JSON records go up; never pickles).",
                       ", ".join(skipped))
    return sorted(files)


def _metric_rows(metrics, path=()) -> list[tuple[str, str, str, float]]:
    """(method, split, metric, value) for every metric leaf such as "ndcg@10" or "test_recall@5", at any depth."""
    rows = []
    for key, value in metrics.items() if isinstance(metrics, dict) else ():
        match = _METRIC_KEY.fullmatch(str(key))
        if match and isinstance(value, (int, float)) and not isinstance(value, bool):
            words = [str(p) for p in path]
            split = _SPLITS.get((match["split"] or "").lower()) or next(
                (_SPLITS[w.lower()] for w in words if w.lower() in _SPLITS), "test")
            method = "/".join(w for w in words if w.lower() not in _SPLITS) or "model"
            name = {"hr": "recall", "hit": "recall"}.get(match["name"].lower(), match["name"].lower())
            rows.append((method, split, f"{name}@{match['k']}", float(value)))
        elif isinstance(value, dict):
            rows.extend(_metric_rows(value, (*path, key)))
    return rows


def _metric_order(metric: str) -> tuple[int, int]:
    name, k = metric.split("@")
    return list(_METRIC_LABELS).index(name), int(k)


def _is_baseline(method: str) -> bool:
    return any(word in _BASELINES for word in re.split(r"[^a-z]+", method.lower()))


def _protocol(metrics: dict) -> str:
    """One sentence on how the recorded metrics were measured (train.py records eval_mode and exclude_history)."""
    ranking = {"full": "Full ranking over all items", "uni100": "Ranking against 100 sampled items the user never "
               "interacted with (uni100, comparable to papers, inflated compared with full ranking)"}
    sentence = ranking.get(metrics.get("eval_mode"), "Ranking metrics") + ", leave-one-out in time order (the last " \
        "item of each history is the test target, the one before it the validation target)"
    if metrics.get("exclude_history"):
        sentence += "; items already in a user's history are not ranked"
    return sentence + ", as recorded in `metrics.json`:"


def _results_section(metrics: dict, rows) -> str:
    if not rows:
        return "No metrics were recorded with this checkpoint (no `metrics.json`)."
    columns = sorted({metric for _, _, metric, _ in rows}, key=_metric_order)
    table = {}
    for method, split, metric, value in rows:
        table.setdefault(("this model" if method == "model" else method, split), {})[metric] = value
    lines = ["| method | split | " + " | ".join(columns) + " |", "|---|---|" + "---:|" * len(columns)]
    for (method, split), values in sorted(table.items(), key=lambda item: (_is_baseline(item[0][0]), item[0])):
        cells = [f"{values[c]:.4f}" if c in values else "" for c in columns]
        lines.append(f"| {method} | {split} | " + " | ".join(cells) + " |")
    return _protocol(metrics) + "\n\n" + "\n".join(lines)


def _model_index(model_name: str, dataset: str, rows) -> str:
    results = {}
    for _, split, metric, value in sorted((row for row in rows if not _is_baseline(row[0])),
                                         key=lambda row: _metric_order(row[2])):
        name, k = metric.split("@")
        results.setdefault(split, []).append({"type": metric, "value": round(value, 6),
                                              "name": f"{_METRIC_LABELS[name]}@{k}"})
    if not results:
        return ""
    entries = [{"task": {"type": "sequential-recommendation", "name": "Sequential recommendation"},
                "dataset": {"type": dataset, "name": dataset, "split": split}, "metrics": metrics}
               for split, metrics in sorted(results.items())]
    return yaml.safe_dump({"model-index": [{"name": model_name, "results": entries}]}, sort_keys=False)


# Flags of scripts/train.py whose values are paths on the training machine: the card and the uploaded records show
# only their last part.
_PATH_FLAGS = ("dataset", "output_dir", "resume_from_checkpoint")
_DATA_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".dat", ".inter", ".parquet", ".pq", ".json", ".jsonl", ".gz", ".zip",
                       ".arrow", ".feather")


def _is_local_path(value: str) -> bool:
    """Whether a recorded --dataset names a local file or folder rather than "synthetic" or a Hub dataset id."""
    if value == "synthetic" or value.startswith("hf://"):
        return False
    if value.startswith(("/", "./", "../", "~", "\\")) or re.match(r"^[A-Za-z]:[\\/]", value):
        return True
    if os.path.exists(value):
        return True
    return value.count("/") > 1 or value.lower().endswith(_DATA_FILE_SUFFIXES)  # Hub ids are "name" or "org/name"


def _portable(flag: str, value) -> str:
    """A flag's value as the card shows it: a local path by its last part (never the training machine's layout)."""
    value = str(value)
    if flag == "output_dir" or (flag == "resume_from_checkpoint" and value != "latest") or \
            (flag == "dataset" and _is_local_path(value)):
        return Path(value.rstrip("/\\")).name or value
    return value


def _portable_command(tokens: list[str]) -> list[str]:
    """A recorded command line without the training machine's paths: interpreter, script and path flags."""
    result = []
    for index, token in enumerate(tokens):
        flag = tokens[index - 1][2:] if index and tokens[index - 1].startswith("--") else None
        if index == 0 and "/" in token and Path(token).name.startswith("python"):
            token = "python"
        elif token.endswith("train.py"):
            token = "scripts/train.py"
        elif token.startswith("--") and "=" in token and token[2:].split("=", 1)[0] in _PATH_FLAGS:
            name, value = token[2:].split("=", 1)
            token = f"--{name}={_portable(name, value)}"
        elif flag in _PATH_FLAGS:
            token = _portable(flag, token)
        result.append(token)
    return result


def portable_record(record):
    """A JSON record (training_args.json, metrics.json) as it is uploaded: the training machine's paths (dataset
    file, output folder, checkpoint, a recorded command's interpreter and script) by their last part, as the model
    card shows them; everything else as it is. The local file is not changed."""
    if not isinstance(record, dict):
        return record
    portable = {key: _portable(key, value) if key in _PATH_FLAGS and isinstance(value, str) else value
                for key, value in record.items()}
    command = record.get("command")
    if isinstance(command, str) and command:
        portable["command"] = shlex.join(_portable_command(shlex.split(command)))
    elif isinstance(command, list):
        portable["command"] = _portable_command([str(token) for token in command])
    return portable


def _upload_content(model_dir: Path, name: str) -> str | bytes:
    """What goes up for ``name``: the file itself, or for a JSON record its portable copy."""
    if name not in OPTIONAL_RECORDS:
        return str(model_dir / name)
    record = _read_json(model_dir / name, f"The record {name}")
    return (json.dumps(portable_record(record), indent=2) + "\n").encode()


def _training_command(args) -> str:
    """The command that trains this model again: a recorded "command", else the non-default train.py arguments.

    Paths of the training machine (the dataset file, the output folder, the interpreter) show only their last part.
    """
    if not isinstance(args, dict):
        return "# the training command was not recorded (no training_args.json)"
    if args.get("command"):
        command = args["command"]
        tokens = shlex.split(command) if isinstance(command, str) else [str(token) for token in command]
        return shlex.join(_portable_command(tokens))
    from .training_args import DataArguments, EvaluationArguments, TrainingArguments

    defaults = {field.name: field.default for arguments in (DataArguments, EvaluationArguments, TrainingArguments)
                for field in dataclasses.fields(arguments)}
    flags = {key: value for key, value in args.items()
             if key in defaults and key not in _NOT_REPRODUCED and value != defaults[key]}
    if args.get("model_overrides"):  # the merged config flags and --config_overrides, given back as flags
        flags.pop("config_overrides", None)
        flags.update(args["model_overrides"])
    launcher = ["python"]
    if args.get("num_processes", 1) > 1 or args.get("mixed_precision", "no") != "no":
        launcher = ["accelerate", "launch", f"--num_processes={args.get('num_processes', 1)}",
                    f"--mixed_precision={args.get('mixed_precision', 'no')}"]
    return shlex.join([*launcher, "scripts/train.py", *(str(part) for key, value in flags.items()
                                                         for part in (f"--{key}", _portable(key, value)))])


def _recorded_dataset(args) -> str | None:
    return next((str(args[key]) for key in ("dataset", "dataset_name", "data")
                 if isinstance(args, dict) and args.get(key)), None)


def _dataset_name(args) -> str | None:
    """The dataset training_args.json names: a Hub id as it is, a local file by its stem ("Beauty.txt" -> "Beauty")."""
    value = _recorded_dataset(args)
    if value is None:
        return None
    if value.startswith("hf://"):
        return value[len("hf://"):]
    return Path(value.rstrip("/\\")).stem if _is_local_path(value) else value


def _dataset_note(args) -> str:
    """For a local dataset file: say that the card's command shows only its name."""
    value = _recorded_dataset(args)
    if value is None or not _is_local_path(value):
        return ""
    name = _portable("dataset", value)
    kind = "file" if Path(name).suffix else "folder"
    return f"`{name}` was a local {kind} on the training machine: give `--dataset` the path of your copy. "


def _training_length(config: dict, args) -> int | None:
    """The history length the model was trained and evaluated at: --max_seq_length, which scripts/train.py also
    stores as max_position_embeddings - 1 (a training window is max_seq_length inputs plus the next item)."""
    if isinstance(args, dict) and isinstance(args.get("max_seq_length"), int):
        return args["max_seq_length"]
    table = config.get("max_position_embeddings")
    return table - 1 if isinstance(table, int) and table > 1 else None


def _vocabulary_code(vocabulary) -> tuple[str, list[str]]:
    """Card code that maps ids both ways with item_vocabulary.json (``{"items": [...]}``), and a few external ids."""
    if not isinstance(vocabulary, dict) or not isinstance(vocabulary.get("items"), list):
        raise HubPublishError(f'{VOCABULARY_FILE} is not an item vocabulary: expected {{"items": [...]}}.')
    code = ('to_external = dict(enumerate(vocabulary["items"], start=1))  # internal id -> external id\n'
            "to_internal = {item: i for i, item in to_external.items()}")
    return code, [str(item) for item in vocabulary["items"][:3]]


def _num_parameters(model_dir: Path) -> str:
    from safetensors import safe_open

    total = 0
    for name in _weight_files(model_dir):
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(model_dir / name), framework="np") as weights:
                    for key in weights.keys():
                        count = 1
                        for size in weights.get_slice(key).get_shape():
                            count *= size
                        total += count
            except Exception as error:  # safetensors raises its own error types for a corrupt header
                raise HubPublishError(f"{model_dir / name} is not a readable safetensors file: {error}") from error
    return f"{total:,}"


def render_model_card(model_dir: str | Path, *, repo_id: str | None = None, revision: str | None = None,
                      dataset: str | None = None, template: str | Path | None = None) -> str:
    """The README.md for `model_dir`: the template filled from config.json, metrics.json and training_args.json.

    `revision` is the commit the usage code pins (push_to_hub passes the commit holding the weights); without it the
    code loads "main" and says to pin a commit. `dataset` overrides the dataset name found in training_args.json.
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json", "The model config")
    args = _read_json(model_dir / "training_args.json", "The training arguments") \
        if (model_dir / "training_args.json").is_file() else None
    metrics = _read_json(model_dir / "metrics.json", "The metrics") if (model_dir / "metrics.json").is_file() else {}
    vocabulary_code, examples = _vocabulary_code(_read_json(model_dir / VOCABULARY_FILE, "The item vocabulary"))
    template_path = Path(template) if template else TEMPLATE_PATH
    if not template_path.is_file():
        raise HubPublishError(f"Model card template {template_path} not found (pass template=...).")

    dataset = dataset or _dataset_name(args)
    dataset_name = dataset or "an unrecorded dataset"
    length = _training_length(config, args)
    position_encoding = config.get("position_embedding_type", "n/a")
    if position_encoding == "absolute":
        position_encoding += f" (a table of {config.get('max_position_embeddings')} positions)"
    model_name = repo_id.split("/")[-1] if repo_id else f"BlossomRec ({dataset_name})"
    rows = _metric_rows(metrics)
    code_files = ", ".join(f"`{name}`" for name in _remote_code_files(model_dir, config))
    values = {
        "datasets_yaml": yaml.safe_dump({"datasets": [dataset]}) if dataset else "",
        "model_index_yaml": _model_index(model_name, dataset_name, rows),
        "model_name": model_name,
        "dataset_name": dataset_name,
        "num_parameters": _num_parameters(model_dir),
        "results_section": _results_section(metrics, rows),
        "repo_id": repo_id or "<namespace>/<model-name>",
        "revision": revision or "main",
        "revision_comment": "the commit that published these weights" if revision
        else "replace with a full commit sha from this repo's history",
        "attention_description": _attention_description(config),
        "vocabulary_code": vocabulary_code,
        "example_history": repr(examples),
        "training_command": _training_command(args),
        "dataset_note": _dataset_note(args),
        "training_histories": f"up to {length} items (training windows: {length} input items + the next item as "
                              f"target)" if length else "not recorded",
        "history_limitation": f"It was trained and evaluated on histories of up to {length} items (training windows "
                              f"of {length} input items plus the next item as target); give it a user's most recent "
                              f"{length} items: longer histories were never seen in training."
        if length else "The history length it was trained at was not recorded.",
        "position_encoding": position_encoding,
        "code_files": code_files,
        **{key: config.get(key, "n/a") for key in (
            "n_items", "attention_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads")},
    }
    card = string.Template(template_path.read_text()).substitute(values)
    front_matter = card.split("---\n")[1]
    if not isinstance(yaml.safe_load(front_matter), dict):
        raise HubPublishError(f"The rendered model card metadata is not a YAML mapping; check {template_path}.")
    return card


def push_to_hub(model_dir: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
                create_pr: bool = False, commit_message: str | None = None, token: str | None = None) -> PushResult:
    """Upload a saved checkpoint to `repo_id` (created if needed), then a model card pinned to that upload.

    Two commits: the first carries the weights, config, remote code and records; the second the README.md whose
    usage code pins `revision` to the first. `revision` is a branch (created from main if new); `create_pr` opens a
    pull request against main instead of committing to it.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    if create_pr and revision not in (None, "main"):
        raise HubPublishError("create_pr opens a pull request against main; use either revision or create_pr.")
    model_dir = Path(model_dir)
    files = collect_upload_files(model_dir)
    render_model_card(model_dir, repo_id=repo_id)  # fail before any upload if the card cannot be rendered
    api = HfApi(token=resolve_token(token))
    user = api.whoami()["name"]
    logger.info("Pushing %s to %s as %s", model_dir, repo_id, user)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision not in (None, "main") and not create_pr:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    weights = api.create_commit(
        repo_id, [CommitOperationAdd(path_in_repo=name, path_or_fileobj=_upload_content(model_dir, name))
                  for name in files],
        commit_message=commit_message or "Upload BlossomRec model", revision=revision, create_pr=create_pr)
    card = render_model_card(model_dir, repo_id=repo_id, revision=weights.oid)
    head = api.create_commit(
        repo_id, [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())],
        commit_message=f"Model card pinned to {weights.oid[:12]}",
        revision=weights.pr_revision or revision)
    result = PushResult(repo_id, head.oid, head.commit_url, weights.oid, weights.pr_url)
    logger.info("Pushed %s (weights commit %s)", result, weights.oid)
    return result
