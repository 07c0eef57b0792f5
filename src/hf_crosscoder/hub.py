"""Hugging Face Hub integration: the model card, the output folder, and publishing.

- `build_model_card` writes a `huggingface_hub.ModelCard` (metadata through `ModelCardData`, body from a
  small Jinja template): what the crosscoder reads and writes, its hyper-parameters, the tokens it was
  trained on, the final evaluation table, the command that reproduces the run, a usage snippet, plots.
- `save_for_hub` = `save_pretrained` + README.md; the runner calls it for its final output folder.
- `push_folder_to_hub` publishes such a folder (optionally into a subfolder: several crosscoders per
  repo, loaded with `Crosscoder.from_pretrained(repo, subfolder=...)`; the repo root then gets a small
  index card listing them).

Loading is transformers' own: `Crosscoder.from_pretrained(repo_id, revision=, subfolder=, cache_dir=,
token=)`, offline from the Hub cache with HF_HUB_OFFLINE=1.

The card's metadata is checked locally (a parse round trip through `ModelCard` / `metadata_load`):
`ModelCard.validate()` posts the card to the Hub's /api/validate-yaml, so it needs the network; the Hub
runs that same check when the card is committed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import EntryNotFoundError

from .cli import no_progress_bars, reproduce_command
from .config import CrosscoderConfig, LanguageModelCrosscoderRunnerConfig, hook_union, layer_labels
from .metrics import MODEL_INDEX_METRICS, PER_HOOK_COLUMNS, SUMMARY_ROWS
from .naming import public_dataset_name, public_model_name

LIBRARY_NAME = "hf_crosscoder"
BASE_TAGS = ("crosscoder", "sparse-autoencoder", "interpretability")
DEFAULT_LICENSE = "apache-2.0"
DEFAULT_COMMIT_MESSAGE = "Upload crosscoder with hf_crosscoder"
# files of an output folder that belong on the Hub: weights, config, card, plots, metrics / run configs
UPLOAD_PATTERNS = ("*.safetensors", "*.json", "*.png", "*.yaml", "*.yml", "README.md")
INDEX_MARKER = "<!-- hf_crosscoder:index -->"  # marks a root card we generated (and may regenerate)

_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")

CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}

## What it reads and writes

{{ hooks_table }}

## Architecture and hyper-parameters

{{ hyper_table }}

## Training

{{ training_table }}

## Final evaluation

{{ eval_section }}

## Reproduce

```bash
{{ command }}
```

## Usage

```python
{{ usage }}
```
{% if plots %}
## Plots
{% for plot in plots %}
![{{ plot }}]({{ plot }})
{% endfor %}{% endif %}"""

INDEX_TEMPLATE = """---
{{ card_data }}
---

""" + INDEX_MARKER + """
# {{ repo_id }}

Crosscoders trained with `hf_crosscoder`, one per
subfolder; each subfolder has its own model card (hooks, hyper-parameters, evaluation).

| subfolder | load with |
|---|---|
{% for sub in subfolders %}| [{{ sub }}]({{ sub }}/README.md) | `Crosscoder.from_pretrained("{{ repo_id }}", subfolder="{{ sub }}")` |
{% endfor %}"""


# ----------------------------------------------------------------------------------------- helpers
def _layer_of(hook: str) -> int | None:
    match = _LAYER.search(hook)
    return int(match[1]) if match else None


def crosscoder_kind(config: Any) -> str:
    """SAE, transcoder, acausal / causal crosscoder, from the hook lists (layers parsed from the names)."""
    hooks_in, hooks_out = list(config.hook_names_in), list(config.hook_names_out)
    if len(hooks_in) == len(hooks_out) == 1:
        return "sparse autoencoder (SAE)" if hooks_in == hooks_out else "transcoder"
    if set(hooks_in) == set(hooks_out):
        return "acausal crosscoder"
    layers_in = [_layer_of(h) for h in hooks_in]
    layers_out = [_layer_of(h) for h in hooks_out]
    if None not in layers_in + layers_out and min(layers_out) > max(layers_in):
        return "causal crosscoder"
    return "crosscoder"


def _article(word: str) -> str:
    return "An" if word[:1].lower() in "aeiou" else "A"


def _fmt(value: Any) -> str:
    """Numbers with 4 significant digits; None, 'n/a' and non-finite values as 'n/a'."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else "n/a"
    if value is None or value == "n/a":
        return "n/a"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return str(value).replace("|", "\\|")


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _hooks_table(config: Any) -> str:
    hooks = hook_union(config.hook_names_in, config.hook_names_out)
    rows = []
    for hook in hooks:
        reads = hook in config.hook_names_in
        writes = hook in config.hook_names_out
        role = "input and output" if reads and writes else "input" if reads else "output"
        layer = _layer_of(hook)
        rows.append((f"`{hook}`", "n/a" if layer is None else layer, role,
                     "yes" if reads else "", "yes" if writes else ""))
    kind = crosscoder_kind(config)
    intro = (f"{_article(kind)} **{kind}**: it reads {config.n_in} hook(s) (`hook_names_in`) and "
             f"reconstructs {config.n_out} (`hook_names_out`), each of width d_model = {config.d_model}.\n\n")
    return intro + _table(("hook", "layer", "role", "read (input)", "written (output)"), rows)


def _groups_table(crosscoder: Any) -> str:
    """For a structured crosscoder (CLT, per-layer set): which hooks each latent group reads and writes."""
    structure = getattr(crosscoder, "structure", None)
    if structure is None or len(structure.groups) < 2:
        return ""
    c = crosscoder.config
    labels_in, labels_out = layer_labels(c, "in"), layer_labels(c, "out")
    rows = []
    for i, g in enumerate(structure.groups):
        start, stop, _ = g.latents.indices(c.d_sae)
        rows.append((i, f"{start:,}-{stop - 1:,}", ", ".join(f"`{labels_in[j]}`" for j in g.hooks_in),
                     ", ".join(f"`{labels_out[j]}`" for j in g.hooks_out)))
    intro = (f"\n\nLayer structure `{c.layer_structure}`: {len(rows)} groups of latents, each reading and "
             "writing only these hooks.\n\n")
    return intro + _table(("group", "latents", "reads", "writes"), rows)


def _hyper_rows(crosscoder: Any) -> list[tuple[str, str]]:
    c = crosscoder.config
    rows = [("architecture", f"`{c.architecture}`"), ("layer structure", f"`{c.layer_structure}`"),
            ("d_model", _fmt(c.d_model)), ("d_in (= d_model x inputs)", _fmt(c.d_in)),
            ("d_out (= d_model x outputs)", _fmt(c.d_out)), ("d_sae (latents)", _fmt(c.d_sae)),
            ("expansion (d_sae / d_in)", _fmt(c.d_sae / c.d_in))]
    return rows + [(name, _fmt(value)) for name, value in crosscoder.card_rows()]  # the architecture's own


def _normalization_note(config: Any) -> str:
    if config.activation_norm_folded:
        return ("Per-hook activation scales were used in training and are folded into the weights: the "
                "model runs on raw activations.")
    if config.activation_scale_in is None:
        return "Trained on raw (unnormalized) activations."
    return "Activation scales are NOT folded: multiply inputs by `activation_scale_in` before encoding."


def _hyper_table(crosscoder: Any) -> str:
    table = _table(("hyper-parameter", "value"), _hyper_rows(crosscoder))
    return table + "\n\n" + _normalization_note(crosscoder.config)


def _source_label(name: str | None, kind: str, config: Any) -> str | None:
    """The public name of the model or dataset, saying when it came from a local folder or file."""
    if not name:
        return name
    public, local = public_model_name(name) if kind == "model" else public_dataset_name(name)
    local = local or bool(getattr(config, f"{kind}_is_local", False))
    return f"{public} (from a local {'folder' if kind == 'model' else 'file or folder'})" if local else public


def _training_table(config: Any, run_config: Mapping[str, Any] | None) -> str:
    run = dict(run_config or {})
    rows = [("model", _fmt(_source_label(config.model_name or run.get("model_name"), "model", config))),
            ("dataset", _fmt(_source_label(config.dataset_path or run.get("dataset_path"), "dataset", config))),
            ("context size", _fmt(config.context_size or run.get("context_size"))),
            ("tokens trained", _fmt(config.training_tokens or run.get("training_tokens")))]
    for key in ("train_batch_size_tokens", "lr", "lr_scheduler_name", "l1_warmup_steps", "seed"):
        if key in run:
            rows.append((key, _fmt(run[key])))
    out = _table(("item", "value"), rows)
    if run:
        dumped = json.dumps(run, indent=2, sort_keys=True, default=str)
        out += f"\n\n<details><summary>Full training configuration</summary>\n\n```json\n{dumped}\n```\n</details>"
    return out


def _metric(metrics: Mapping[str, Any], key: str) -> str:
    value = metrics.get(key)
    return _fmt(float(value)) if isinstance(value, (int, float)) and not isinstance(value, bool) else _fmt(value)


def _eval_section(config: Any, metrics: Mapping[str, Any] | None) -> str:
    """The per-hook table and the summary, without the columns (rows) that are n/a throughout (e.g. the CE
    metrics of an encoder)."""
    metrics = metrics or {}
    cells = [[_metric(metrics, f"{key}/{hook}") for _, key in PER_HOOK_COLUMNS] for hook in layer_labels(config, "out")]
    shown = [i for i in range(len(PER_HOOK_COLUMNS)) if any(row[i] != "n/a" for row in cells)]
    header = ("output hook", *(PER_HOOK_COLUMNS[i][0] for i in shown))
    per_hook = _table(header, [(f"`{hook}`", *(row[i] for i in shown))
                               for hook, row in zip(layer_labels(config, "out"), cells)]) if shown else ""
    summary_rows = [(name, _metric(metrics, key)) for name, key in SUMMARY_ROWS]
    summary = _table(("metric", "value"), [row for row in summary_rows if row[1] != "n/a"])
    note = ("Held-out tokens; SAEBench's core metric definitions (hf_crosscoder.evals). Explained variance, "
            "cossim, L2 ratio and bias are scale-free; MSE is in the model's raw activation scale. "
            "CE loss score = (zero-ablated - with crosscoder) / (zero-ablated - clean): 1 is a perfect splice.")
    if not metrics:
        return "No evaluation metrics were recorded for this crosscoder."
    return "\n\n".join(part for part in (per_hook, summary, note) if part) + _diff_counts(metrics)


def _diff_counts(metrics: Mapping[str, Any]) -> str:
    """Model diffing: latents per class (hf_crosscoder.diffing.classify_latents), when recorded."""
    rows = [(key.split("/", 1)[1], _metric(metrics, key)) for key in metrics if key.startswith("diff_latents/")]
    if not rows:
        return ""
    note = ("A latent is 'only <model>' when that model holds more than 90% of its decoder norm (normalized "
            "space; Anthropic's 0.1 / 0.9 relative-norm convention), else 'shared'.")
    return "\n\n### Model diff\n\n" + _table(("latents", "count"), rows) + "\n\n" + note


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def eval_results_for(config: Any, metrics: Mapping[str, Any] | None) -> list[EvalResult] | None:
    """The card's `model-index`: the held-out metrics of MODEL_INDEX_METRICS, overall and per output hook
    (metric_config names the hook), on the training dataset's held-out split (or `eval_dataset_path`)."""
    metrics, results = metrics or {}, []
    dataset, local = public_dataset_name(config.dataset_path) if config.dataset_path else (None, True)
    for prefix, name in MODEL_INDEX_METRICS:
        for hook in (None, *layer_labels(config, "out")):
            value = metrics.get(prefix if hook is None else f"{prefix}/{hook}")
            if _finite(value):
                results.append(EvalResult(
                    task_type="feature-extraction", task_name="activation reconstruction",
                    dataset_type=dataset if dataset and not local else "local", dataset_name=dataset or "local data",
                    dataset_split="held-out", metric_type=prefix, metric_value=float(value),
                    metric_name=name if hook is None else f"{name} ({hook})", metric_config=hook))
    return results or None


def _command(command: str | None, run_config: Mapping[str, Any] | None, config: Any) -> str:
    if command:
        return command
    if not run_config:
        return "# the training command was not recorded"
    known = {f.name for f in dataclasses.fields(LanguageModelCrosscoderRunnerConfig)}
    hooks = {"hook_names_in": config.hook_names_in, "hook_names_out": config.hook_names_out}
    values = {**hooks, **{k: v for k, v in run_config.items() if k in known}}
    return reproduce_command(LanguageModelCrosscoderRunnerConfig(**values))


def _usage(config: Any, repo_id: str | None, subfolder: str | None) -> str:
    where = json.dumps(repo_id or "<repo id or local folder>")
    sub = f", subfolder={json.dumps(subfolder)}" if subfolder else ""
    name = public_model_name(config.model_name)[0] if config.model_name else None
    model = json.dumps(name or "<the model it was trained on>")
    return (f"from hf_crosscoder import Crosscoder\n"
            f"from hf_crosscoder.usage import feature_activations, spliced\n\n"
            f"crosscoder = Crosscoder.from_pretrained({where}{sub})\n"
            f"# latents per token, on raw activations of {model}\n"
            f"[(tokens, acts)] = feature_activations(crosscoder, {model}, texts=[\"Once upon a time\"])\n"
            f"# or run the model with its output hook(s) replaced by the reconstruction:\n"
            f"# with spliced(crosscoder, model): model(input_ids)")


def card_data_for(config: Any, license: str = DEFAULT_LICENSE,
                  metrics: Mapping[str, Any] | None = None) -> ModelCardData:
    """Metadata: library_name, base_model (the model's public name: naming.py), datasets when it is a Hub
    dataset, tags, license, and the held-out metrics as `model-index` (eval_results)."""
    tags = [*BASE_TAGS, config.architecture]
    model = public_model_name(config.model_name)[0] if config.model_name else None
    if getattr(config, "model_names", None):  # model diffing: every model is a base model
        model, tags = list(config.model_names), [*tags, "model-diffing"]
    dataset, local = public_dataset_name(config.dataset_path)
    hub_dataset = dataset if dataset and not local and not getattr(config, "dataset_is_local", False) else None
    results = eval_results_for(config, metrics)
    short = [m.rsplit("/", 1)[-1] for m in ([model] if isinstance(model, str) else model or [])]
    name = f"{config.architecture}-{config.d_sae}" + "".join(f"-{m}" for m in short)
    return ModelCardData(library_name=LIBRARY_NAME, base_model=model,
                         datasets=[hub_dataset] if hub_dataset else None, tags=tags, license=license,
                         model_name=name if results else None, eval_results=results)


# ----------------------------------------------------------------------------------------- public API
def build_model_card(crosscoder: Any, metrics: Mapping[str, Any] | None = None,
                     run_config: Mapping[str, Any] | None = None, plots: list[str] | None = None,
                     command: str | None = None, *, repo_id: str | None = None,
                     subfolder: str | None = None, license: str = DEFAULT_LICENSE) -> ModelCard:
    """The model card (README.md) of a crosscoder: metadata plus what it does, how well, how to use it.

    `metrics` are the final held-out evals (keys `explained_variance/<hook>`, `l0`, ...: evals.py; absent
    ones show 'n/a', columns absent throughout are dropped); `plots` are PNG file names next to the README; `command` reproduces the run (default: built
    from `run_config`); `repo_id` / `subfolder` go into the usage snippet.
    """
    config = crosscoder.config
    hooks = ", ".join(hook_union(config.hook_names_in, config.hook_names_out))
    model = public_model_name(config.model_name)[0] if config.model_name else None
    if getattr(config, "model_names", None):
        model = " and ".join(config.model_names)  # model diffing: one dictionary over every model
    on_model = f" on {model}" if model else ""
    kind = crosscoder_kind(config)
    summary = (f"{_article(kind)} {kind} ({config.architecture}, {config.d_sae:,} latents) trained"
               f"{on_model} with `hf_crosscoder`. "
               f"Hooks: {hooks}.")
    return ModelCard.from_template(
        card_data_for(config, license, metrics), template_str=CARD_TEMPLATE,
        title=f"{config.architecture}{on_model}", summary=summary,
        hooks_table=_hooks_table(config) + _groups_table(crosscoder),
        hyper_table=_hyper_table(crosscoder), training_table=_training_table(config, run_config),
        eval_section=_eval_section(config, metrics), command=_command(command, run_config, config),
        usage=_usage(config, repo_id, subfolder), plots=list(plots or []))


def save_for_hub(crosscoder: Any, folder: str | Path, metrics: Mapping[str, Any] | None = None,
                 run_config: Mapping[str, Any] | None = None, command: str | None = None, *,
                 repo_id: str | None = None, subfolder: str | None = None) -> Path:
    """`save_pretrained(folder)` plus README.md, the model card (the PNGs already in `folder` are its
    plots). Returns the folder. Refuses a model whose activation normalization is not folded in: a
    published crosscoder must run on raw activations."""
    config = crosscoder.config
    if config.activation_scale_in is not None and not config.activation_norm_folded:
        raise ValueError("This crosscoder still expects normalized activations; call "
                         "crosscoder.fold_activation_norm_scaling(config.activation_scale_in, "
                         "config.activation_scale_out) before saving it for the Hub.")
    folder = Path(folder)
    with no_progress_bars():
        crosscoder.save_pretrained(folder)
    plots = sorted(p.name for p in folder.glob("*.png"))
    card = build_model_card(crosscoder, metrics, run_config, plots, command, repo_id=repo_id,
                            subfolder=subfolder)
    card.save(folder / "README.md")
    return folder


def _files_to_upload(folder: Path) -> list[Path]:
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} has no config.json; write it with save_for_hub(crosscoder, {str(folder)!r}) "
                         "(or crosscoder.save_pretrained) before pushing.")
    if not any(folder.glob("model*.safetensors")):
        raise ValueError(f"{folder} has no model.safetensors; write it with save_for_hub(crosscoder, "
                         f"{str(folder)!r}) (or crosscoder.save_pretrained) before pushing.")
    # top-level files only: checkpoints/ and other run state stay local
    return sorted({p for pattern in UPLOAD_PATTERNS for p in folder.glob(pattern) if p.is_file()})


def _index_operation(api: HfApi, repo_id: str, subfolder: str, config: Any) -> CommitOperationAdd | None:
    """Root README listing the repo's crosscoder subfolders, unless the root has a card we did not write."""
    existing = api.list_repo_files(repo_id)
    if "README.md" in existing:
        try:
            text = Path(api.hf_hub_download(repo_id, "README.md")).read_text(encoding="utf-8")
        except EntryNotFoundError:
            text = INDEX_MARKER
        if INDEX_MARKER not in text:
            return None  # a hand-written root card: leave it alone
    subfolders = {f.rsplit("/", 1)[0] for f in existing if f.endswith("/config.json")} | {subfolder}
    card = ModelCard.from_template(card_data_for(config), template_str=INDEX_TEMPLATE, repo_id=repo_id,
                                   subfolders=sorted(subfolders))
    return CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode())


def push_folder_to_hub(folder: str | Path, repo_id: str, private: bool = False, subfolder: str | None = None,
                       token: str | bool | None = None, commit_message: str = DEFAULT_COMMIT_MESSAGE) -> str:
    """Publish a `save_for_hub` folder: create the repo if needed, then one commit with its config.json,
    weights, README.md, PNG plots and JSON/YAML metrics (top-level files only). With `subfolder`, the
    files go there (one crosscoder per subfolder) and the root gets an index card. Returns the commit URL.
    """
    folder = Path(folder)
    files = _files_to_upload(folder)
    prefix = subfolder.strip("/") + "/" if subfolder else ""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    # create_commit (what upload_folder runs underneath) so the files and the index card land together
    operations = [CommitOperationAdd(path_in_repo=prefix + p.name, path_or_fileobj=str(p)) for p in files]
    if prefix:
        config = CrosscoderConfig.from_pretrained(folder)
        index = _index_operation(api, repo_id, prefix.rstrip("/"), config)
        if index is not None:
            operations.append(index)
    return api.create_commit(repo_id, operations, commit_message=commit_message).commit_url


def push_crosscoder_to_hub(crosscoder: Any, repo_id: str, *, subfolder: str | None = None,
                           metrics: Mapping[str, Any] | None = None, run_config: Mapping[str, Any] | None = None,
                           command: str | None = None, private: bool = False, token: str | bool | None = None,
                           commit_message: str = DEFAULT_COMMIT_MESSAGE) -> str:
    """`save_for_hub` into a temporary folder, then `push_folder_to_hub`: weights plus this library's
    model card (PreTrainedModel.push_to_hub writes transformers' generic card instead)."""
    with tempfile.TemporaryDirectory() as tmp:
        save_for_hub(crosscoder, tmp, metrics, run_config, command, repo_id=repo_id, subfolder=subfolder)
        return push_folder_to_hub(tmp, repo_id, private=private, subfolder=subfolder, token=token,
                                  commit_message=commit_message)
