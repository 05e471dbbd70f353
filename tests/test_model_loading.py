"""Loading is strict: safetensors only, config.json must match the weights, and every weight must be finite.

transformers itself loads a `pytorch_model.bin` through its pickle loader, and a config that disagrees with the
weights with a warning only (missing layers random, extra ones dropped); BlossomRec refuses all of these, through
`from_pretrained` of our package and through `AutoModel` with the checkpoint's own remote code.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation, BlossomRecModel

PROJECTION = "model.layers.0.attention.input_proj.weight"


def small_config(**overrides):
    fields = dict(n_items=40, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  compress_block_size=4, compress_stride=2, selection_block_size=2, num_selected_blocks=2,
                  stis_window=2)
    return BlossomRecConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved") / "ckpt"
    torch.manual_seed(0)
    BlossomRecForSequentialRecommendation(small_config()).save_pretrained(directory)
    return directory


def copy_of(saved, tmp_path, name="ckpt"):
    return shutil.copytree(saved, tmp_path / name)


def edit_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    config.update(fields)
    (directory / "config.json").write_text(json.dumps(config))


def poison(directory, name, value):
    weights = load_file(directory / "model.safetensors")
    weights[name][3, 5] = value
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})


def test_a_matching_checkpoint_still_loads_with_its_loading_info(saved):
    model, info = BlossomRecForSequentialRecommendation.from_pretrained(saved, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    model = BlossomRecForSequentialRecommendation.from_pretrained(saved)
    assert isinstance(model, BlossomRecForSequentialRecommendation)


@pytest.mark.parametrize("value, what", [(float("nan"), "1 NaN and 0 infinite"),
                                         (float("inf"), "0 NaN and 1 infinite")])
def test_non_finite_weights_are_refused_naming_the_tensor(saved, tmp_path, value, what):
    directory = copy_of(saved, tmp_path)
    poison(directory, PROJECTION, value)
    with pytest.raises(ValueError, match=rf"weight {PROJECTION} \({what} .* first at index \(3, 5\)\) is not finite"):
        BlossomRecForSequentialRecommendation.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"weight layers\.0\.attention\.input_proj\.weight"):
        BlossomRecModel.from_pretrained(directory)


@pytest.mark.parametrize("fields, message", [
    ({"num_hidden_layers": 3}, r"the checkpoint has 2 layers but config.json says num_hidden_layers=3 "
                               r"\(missing from the checkpoint: model\.layers\.2\.\* \(17 weights\)\)"),
    ({"num_hidden_layers": 1}, r"the checkpoint has 2 layers but config.json says num_hidden_layers=1 "
                               r"\(in the checkpoint but not in the model the config builds: model\.layers\.1\.\*"),
    ({"position_embedding_type": "absolute"},
     r"config.json says position_embedding_type='absolute' but the checkpoint has no position table "
     r".*model\.position_embeddings\.weight"),
    ({"tie_word_embeddings": False},
     r"config.json says tie_word_embeddings=false but the checkpoint has no separate output item"),
], ids=["more-layers", "fewer-layers", "absolute-positions", "untied"])
def test_a_config_that_does_not_match_the_weights_is_refused(saved, tmp_path, fields, message):
    directory = copy_of(saved, tmp_path)
    edit_config(directory, **fields)
    with pytest.raises(ValueError, match=r"config.json does not match the weights: " + message):
        BlossomRecForSequentialRecommendation.from_pretrained(directory)


def test_absolute_positions_checkpoint_with_a_rope_config_is_refused(tmp_path):
    BlossomRecForSequentialRecommendation(small_config(position_embedding_type="absolute")).save_pretrained(tmp_path)
    edit_config(tmp_path, position_embedding_type="rope")
    with pytest.raises(ValueError, match=r"position_embedding_type='rope' but the checkpoint has an absolute"):
        BlossomRecForSequentialRecommendation.from_pretrained(tmp_path)


def test_the_backbone_loads_from_a_checkpoint_with_untied_scores(tmp_path):
    BlossomRecForSequentialRecommendation(small_config(tie_word_embeddings=False)).save_pretrained(tmp_path)
    assert isinstance(BlossomRecModel.from_pretrained(tmp_path), BlossomRecModel)  # the score table is not its own


def test_pickled_weights_are_never_loaded(saved, tmp_path):
    directory = copy_of(saved, tmp_path)
    torch.save(load_file(directory / "model.safetensors"), directory / "pytorch_model.bin")
    (directory / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"has no model.safetensors \(it holds pytorch_model.bin\): BlossomRec loads "
                                      r"weights from safetensors only and never unpickles"):
        BlossomRecForSequentialRecommendation.from_pretrained(directory)
    with pytest.raises(ValueError, match="use_safetensors=False"):
        BlossomRecForSequentialRecommendation.from_pretrained(saved, use_safetensors=False)
    with pytest.raises(ValueError, match="`transformers_weights` must name a .safetensors file"):
        BlossomRecConfig(n_items=3, transformers_weights="adapter_model.bin")

    sha = "0123456789abcdef0123456789abcdef01234567"  # the same folder as a Hub repo in the local cache
    snapshot = tmp_path / "hub" / "models--org--pickled" / "snapshots" / sha
    shutil.copytree(directory, snapshot)
    (tmp_path / "hub" / "models--org--pickled" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--pickled" / "refs" / "main").write_text(sha)
    with pytest.raises(OSError, match="org/pickled has no model.safetensors: BlossomRec loads weights from "
                                      "safetensors only"):
        BlossomRecForSequentialRecommendation.from_pretrained("org/pickled", cache_dir=tmp_path / "hub",
                                                              local_files_only=True)


REMOTE_LOADER = textwrap.dedent("""
    import importlib.abc, json, sys
    class RefuseImports(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "blossomrec_hf":
                raise ImportError(f"loading a checkpoint must not need {name}")
    sys.meta_path.insert(0, RefuseImports())
    from transformers import AutoModel
    errors = {}
    for name, folder in json.loads(sys.argv[1]).items():
        try:
            AutoModel.from_pretrained(folder, trust_remote_code=True)
            errors[name] = None
        except Exception as error:
            errors[name] = f"{type(error).__name__}: {error}"
    print(json.dumps(errors))
""")


def test_automodel_with_remote_code_refuses_the_same_checkpoints(saved, tmp_path):
    folders = {name: copy_of(saved, tmp_path, name) for name in ("good", "nan", "layers", "pickle")}
    poison(folders["nan"], PROJECTION, float("nan"))
    edit_config(folders["layers"], num_hidden_layers=3)
    torch.save(load_file(folders["pickle"] / "model.safetensors"), folders["pickle"] / "pytorch_model.bin")
    (folders["pickle"] / "model.safetensors").unlink()

    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", REMOTE_LOADER, json.dumps({k: str(v) for k, v in folders.items()})],
                            env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads(result.stdout.strip().splitlines()[-1])
    assert errors["good"] is None
    assert errors["nan"].startswith(f"ValueError: {folders['nan']}: weight {PROJECTION} (1 NaN")
    assert "num_hidden_layers=3" in errors["layers"] and errors["layers"].startswith("ValueError")
    assert errors["pickle"].startswith("OSError") and "safetensors only" in errors["pickle"]
