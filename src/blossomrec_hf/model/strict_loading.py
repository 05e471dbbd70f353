"""Strict checkpoint loading for BlossomRec: safetensors only, config and weights that match, finite weights.

transformers loads `pytorch_model.bin` through its pickle loader, only warns when config.json disagrees with the
weights (leaving layers random or dropping trained ones), and loads NaN weights silently; every one of those gives
wrong scores without an error. `BlossomRecPreTrainedModel.from_pretrained` calls these checks.
"""

import os
import re

import torch


def no_safetensors_message(source, found: list[str]) -> str:
    hint = f" (it holds {', '.join(found)})" if found else ""
    return (f"{source} has no model.safetensors{hint}: BlossomRec loads weights from safetensors only and never "
            f"unpickles a checkpoint. Save the model with save_pretrained(), which writes model.safetensors.")


def refuse_pickled_source(source, subfolder: str) -> None:
    """A local folder without any safetensors file, or a path to a single non-safetensors file, is refused here,
    before transformers could fall back to its pickle loader."""
    if source is None:
        return
    path = os.path.join(os.fspath(source), subfolder or "")
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        if not any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names):
            pickled = [name for name in names if name.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))
                       or name.endswith(".bin.index.json")]
            raise OSError(no_safetensors_message(source, pickled))
    elif os.path.isfile(path) and not path.endswith(".safetensors"):
        raise OSError(f"{source} is not a .safetensors file: BlossomRec loads weights from safetensors only and never "
                      f"unpickles a checkpoint")


def _key_summary(keys: list[str]) -> str:
    """'model.layers.2.* (17 weights), model.position_embeddings.weight': grouped by layer, at most 8 entries."""
    groups: dict[str, int] = {}
    for key in sorted(keys):
        match = re.match(r"(.*?layers\.\d+)\.", key)
        name = f"{match.group(1)}.*" if match else key
        groups[name] = groups.get(name, 0) + 1
    entries = [f"{name} ({_weights(count)})" if name.endswith("*") else name for name, count in groups.items()]
    more = f", and {len(entries) - 8} more" if len(entries) > 8 else ""
    return ", ".join(entries[:8]) + more


def _mismatch_hints(model, missing: list[str], unexpected: list[str]) -> list[str]:
    """Which config.json field most likely disagrees with the weights."""
    config, hints = model.config, []
    layer_of = lambda key: re.search(r"(?:^|\.)layers\.(\d+)\.", key)  # noqa: E731
    model_keys = list(model.state_dict())
    missing_set = set(missing)
    present = {int(m.group(1)) for key in model_keys if key not in missing_set and (m := layer_of(key))}
    present |= {int(m.group(1)) for key in unexpected if (m := layer_of(key))}
    if any(layer_of(key) for key in [*missing, *unexpected]) and len(present) != config.num_hidden_layers:
        hints.append(f"the checkpoint has {len(present)} layers but config.json says num_hidden_layers="
                     f"{config.num_hidden_layers}")
    if any(key.endswith("position_embeddings.weight") for key in missing):
        hints.append("config.json says position_embedding_type='absolute' but the checkpoint has no position "
                     "table (it was trained with 'rope')")
    if any(key.endswith("position_embeddings.weight") for key in unexpected):
        hints.append(f"config.json says position_embedding_type={config.position_embedding_type!r} but the "
                     "checkpoint has an absolute position table (it was trained with 'absolute')")
    if "output_item_embeddings" in missing:
        hints.append("config.json says tie_word_embeddings=false but the checkpoint has no separate output item "
                     "embeddings")
    if "output_item_embeddings" in unexpected:
        hints.append("config.json says tie_word_embeddings=true but the checkpoint has separate output item "
                     "embeddings")
    # compressor weights of layers that both the config and the checkpoint have
    shared = present & set(range(config.num_hidden_layers))
    in_shared = lambda key: ".compressor." in key and (m := layer_of(key)) and int(m.group(1)) in shared  # noqa: E731
    if any(map(in_shared, missing)):
        hints.append("config.json says use_compressed_branch=true but the checkpoint has no compressor weights")
    if any(map(in_shared, unexpected)):
        hints.append("config.json says use_compressed_branch=false (or attention_type='dense') but the checkpoint "
                     "has compressor weights")
    return hints


def _weights(count: int) -> str:
    return f"{count} weight{'s' if count != 1 else ''}"


def check_loaded_keys(model, loading_info: dict, source, backbone_only: bool = False) -> None:
    """Missing weights would be random and unexpected ones dropped: either way the scores are wrong, so refuse."""
    missing = sorted(loading_info.get("missing_keys") or ())
    unexpected = sorted(loading_info.get("unexpected_keys") or ())
    if backbone_only and "output_item_embeddings" in unexpected:
        unexpected.remove("output_item_embeddings")  # the backbone alone, from a checkpoint with untied scores
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"missing from the checkpoint: {_key_summary(missing)}")
    if unexpected:
        parts.append(f"in the checkpoint but not in the model the config builds: {_key_summary(unexpected)}")
    hints = _mismatch_hints(model, missing, unexpected)
    raise ValueError(
        f"{source}: config.json does not match the weights{': ' + '; '.join(hints) if hints else ''} "
        f"({'; '.join(parts)}). Loading would leave weights random or drop trained ones, so it is refused: use the "
        f"config.json saved with these weights."
    )


def check_finite(model, source) -> None:
    """One NaN in a projection makes every user's top-k the same items: refuse NaN or infinite weights by name."""
    bad = []
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            nans = int(torch.isnan(tensor).sum())
            infinite = int((~finite).sum()) - nans
            first = tuple(int(i) for i in (~finite).nonzero()[0])
            bad.append(f"{name} ({nans} NaN and {infinite} infinite of {tensor.numel()} values as {tensor.dtype}, "
                       f"first at index {first})")
    if bad:
        others = f"; {len(bad) - 1} more weights are non-finite too ({', '.join(b.split(' (')[0] for b in bad[1:4])}" \
                 f"{', ...' if len(bad) > 4 else ''})" if len(bad) > 1 else ""
        raise ValueError(f"{source}: weight {bad[0]} is not finite{others}. A model with NaN or infinite weights "
                         f"gives meaningless scores, so it is refused: reload from a checkpoint saved before the "
                         f"training diverged.")
