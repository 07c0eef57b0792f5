"""Public names of what a crosscoder was trained on: Hub ids, never machine paths.

config.json, the model card and the reproduce command travel to the Hub and to other machines, so a
model or dataset given as a local folder is named by the Hub id it is a copy of when that can be told,
else by its folder or file name (and recorded as local). In order, a model is named by:

1. `base_model_id`, when the user sets it;
2. `model_name` itself when it is not a local path (a Hub id such as `EleutherAI/pythia-70m` or `gpt2`);
3. the Hub cache layout (`.../models--org--name/snapshots/<sha>` -> `org/name`);
4. the folder's model card (README.md): the id its usage snippet loads (`from_pretrained("org/name")`,
   `SentenceTransformer('org/name')`), as sentence-transformers and most Hub cards have;
5. `_name_or_path` in its config.json, when it is a Hub id (transformers 4 wrote it on save);
6. the folder name.

A dataset: the Hub id, the datasets cache layout (`datasets--org--name`), else the file or folder name.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from .data import SUFFIX_BUILDERS

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")
_CACHE_DIR = re.compile(r"^(models|datasets)--([A-Za-z0-9][\w.-]*)--([\w.-]+)$")
_CARD_LOAD = re.compile(r"""(?:from_pretrained|SentenceTransformer)\(\s*['"]([\w.-]+/[\w.-]+)['"]""")


def is_hub_id(name: str | None) -> bool:
    """`org/name` or a bare `name` that is not a local path (relative paths start with . or contain /)."""
    return bool(name) and bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name \
        and not os.path.exists(os.path.expanduser(name))


def _from_cache_layout(path: Path, kind: str) -> str | None:
    for part in path.parts:
        match = _CACHE_DIR.match(part)
        if match and match[1] == kind:
            return f"{match[2]}/{match[3]}"
    return None


def _from_model_card(folder: Path) -> str | None:
    card = folder / "README.md"
    if not card.is_file():
        return None
    match = _CARD_LOAD.search(card.read_text(encoding="utf-8", errors="replace"))
    return match[1] if match else None


def _from_config(folder: Path) -> str | None:
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and "/" in name and is_hub_id(name) else None


def public_model_name(model_name: str, base_model_id: str | None = None) -> tuple[str, bool]:
    """(the name to publish, whether the weights came from a local folder); see the module docstring."""
    if base_model_id:
        return base_model_id, not is_hub_id(model_name)
    local = Path(os.path.expanduser(model_name))
    if not local.exists():  # a Hub id, or a path of another machine (a moved activation cache's record)
        return (model_name, False) if _HUB_ID.match(model_name) else (local.name, True)
    local = local.resolve()
    for found in (_from_cache_layout(local, "models"), _from_model_card(local), _from_config(local)):
        if found:
            return found, True
    return local.name, True


def public_dataset_name(dataset_path: str | None) -> tuple[str | None, bool]:
    """(the dataset's Hub id, or its file / folder name, whether it is local)."""
    if not dataset_path:
        return dataset_path, False
    local = Path(os.path.expanduser(dataset_path))
    if not local.exists():  # a data file name (data.jsonl) is a file, not a Hub id, wherever it lives
        is_file_name = local.suffix.lower() in SUFFIX_BUILDERS
        return (dataset_path, False) if _HUB_ID.match(dataset_path) and not is_file_name else (local.name, True)
    local = local.resolve()
    return _from_cache_layout(local, "datasets") or local.name, True


def public_provenance(model_name: str, dataset_path: str | None, base_model_id: str | None = None) -> dict[str, Any]:
    """The provenance fields of `CrosscoderConfig` for a model and a dataset, with public names."""
    model, model_local = public_model_name(model_name, base_model_id)
    dataset, dataset_local = public_dataset_name(dataset_path)
    return {"model_name": model, "dataset_path": dataset, "model_is_local": model_local,
            "dataset_is_local": dataset_local}


def public_model_names(model_names: list[str] | None, base_model_id: str | None = None) -> list[str] | None:
    """Public names of a model diff's models (`base_model_id` names the first); names that would collide
    (two local folders of one name) get their position appended, so each model keeps its own label."""
    if not model_names:
        return None
    names = [public_model_name(name, base_model_id if i == 0 else None)[0] for i, name in enumerate(model_names)]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


def public_path(path: str | None) -> str | None:
    """A run's own folder (output, checkpoints, cache) as its last component: where it is on this machine
    means nothing elsewhere."""
    return Path(path).name if path else path
