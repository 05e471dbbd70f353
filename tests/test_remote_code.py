"""A saved checkpoint loads with AutoModel(trust_remote_code=True) in a fresh process that cannot import our package.

The loading process cannot import `blossomrec_hf`, works offline with a fresh HF_MODULES_CACHE, and must run the
checkpoint's own copy of the code. The code files themselves must not import datasets, accelerate or plotting.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import torch

from blossomrec_hf import BlossomRecConfig, BlossomRecForSequentialRecommendation

LOADER = textwrap.dedent("""
    import importlib.abc, inspect, json, os, sys
    class RefuseImports(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "blossomrec_hf":
                raise ImportError(f"loading a checkpoint must not need {name}")
    sys.meta_path.insert(0, RefuseImports())
    import torch
    from transformers import AutoModel
    source, ids = sys.argv[1], torch.tensor(json.loads(sys.argv[2]))
    model = AutoModel.from_pretrained(source, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ids, logits_to_keep=1).logits[:, 0]
    print(json.dumps({"code_file": inspect.getfile(type(model)), "class": type(model).__name__,
                      "logits": logits.tolist(), "implementation": model.config._attn_implementation,
                      "recommended": model.recommend(ids, top_k=3).item_ids.tolist()}))
""")

HISTORIES = [[0, 0, 4, 9, 2, 7, 7, 1], [3, 5, 8, 13, 21, 34, 5, 8]]


def saved_model(directory):
    torch.manual_seed(0)
    config = BlossomRecConfig(n_items=40, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=64, compress_block_size=4, compress_stride=2, selection_block_size=2,
                              num_selected_blocks=2, stis_window=2)
    model = BlossomRecForSequentialRecommendation(config).eval()
    model.save_pretrained(directory)
    with torch.no_grad():
        expected = model(torch.tensor(HISTORIES), logits_to_keep=1).logits[:, 0]
    return expected


def load_in_fresh_process(source, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hub"),
               HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", LOADER, source, json.dumps(HISTORIES)], env=env,
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_loaded(loaded, expected, tmp_path):
    assert loaded["class"] == "BlossomRecForSequentialRecommendation"
    assert loaded["code_file"].startswith(str(tmp_path / "modules")), loaded["code_file"]
    assert loaded["implementation"] == "blossom_torch"
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert loaded["recommended"] == expected[:, 1:].topk(3).indices.add(1).tolist()


def test_save_pretrained_writes_safetensors_auto_map_and_every_code_file(tmp_path):
    saved_model(tmp_path / "ckpt")
    files = set(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "configuration_blossomrec.py", "modeling_blossomrec.py",
            "blossom_attention_torch.py", "blossom_attention_triton.py", "triton_blossom_kernels.py",
            "rotary_embedding.py", "triton_rotary_kernels.py", "sparse_patterns.py", "history_layout.py",
            "chunked_cross_entropy.py", "fused_cross_entropy.py", "triton_cross_entropy_kernels.py",
            "sampled_softmax.py", "strict_loading.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    for name in files:
        if name.endswith(".py"):
            imports = [line.split()[1] for line in (tmp_path / "ckpt" / name).read_text().splitlines()
                       if line.startswith(("import ", "from "))]
            assert not {module.split(".")[0] for module in imports} & {"datasets", "accelerate", "matplotlib",
                                                                       "blossomrec_hf"}, (name, imports)
    auto_map = json.loads((tmp_path / "ckpt" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_blossomrec.BlossomRecConfig",
                        "AutoModel": "modeling_blossomrec.BlossomRecForSequentialRecommendation"}


def test_loads_from_a_local_folder_in_a_fresh_process(tmp_path):
    expected = saved_model(tmp_path / "ckpt")
    check_loaded(load_in_fresh_process(str(tmp_path / "ckpt"), tmp_path), expected, tmp_path)


def test_loads_by_repo_id_from_a_hub_cache_offline(tmp_path):
    expected = saved_model(tmp_path / "ckpt")
    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--blossomrec-tiny"
    shutil.copytree(tmp_path / "ckpt", repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    check_loaded(load_in_fresh_process("someorg/blossomrec-tiny", tmp_path), expected, tmp_path)
