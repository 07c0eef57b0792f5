"""circuit-tracer's on-disk formats, written and read from plain tensors (circuit-tracer is not needed).

This is the format layer: tensors in our orientation in, circuit-tracer's files out, and back. Checked
against circuit-tracer 0.5.0 (PyPI `circuit-tracer`): `transcoder/cross_layer_transcoder.py`
(`CrossLayerTranscoder`, `load_clt`, `_load_state_dict`), `transcoder/single_layer_transcoder.py`
(`SingleLayerTranscoder`, `TranscoderSet`, `load_transcoder_set`, `load_relu_transcoder`),
`transcoder/activation_functions.py` (`JumpReLU`), `utils/hf_utils.py` (`load_transcoders`,
`load_transcoder_from_hub`), `utils/caching.py` (`load_transcoders_from_cache`), and
`replacement_model/replacement_model_transformerlens.py` / `utils/tl_nnsight_mapping.py` (what the
feature hooks mean).

Our orientation, per layer i of L (G = d_transcoder, the same for every layer):

    CLT:  {"W_enc": [d_model, G], "b_enc": [G], "W_dec": [G, L - i, d_model], "b_dec": [d_model],
           "threshold": [G] (optional)}
    set:  {"W_enc": [d_model, G], "b_enc": [G], "W_dec": [G, d_model], "b_dec": [d_model],
           "threshold": [G] (optional), "W_skip": [d_model, d_model] (optional; y += x @ W_skip)}

with f_i = act(x_i @ W_enc + b_enc), act = relu, or `h * (h > threshold)` (JumpReLU, strict, the
threshold used as stored: pass our relu(theta)). A set layer reconstructs `f @ W_dec + b_dec (+ x @ W_skip)`;
a CLT's output layer j is `b_dec_j + sum_{i <= j} f_i @ W_dec_i[:, j - i]` (the latents of layer i
write to output layers i..L-1; `b_dec_i` is output layer i's bias).

Files (one folder; the same layout is a Hub repo for `load_transcoder_from_hub("org/name")` and an
entry of circuit-tracer's local cache):

- `config.yaml`: `model_kind` ("cross_layer_transcoder" | "transcoder_set"), `model_name` (the CLI's
  default --model), `feature_input_hook`, `feature_output_hook` (TransformerLens hook names relative to
  a block, e.g. "mlp.hook_in", "hook_resid_mid", "mlp.hook_out"), optionally `scan` (a feature-
  visualization id; the Hub loader replaces it by the repo id). No `transcoders` list: given one, the
  Hub loader would read its entries as hf:// URIs or paths relative to the working directory; without
  it both the Hub loader and the cache loader glob `layer_*.safetensors` in the folder.
- CLT: `W_enc_{i}.safetensors` holding `W_enc_{i}` [G, d_model] (theirs is `einsum("...d,fd->...f")`,
  i.e. our W_enc transposed), `b_enc_{i}` [G], `b_dec_{i}` [d_model] and, for JumpReLU, `threshold_{i}` [G]
  (its presence in layer 0's file switches every layer to JumpReLU); `W_dec_{i}.safetensors` holding
  `W_dec_{i}` [G, L - i, d_model] (same orientation as ours). L is the number of `W_enc_*.safetensors`
  files. The CLT loader reads no skip weights, so a CLT with a skip cannot be exported.
- set: `layer_{i}.safetensors` holding `W_enc` [G, d_model] (`F.linear`: ours transposed), `W_dec`
  [G, d_model], `b_enc` [G], `b_dec` [d_model], for JumpReLU `activation_function.threshold` [G], and
  `W_skip` [d_model, d_model] applied as `x @ W_skip.T` (ours transposed). No threshold: ReLU. Layers
  must be 0..L-1 with one G; the set has a skip when layer 0 has one (then every layer needs it).

circuit-tracer supports only ReLU and JumpReLU here (its `TopK` module is never chosen by a loader):
TopK / BatchTopK dictionaries are converted to JumpReLU before writing. Tensors are cast by its loaders
to the dtype asked for (`load_clt` defaults to bfloat16, `load_transcoders` to float32); we write what
we are given (float32 keeps the reference math exact). Its attribution also zeroes the features of
position 0 (BOS; `zero_positions`), which `encode` does not.

Offline loading, with no Hub and no base model: `load_clt(folder, feature_input_hook=...,
feature_output_hook=..., dtype=...)`, `load_transcoder_set({i: folder/layer_i.safetensors}, scan,
feature_input_hook, feature_output_hook, dtype=...)`, or, reading config.yaml too,
`circuit_tracer.utils.caching.load_transcoders_from_cache("org/name", cache_dir=D)` with the folder at
`D/org/name` (`load_transcoder_from_hub` and `ReplacementModel.from_pretrained` look there first, under
$CIRCUIT_TRACER_CACHE_DIR). `load_transcoders(config)` itself always downloads a CLT from the Hub.

Feature hooks (`circuit_tracer_hooks`): circuit-tracer's transcoders replace MLPs, reading the MLP's
input and writing its output, and its TransformerLens model is loaded with `fold_ln=False`, so:
ours `blocks.{i}.ln2.hook_normalized` (the MLP's input, norm weights applied) -> "mlp.hook_in" (its
`ReplacementMLP.hook_in`; TransformerLens's own "ln2.hook_normalized" is `x / scale` before the norm's
weight and bias, another tensor); `blocks.{i}.hook_resid_mid` -> "hook_resid_mid", and
`blocks.{i}.hook_mlp_in` too on sequential models (the same tensor: circuit-tracer never turns on
TransformerLens's `use_hook_mlp_in`, so "hook_mlp_in" would never fire); `blocks.{i}.hook_mlp_out` (the
MLP module's output) -> "mlp.hook_out" (`ReplacementMLP.hook_out`; equal to TransformerLens's
"hook_mlp_out" except on Gemma-2/3, where that one is after the post-MLP norm). Every other hook raises.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import Tensor

from .cli import run_cli
from .config import arg
from .dashboard import run_settings
from .data import TokenStream
from .harvest import ActivationHarvester, load_model_and_tokenizer
from .hooks import PARALLEL_FLAGS
from .modeling import Crosscoder

CLT_KIND = "cross_layer_transcoder"
SET_KIND = "transcoder_set"
_CLT_KEYS = {"W_enc", "b_enc", "W_dec", "b_dec"}
_SET_KEYS = {"W_enc", "b_enc", "W_dec", "b_dec"}
_OPTIONAL = {CLT_KIND: {"threshold"}, SET_KIND: {"threshold", "W_skip"}}
_RESERVED = {"model_kind", "model_name", "feature_input_hook", "feature_output_hook", "scan", "transcoders"}
_FILE_PATTERNS = ("W_enc_*.safetensors", "W_dec_*.safetensors", "layer_*.safetensors", "config.yaml")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(hook_resid_mid|hook_mlp_in|ln2\.hook_normalized|hook_mlp_out)$")
_INPUT_HOOKS = {"ln2.hook_normalized": "mlp.hook_in", "hook_resid_mid": "hook_resid_mid",
                "hook_mlp_in": "hook_resid_mid"}
_OUTPUT_HOOKS = {"hook_mlp_out": "mlp.hook_out"}


# --- hook names --------------------------------------------------------------------------------

def _parse(name: str, table: dict[str, str], role: str) -> tuple[int, str]:
    match = _HOOK_RE.match(name)
    if match is None or match[2] not in table:
        allowed = ", ".join(f"blocks.{{i}}.{k}" for k in table)
        raise ValueError(f"circuit-tracer's transcoders replace MLPs: their {role} hook must be one of {allowed}; "
                         f"got {name!r}.")
    return int(match[1]), match[2]


def _same_kind_per_layer(names: Sequence[str], table: dict[str, str], role: str) -> str:
    parsed = [_parse(name, table, role) for name in names]
    if [layer for layer, _ in parsed] != list(range(len(names))):
        raise ValueError(f"circuit-tracer needs one {role} hook per layer, in order from layer 0 "
                         f"(blocks.0..blocks.{len(names) - 1}); got {list(names)}.")
    kinds = {kind for _, kind in parsed}
    if len(kinds) != 1:
        raise ValueError(f"circuit-tracer reads one {role} hook name for every layer; got several kinds {sorted(kinds)}.")
    return kinds.pop()


def circuit_tracer_hooks(hook_names_in: Sequence[str], hook_names_out: Sequence[str],
                         parallel_residual: bool = False, n_layers: int | None = None) -> tuple[str, str]:
    """(feature_input_hook, feature_output_hook) for config.yaml from our per-layer hook names.

    Input hook i and output hook i must sit at layer i, for layers 0..L-1 (circuit-tracer replaces every
    MLP of the model: pass the model's `n_layers` to check L against it). ValueError otherwise."""
    if not hook_names_in or len(hook_names_in) != len(hook_names_out):
        raise ValueError(f"circuit-tracer needs as many input as output hooks, one per layer; got "
                         f"{len(hook_names_in)} and {len(hook_names_out)}.")
    if n_layers is not None and len(hook_names_in) != n_layers:
        raise ValueError(f"circuit-tracer replaces all {n_layers} MLPs of the model; these hooks cover "
                         f"{len(hook_names_in)} layers. Train on every layer (blocks.0..blocks.{n_layers - 1}).")
    kind_in = _same_kind_per_layer(hook_names_in, _INPUT_HOOKS, "input")
    kind_out = _same_kind_per_layer(hook_names_out, _OUTPUT_HOOKS, "output")
    if kind_in == "hook_mlp_in" and parallel_residual:
        raise ValueError("On a parallel-residual model blocks.{i}.hook_mlp_in is resid_pre, which the MLP reads only "
                         "through its norm and which circuit-tracer has no MLP-input hook for; train on "
                         "blocks.{i}.ln2.hook_normalized (circuit-tracer's mlp.hook_in) instead.")
    return _INPUT_HOOKS[kind_in], _OUTPUT_HOOKS[kind_out]


# --- checks ------------------------------------------------------------------------------------

def _check_layers(layers: Sequence[dict[str, Tensor]], kind: str) -> tuple[int, int]:
    """(d_model, G) after checking names and shapes; ValueError naming the first bad tensor."""
    if not layers:
        raise ValueError("no layers to write: pass one dict of tensors per layer.")
    required = _CLT_KEYS if kind == CLT_KIND else _SET_KEYS
    first = layers[0].get("W_enc")
    if first is None or first.dim() != 2:
        raise ValueError(f"layer 0: W_enc must be a [d_model, d_transcoder] tensor; got "
                         f"{None if first is None else tuple(first.shape)}.")
    d_model, width = first.shape
    n = len(layers)
    for i, layer in enumerate(layers):
        missing, unknown = required - set(layer), set(layer) - required - _OPTIONAL[kind]
        if missing or unknown:
            hint = " (circuit-tracer's CLT loader reads no skip weights)" if "W_skip" in unknown else ""
            raise ValueError(f"layer {i}: missing {sorted(missing)}, unknown {sorted(unknown)}{hint}; expected "
                             f"{sorted(required)} plus optional {sorted(_OPTIONAL[kind])}.")
        dec = (width, n - i, d_model) if kind == CLT_KIND else (width, d_model)
        shapes = {"W_enc": (d_model, width), "b_enc": (width,), "W_dec": dec, "b_dec": (d_model,),
                  "threshold": (width,), "W_skip": (d_model, d_model)}
        for key, tensor in layer.items():
            if tuple(tensor.shape) != shapes[key]:
                raise ValueError(f"layer {i}: {key} has shape {tuple(tensor.shape)}, expected {shapes[key]} "
                                 f"(d_model={d_model}, d_transcoder={width}, {n} layers).")
            if not tensor.is_floating_point():
                raise ValueError(f"layer {i}: {key} is {tensor.dtype}; circuit-tracer needs floating-point weights.")
    for key in _OPTIONAL[kind]:
        if len({key in layer for layer in layers}) > 1:
            raise ValueError(f"{key} is given for some layers only; circuit-tracer reads it from layer 0 for "
                             "every layer: give it for all or none.")
    return d_model, width


def _prepare_folder(folder: str | Path, overwrite: bool) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stale = [p for pattern in _FILE_PATTERNS for p in folder.glob(pattern)]
    if stale and not overwrite:
        raise ValueError(f"{folder} already holds circuit-tracer files ({stale[0].name}, ...); its loaders glob "
                         "them, so old layers would mix in. Pass overwrite=True or choose an empty folder.")
    for path in stale:  # a longer earlier export's extra layers would be counted by the loaders' glob
        path.unlink()
    return folder


def _save(tensors: dict[str, Tensor], path: Path) -> None:
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))


def write_config(folder: str | Path, model_kind: str, model_name: str, feature_input_hook: str,
                 feature_output_hook: str, scan: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """config.yaml with circuit-tracer's keys; `extra` keys (e.g. provenance) are written beside them."""
    if model_kind not in (CLT_KIND, SET_KIND):
        raise ValueError(f"model_kind must be {CLT_KIND!r} or {SET_KIND!r}; got {model_kind!r}.")
    clash = _RESERVED & set(extra or {})
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} are circuit-tracer's own; pass them as arguments.")
    config = {"model_kind": model_kind, "model_name": model_name, "feature_input_hook": feature_input_hook,
              "feature_output_hook": feature_output_hook, **({"scan": scan} if scan is not None else {}),
              **(extra or {})}
    path = Path(folder) / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# --- write and read ----------------------------------------------------------------------------

def write_clt(folder: str | Path, layers: Sequence[dict[str, Tensor]], *, model_name: str,
              feature_input_hook: str, feature_output_hook: str, scan: str | None = None,
              extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a cross-layer transcoder (layers in our orientation, see the module docstring) as
    circuit-tracer's W_enc_{i} / W_dec_{i} files plus config.yaml. Returns the folder."""
    _check_layers(layers, CLT_KIND)
    folder = _prepare_folder(folder, overwrite)
    for i, layer in enumerate(layers):
        enc = {f"W_enc_{i}": layer["W_enc"].T, f"b_enc_{i}": layer["b_enc"], f"b_dec_{i}": layer["b_dec"]}
        if "threshold" in layer:
            enc[f"threshold_{i}"] = layer["threshold"]
        _save(enc, folder / f"W_enc_{i}.safetensors")
        _save({f"W_dec_{i}": layer["W_dec"]}, folder / f"W_dec_{i}.safetensors")
    write_config(folder, CLT_KIND, model_name, feature_input_hook, feature_output_hook, scan, extra)
    return folder


def write_transcoder_set(folder: str | Path, layers: Sequence[dict[str, Tensor]], *, model_name: str,
                         feature_input_hook: str, feature_output_hook: str, scan: str | None = None,
                         extra: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write per-layer transcoders (our orientation) as circuit-tracer's layer_{i}.safetensors files
    plus config.yaml. Returns the folder."""
    _check_layers(layers, SET_KIND)
    folder = _prepare_folder(folder, overwrite)
    for i, layer in enumerate(layers):
        tensors = {"W_enc": layer["W_enc"].T, "W_dec": layer["W_dec"], "b_enc": layer["b_enc"],
                   "b_dec": layer["b_dec"]}
        if "threshold" in layer:
            tensors["activation_function.threshold"] = layer["threshold"]
        if "W_skip" in layer:
            tensors["W_skip"] = layer["W_skip"].T
        _save(tensors, folder / f"layer_{i}.safetensors")
    write_config(folder, SET_KIND, model_name, feature_input_hook, feature_output_hook, scan, extra)
    return folder


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise ValueError(f"{folder} has no config.yaml; is it a circuit-tracer export?")
    return yaml.safe_load(path.read_text())


def _numbered(folder: Path, prefix: str) -> list[Path]:
    """prefix_0.safetensors .. prefix_{n-1}.safetensors, checked to be contiguous (as the loaders assume)."""
    number = re.compile(rf"^{prefix}_(\d+)\.safetensors$")
    found = [p for p in folder.glob(f"{prefix}_*.safetensors") if number.match(p.name)]
    paths = sorted(found, key=lambda p: int(number.match(p.name)[1]))
    if not paths or [p.name for p in paths] != [f"{prefix}_{i}.safetensors" for i in range(len(paths))]:
        raise ValueError(f"{folder}: expected {prefix}_0.safetensors .. {prefix}_{{n-1}}.safetensors, found "
                         f"{[p.name for p in paths]}.")
    return paths


def read_clt(folder: str | Path) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """(layers in our orientation, config.yaml) of a CLT folder: write_clt's inverse."""
    folder, layers = Path(folder), []
    for i, path in enumerate(_numbered(folder, "W_enc")):
        enc = load_file(str(path))
        layer = {"W_enc": enc[f"W_enc_{i}"].T.contiguous(), "b_enc": enc[f"b_enc_{i}"],
                 "W_dec": load_file(str(folder / f"W_dec_{i}.safetensors"))[f"W_dec_{i}"], "b_dec": enc[f"b_dec_{i}"]}
        if f"threshold_{i}" in enc:
            layer["threshold"] = enc[f"threshold_{i}"]
        layers.append(layer)
    return layers, read_config(folder)


def read_transcoder_set(folder: str | Path) -> tuple[list[dict[str, Tensor]], dict[str, Any]]:
    """(layers in our orientation, config.yaml) of a transcoder-set folder: write_transcoder_set's inverse."""
    folder, layers = Path(folder), []
    for path in _numbered(folder, "layer"):
        t = load_file(str(path))
        layer = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"]}
        if "activation_function.threshold" in t:
            layer["threshold"] = t["activation_function.threshold"]
        if "W_skip" in t:
            layer["W_skip"] = t["W_skip"].T.contiguous()
        layers.append(layer)
    return layers, read_config(folder)


# --- reference math (circuit-tracer's semantics, our orientation) -------------------------------

def _activation(h: Tensor, threshold: Tensor | None) -> Tensor:
    # circuit-tracer: F.relu without a threshold, else JumpReLU h * (h > threshold)
    return torch.relu(h) if threshold is None else h * (h > threshold)


def transcoder_encode(layer: dict[str, Tensor], x: Tensor) -> Tensor:
    """Feature activations [..., G] of one transcoder (or CLT layer) on its input x [..., d_model]."""
    return _activation(x @ layer["W_enc"] + layer["b_enc"], layer.get("threshold"))


def transcoder_reconstruct(layer: dict[str, Tensor], x: Tensor) -> Tensor:
    """One set layer's output [..., d_model]: f @ W_dec + b_dec (+ x @ W_skip)."""
    out = transcoder_encode(layer, x) @ layer["W_dec"] + layer["b_dec"]
    return out + x @ layer["W_skip"] if "W_skip" in layer else out


def clt_encode(layers: Sequence[dict[str, Tensor]], xs: Tensor) -> list[Tensor]:
    """Each layer's feature activations [..., G] from its input xs[i] (xs: [L, ..., d_model])."""
    return [transcoder_encode(layer, x) for layer, x in zip(layers, xs, strict=True)]


def clt_reconstruct(layers: Sequence[dict[str, Tensor]], xs: Tensor) -> Tensor:
    """Outputs [L, ..., d_model]: output j = b_dec_j + sum over i <= j of f_i @ W_dec_i[:, j - i]."""
    feats = clt_encode(layers, xs)
    outs = []
    for j, layer in enumerate(layers):
        out = layer["b_dec"].expand(*xs.shape[1:-1], -1)
        for i in range(j + 1):
            out = out + feats[i] @ layers[i]["W_dec"][:, j - i]
        outs.append(out)
    return torch.stack(outs)


# --- export of a trained crosscoder --------------------------------------------------------------

_RELU_ARCHITECTURES = ("crosscoder", "skip_crosscoder")
_GATED_ARCHITECTURES = ("jumprelu_crosscoder", "batchtopk_crosscoder", "matryoshka_batchtopk_crosscoder")
_CALIBRATED_ARCHITECTURES = ("topk_crosscoder",)
_SCORE_ELEMENTS = 2**24  # pre-activations [rows, latents] sorted at once while calibrating (128 MiB in float64)


def _export_kind(cc: Crosscoder) -> str:
    """CLT_KIND or SET_KIND for this crosscoder's structure and architecture; ValueError naming the fix."""
    c = cc.config
    structure = getattr(c, "layer_structure", "dense") or "dense"
    if structure not in ("cross_layer", "per_layer"):
        raise ValueError(f"circuit-tracer loads cross-layer transcoders and per-layer transcoder sets; this "
                         f"crosscoder has layer_structure={structure!r}. Train it with --layer_structure "
                         "cross_layer (a CLT) or per_layer (a transcoder set).")
    known = _RELU_ARCHITECTURES + _GATED_ARCHITECTURES + _CALIBRATED_ARCHITECTURES
    if c.architecture not in known:
        raise ValueError(f"No circuit-tracer export for architecture {c.architecture!r}; exportable: "
                         f"{', '.join(known)}.")
    if structure == "cross_layer" and hasattr(cc, "W_skip"):
        raise ValueError("circuit-tracer's CLT loader reads no skip weights, so a cross_layer skip_crosscoder "
                         "cannot be exported; train the CLT without a skip (architecture crosscoder, "
                         "jumprelu_crosscoder, topk_crosscoder or batchtopk_crosscoder), or a per_layer "
                         "skip_crosscoder (circuit-tracer's skip transcoders).")
    return CLT_KIND if structure == "cross_layer" else SET_KIND


def _check_target(folder: str | Path, overwrite: bool) -> None:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass a folder for the export.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder} exists and is not empty; pass overwrite=True (--overwrite) to replace the "
                         "circuit-tracer files in it, or choose a new folder.")


def _raw_scale_copy(cc: Crosscoder) -> Crosscoder:
    """An eval-mode copy that runs on raw activations: the normalization scales folded into its weights
    (as the runner does before saving; a model saved by it is folded already)."""
    raw = copy.deepcopy(cc).eval()
    c = raw.config
    if c.activation_scale_in is not None and not c.activation_norm_folded:
        if c.activation_scale_out is None:
            raise ValueError("The crosscoder records activation_scale_in but no activation_scale_out; set both "
                             "(or fold them with fold_activation_norm_scaling) before exporting.")
        raw.fold_activation_norm_scaling(c.activation_scale_in, c.activation_scale_out)
    return raw


def _layer_tensors(raw: Crosscoder, kind: str, threshold: Tensor | None) -> list[dict[str, Tensor]]:
    """Per group its tensors in the format layer's orientation (see the module docstring)."""
    s, d = raw.structure, raw.config.d_model
    layers = []
    with torch.no_grad():
        for i, (grp, enc, dec) in enumerate(zip(s.groups, s.encoder_views(raw.W_enc), s.decoder_views(raw.W_dec))):
            W_dec = dec.reshape(dec.shape[0], len(grp.hooks_out), d)
            layer = {"W_enc": enc, "b_enc": raw.b_enc[grp.latents],
                     "W_dec": W_dec if kind == CLT_KIND else W_dec[:, 0], "b_dec": raw.b_dec[i]}
            if threshold is not None:
                layer["threshold"] = threshold[grp.latents]
            if hasattr(raw, "W_skip"):
                layer["W_skip"] = raw.W_skip[i]
            layers.append({k: v.detach().clone().contiguous() for k, v in layer.items()})
    return layers


def _rows(t: Tensor, n_layers: int, d_model: int) -> Tensor:
    if t.dim() == 2 and t.shape[1] == n_layers * d_model:
        t = t.view(t.shape[0], n_layers, d_model)
    if t.dim() != 3 or tuple(t.shape[1:]) != (n_layers, d_model):
        raise ValueError(f"activations: a batch has shape {tuple(t.shape)}; expected [rows, {n_layers}, {d_model}] "
                         f"(raw activations of the {n_layers} hooks).")
    return t


def _as_rows(activations: Any, n_layers: int, d_model: int) -> tuple[Tensor, Tensor | None]:
    """(inputs [N, L, d_model], outputs or None) from a tensor, an (inputs, outputs) pair, or an iterable
    of either (batches, concatenated)."""
    def split(item: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(item, Tensor):
            return item, None
        if isinstance(item, tuple) and len(item) == 2 and all(isinstance(t, Tensor) for t in item):
            return item[0], item[1]
        raise TypeError
    try:
        batches = [split(activations)]
    except TypeError:
        batches = [split(item) for item in activations]
    if not batches:
        raise ValueError("activations holds no batches; pass raw input rows [N, layers, d_model].")
    ins = torch.cat([_rows(b[0], n_layers, d_model) for b in batches])
    has_out = {b[1] is not None for b in batches}
    if len(has_out) > 1:
        raise ValueError("activations mixes batches with and without output rows; give all or none.")
    outs = torch.cat([_rows(b[1], n_layers, d_model) for b in batches]) if has_out.pop() else None
    if outs is not None and outs.shape[0] != ins.shape[0]:
        raise ValueError(f"activations: {ins.shape[0]} input rows but {outs.shape[0]} output rows.")
    return ins, outs


def _batches(x: Tensor, y: Tensor | None, batch_size: int, device: torch.device):
    for i in range(0, x.shape[0], batch_size):
        yield x[i:i + batch_size].to(device), None if y is None else y[i:i + batch_size].to(device)


@torch.no_grad()
def _original(raw: Crosscoder, x: Tensor) -> tuple[Tensor, Tensor]:
    """(feature activations [n, d_sae], reconstruction [n, L, d_model]) of the crosscoder's own eval forward."""
    out = raw(x.to(raw.W_enc.dtype))
    return out.feature_acts, out.reconstruction


@torch.no_grad()
def _exported(layers: Sequence[dict[str, Tensor]], kind: str, x: Tensor) -> tuple[Tensor, Tensor]:
    """(features [n, d_sae], reconstruction [n, L, d_model]) of the written layers by the reference math."""
    xs = x.to(layers[0]["W_enc"].dtype).transpose(0, 1)
    feats = torch.cat(clt_encode(layers, xs), dim=-1)
    if kind == CLT_KIND:
        recon = clt_reconstruct(layers, xs)
    else:
        recon = torch.stack([transcoder_reconstruct(layer, xi) for layer, xi in zip(layers, xs)])
    return feats, recon.transpose(0, 1)


def _between(ranked: Tensor, n_s: Tensor) -> Tensor:
    """Per column of `ranked` ([N, c], descending), a value that exactly n_s[col] entries exceed: midway
    between the n_s-th and (n_s + 1)-th; above the largest for n_s = 0; 0 for n_s = N (all fired: h > 0)."""
    n = ranked.shape[0]
    upper = ranked.gather(0, (n_s - 1).clamp(0, n - 1)[None]).squeeze(0)
    lower = ranked.gather(0, n_s.clamp(max=n - 1)[None]).squeeze(0)
    top = ranked[0]
    above_all = top + top.abs().clamp_min(1.0) * 1e-3
    return torch.where(n_s == 0, above_all, torch.where(n_s >= n, 0.0, (upper + lower) / 2))


@torch.no_grad()
def calibrate_thresholds(raw: Crosscoder, x: Tensor, batch_size: int = 4096) -> Tensor:
    """Per-latent JumpReLU thresholds [d_sae] that give each latent the firing rate it has in the
    crosscoder's own forward on the rows x [N, L, d_model] (raw scale, the model folded).

    Rate matching: latent s fires (value > 0) on n_s of the N rows in the original; its threshold is the
    midpoint of the n_s-th and (n_s + 1)-th largest pre-activations h_s over the rows (so exactly the
    n_s largest pass, however h is rounded when recomputed; rows with equal h, e.g. a repeated token whose
    activation depends on the token alone, pass or fail together), at least 0. So on these rows every latent fires as often as before and the
    L0 of every group is the original's; on other rows it matches in expectation. A latent that never
    fired gets the largest h_s seen (silent on these rows). The rows that fire are the n_s of largest h_s,
    not the top-k winners: the reconstruction changes, and `export_to_circuit_tracer` reports by how much."""
    device = raw.W_enc.device
    counts = sum((_original(raw, xb)[0] > 0).sum(0) for xb, _ in _batches(x, None, batch_size, device))
    n, flat = x.shape[0], x.reshape(x.shape[0], -1).to(device=device, dtype=raw.W_enc.dtype)
    s, out = raw.structure, torch.empty(raw.config.d_sae, dtype=raw.W_enc.dtype, device=device)
    chunk = max(1, _SCORE_ELEMENTS // n)
    for grp, W_g in zip(s.groups, s.encoder_views(raw.W_enc.detach())):
        x_g, b_g, start = flat[:, grp.inputs], raw.b_enc.detach()[grp.latents], grp.latents.start or 0
        for j in range(0, W_g.shape[1], chunk):
            h = torch.addmm(b_g[j:j + chunk], x_g, W_g[:, j:j + chunk])
            ranked = h.sort(dim=0, descending=True).values
            out[start + j:start + j + h.shape[1]] = _between(ranked, counts[start + j:start + j + h.shape[1]])
    return out.clamp_min(0)


class _FVU:
    """Running sums of the fraction of variance unexplained of predictions of a target, in float64: sum
    SSE / sum SST over layers (and per layer), SST centred on the per-dimension mean (as evals.py, here
    in raw scale)."""

    def __init__(self) -> None:
        self.sse = self.sum_y = self.sum_y2 = 0.0
        self.n = 0

    def add(self, pred: Tensor, target: Tensor) -> None:
        pred, target = pred.double(), target.double()
        self.sse = self.sse + (target - pred).pow(2).sum(dim=(0, 2))
        self.sum_y, self.sum_y2 = self.sum_y + target.sum(0), self.sum_y2 + target.pow(2).sum(0)
        self.n += target.shape[0]

    def result(self) -> tuple[float, list[float]]:
        sst = (self.sum_y2 - self.sum_y.pow(2) / self.n).sum(-1).clamp_min(1e-30)
        return float(self.sse.sum() / sst.sum()), (self.sse / sst).tolist()


def _compare(raw: Crosscoder, layers: Sequence[dict[str, Tensor]], kind: str, x: Tensor, y: Tensor | None,
             batch_size: int) -> dict[str, Any]:
    """The export against the crosscoder's own forward on rows x (and against the targets y if given):
    L0 per group of both, FVU of the export against the original's reconstruction (and of both against y)."""
    fires, fires_ct = 0, 0
    agree, orig, ct = _FVU(), _FVU(), _FVU()
    for xb, yb in _batches(x, y, batch_size, raw.W_enc.device):
        feats, recon = _original(raw, xb)
        feats_ct, recon_ct = _exported(layers, kind, xb)
        fires, fires_ct = fires + (feats > 0).double().sum(0), fires_ct + (feats_ct > 0).double().sum(0)
        agree.add(recon_ct, recon)
        if yb is not None:
            orig.add(recon, yb)
            ct.add(recon_ct, yb)
    n, groups = x.shape[0], len(layers)
    fvu, fvu_layers = agree.result()
    stats = {"rows": n, "l0_original": (fires.view(groups, -1).sum(1) / n).tolist(),
             "l0_export": (fires_ct.view(groups, -1).sum(1) / n).tolist(), "fvu_export_vs_original": fvu,
             "fvu_export_vs_original_per_layer": fvu_layers}
    if y is not None:
        (f_orig, orig_layers), (f_ct, ct_layers) = orig.result(), ct.result()
        stats.update(fvu_original=f_orig, fvu_export=f_ct, fvu_cost=f_ct - f_orig,
                     fvu_original_per_layer=orig_layers, fvu_export_per_layer=ct_layers)
    return stats


def _split(x: Tensor, y: Tensor | None, holdout_fraction: float) -> tuple[tuple, tuple | None]:
    """(calibration rows, held-out rows or None): the last `holdout_fraction` of the rows are held out."""
    n_held = int(round(x.shape[0] * holdout_fraction))
    if n_held == 0 or n_held >= x.shape[0]:
        return (x, y), None
    cut = x.shape[0] - n_held
    return (x[:cut], None if y is None else y[:cut]), (x[cut:], None if y is None else y[cut:])


def needs_activations(cc: Crosscoder) -> bool:
    """Whether the export converts this architecture by calibrating on activations (TopK)."""
    return cc.config.architecture in _CALIBRATED_ARCHITECTURES


def check_exportable(cc: Crosscoder, folder: str | Path, has_activations: bool, *, model_name: str | None = None,
                     overwrite: bool = False, parallel_residual: bool = False,
                     n_layers: int | None = None) -> tuple[str, str, str, str]:
    """(model kind, feature_input_hook, feature_output_hook, model_name) of the export, after every check
    that needs no activations (structure, architecture, skip, hooks, model name, target folder)."""
    kind = _export_kind(cc)
    c = cc.config
    hook_in, hook_out = circuit_tracer_hooks(c.hook_names_in, c.hook_names_out, parallel_residual, n_layers)
    model_name = model_name or c.model_name
    if not model_name:
        raise ValueError("config.yaml needs the base model's name (circuit-tracer loads it to trace); the "
                         "crosscoder's config records none: pass model_name= (--model_name), e.g. 'gpt2'.")
    if needs_activations(cc) and not has_activations:
        raise ValueError(f"circuit-tracer has no TopK: a {c.architecture} exports as JumpReLU with thresholds "
                         "calibrated on activations; pass activations= (raw input rows [N, layers, d_model]) or "
                         "use the CLI, which harvests --calibration_tokens tokens.")
    _check_target(folder, overwrite)
    return kind, hook_in, hook_out, model_name


def export_to_circuit_tracer(cc: Crosscoder, folder: str | Path, *, activations: Any = None,
                             model_name: str | None = None, scan: str | None = None, overwrite: bool = False,
                             holdout_fraction: float = 0.2, batch_size: int = 4096, parallel_residual: bool = False,
                             n_layers: int | None = None) -> dict[str, Any]:
    """Write a trained cross_layer crosscoder as circuit-tracer's CLT, or a per_layer one as its transcoder
    set (with W_skip for a skip_crosscoder), in raw activation scale, plus config.yaml. Returns a report.

    ReLU architectures export as ReLU, jumprelu_crosscoder as JumpReLU (threshold relu(theta)), BatchTopK
    and Matryoshka BatchTopK as the JumpReLU their inference gate is (per latent: the gate / the rank scale;
    exact, as the SAELens export). topk_crosscoder has no such gate: it becomes a JumpReLU whose per-latent
    thresholds are calibrated on `activations` (`calibrate_thresholds`: each latent's firing rate, so each
    group's L0, matches the TopK model's on the calibration rows).

    activations: raw input rows [N, L, d_model] (or [N, L * d_model]), an (inputs, outputs) tuple, or an
    iterable of batches of either. Required for topk_crosscoder; for any architecture the report then
    compares the export with the crosscoder's forward: L0 per group of both and the FVU of the export
    against the original's reconstruction (and, given outputs, of both against them: `fvu_cost`), on the
    calibration rows and on the last `holdout_fraction` of the rows, which calibration does not see.
    model_name: config.yaml's model_name (circuit-tracer's default base model), default the crosscoder's.
    parallel_residual / n_layers: the base model's, when known (`circuit_tracer_hooks` checks the hooks
    against them). Every check runs before anything is written; a non-empty folder is refused unless
    overwrite=True."""
    kind, hook_in, hook_out, model_name = check_exportable(cc, folder, activations is not None, model_name=model_name,
                                                           overwrite=overwrite, parallel_residual=parallel_residual,
                                                           n_layers=n_layers)
    if not 0 <= holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in [0, 1); got {holdout_fraction}.")
    c = cc.config
    calibrated = c.architecture in _CALIBRATED_ARCHITECTURES
    raw = _raw_scale_copy(cc)
    rows = None if activations is None else _as_rows(activations, c.n_in, c.d_model)
    cal, held = (None, None) if rows is None else _split(*rows, holdout_fraction)
    if calibrated:
        threshold, conversion = calibrate_thresholds(raw, cal[0], batch_size), "jumprelu_rate_matched"
    elif c.architecture in _GATED_ARCHITECTURES:
        threshold = raw.pre_activation_threshold().detach()
        conversion = "jumprelu" if c.architecture == "jumprelu_crosscoder" else "jumprelu_from_batchtopk_gate"
    else:
        threshold, conversion = None, "relu"
    layers = _layer_tensors(raw, kind, threshold)
    extra = {"exported_by": "hf_crosscoder", "hf_crosscoder_architecture": c.architecture,
             "hf_crosscoder_layer_structure": c.layer_structure, "activation": conversion}
    writer = write_clt if kind == CLT_KIND else write_transcoder_set
    writer(folder, layers, model_name=model_name, feature_input_hook=hook_in, feature_output_hook=hook_out,
           scan=scan, extra=extra, overwrite=True)
    report = {"folder": str(folder), "model_kind": kind, "model_name": model_name, "feature_input_hook": hook_in,
              "feature_output_hook": hook_out, "n_layers": len(layers), "d_transcoder": raw.structure.width,
              "skip": "W_skip" in layers[0], "activation": conversion}
    if cal is not None:
        report["calibration"] = _compare(raw, layers, kind, *cal, batch_size)
    if held is not None:
        report["held_out"] = _compare(raw, layers, kind, *held, batch_size)
    return report


# --- command line ----------------------------------------------------------------------------------

DEFAULT_CALIBRATION_TOKENS = 16_384
REPORT_FILENAME = "export_report.json"


@dataclass
class CircuitTracerExportArgs:
    """`python -m hf_crosscoder.circuit_tracer OUTPUT_DIR_OR_HUB_ID --out FOLDER`: a saved cross_layer /
    per_layer crosscoder as files circuit-tracer loads (see export_to_circuit_tracer)."""

    crosscoder: str = arg("", "A training run's output_path or the Hub id of a saved crosscoder (also the "
                              "first positional argument).")
    out: str = arg("", "The folder to write (config.yaml and the safetensors files; a Hub repo's layout).")
    model_name: str | None = arg(None, "config.yaml's model_name, the model circuit-tracer traces (default: "
                                       "the crosscoder's, e.g. gpt2).")
    scan: str | None = arg(None, "config.yaml's scan (a feature-visualization id); circuit-tracer's Hub loader "
                                 "replaces it by the repo id.")
    calibration_tokens: int | None = arg(None, f"Tokens harvested from the run's model and dataset: a TopK "
                                         f"crosscoder's JumpReLU thresholds are calibrated on them (default "
                                         f"{DEFAULT_CALIBRATION_TOKENS}), and for any architecture the report "
                                         "compares export and crosscoder on them (default: none; 0: never).")
    holdout_fraction: float = arg(0.2, "Share of the harvested tokens held out of calibration to report on.")
    dataset_path: str | None = arg(None, "Calibration data; default the run's eval_dataset_path, else its "
                                         "dataset_path.")
    batch_size: int = arg(8, "Sequences per model forward while harvesting.")
    device: str | None = arg(None, "Default: cuda if available, else cpu.")
    overwrite: bool = arg(False, "Replace the circuit-tracer files of a non-empty --out folder.")


def _calibration_tokens(args: CircuitTracerExportArgs, cc: Crosscoder) -> int:
    n = args.calibration_tokens
    if n is None:
        n = DEFAULT_CALIBRATION_TOKENS if needs_activations(cc) else 0
    if n < 0:
        raise ValueError(f"--calibration_tokens must be >= 0; got {n}.")
    return n


def _parallel_residual(model_config: Any) -> bool:
    return any(bool(getattr(model_config, flag, False)) for flag in PARALLEL_FLAGS)


@torch.no_grad()
def harvest_rows(settings: Any, model: Any, tokenizer: Any, stream: TokenStream, n_tokens: int,
                 batch_size: int) -> tuple[Tensor, Tensor]:
    """(inputs, outputs) [N, L, d_model] raw rows of the crosscoder's hooks from about `n_tokens` tokens,
    special-token positions left out (as in training)."""
    hooks_in, hooks_out = list(settings.hook_names_in), list(settings.hook_names_out)
    harvester = ActivationHarvester(model, tokenizer, hooks_in + hooks_out, settings)
    index = {name: i for i, name in enumerate(harvester.hook_names)}
    ins, outs, have = [], [], 0
    while have < n_tokens:
        try:
            tokens = stream.next_batch(min(batch_size, math.ceil((n_tokens - have) / settings.context_size)))
        except StopIteration:  # a dataset smaller than asked: calibrate on all of it
            break
        rows, _ = harvester(tokens, drop_special=True)
        ins.append(rows[:, [index[h] for h in hooks_in]].cpu())
        outs.append(rows[:, [index[h] for h in hooks_out]].cpu())
        have += tokens.numel()
    if not ins:
        raise ValueError(f"The dataset {settings.dataset_path} gave no tokens to calibrate on; pass --dataset_path.")
    return torch.cat(ins), torch.cat(outs)


def export_command(args: CircuitTracerExportArgs) -> dict[str, Any]:
    """The CLI's work: load, check, harvest if needed, export; the report is also written to the folder."""
    if not args.crosscoder or not args.out:
        raise ValueError("pass the crosscoder (a run's output_path or a Hub id) and --out FOLDER.")
    cc = Crosscoder.from_pretrained(args.crosscoder)
    n_tokens = _calibration_tokens(args, cc)
    check_exportable(cc, args.out, n_tokens > 0, model_name=args.model_name, overwrite=args.overwrite)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    activations, extra = None, {}
    if n_tokens > 0:
        local = Path(args.crosscoder).is_dir()
        settings = run_settings(args.crosscoder if local else ".", cc.config, args.dataset_path)
        if not local:
            settings.model_name = cc.config.model_name  # a Hub crosscoder: its own provenance only
        if not settings.model_name:
            raise ValueError("The crosscoder's config names no model_name to harvest calibration tokens from; "
                             "pass --calibration_tokens 0 (not possible for TopK) or export from the run folder.")
        streams: list[TokenStream] = []
        model, tokenizer = load_model_and_tokenizer(settings, device, before_weights=lambda tok: streams.append(
            TokenStream(settings, tok, process_index=0, num_processes=1, max_epochs=1)))
        extra = {"parallel_residual": _parallel_residual(model.config), "n_layers": model.config.num_hidden_layers}
        check_exportable(cc, args.out, True, model_name=args.model_name, overwrite=args.overwrite, **extra)
        activations = harvest_rows(settings, model, tokenizer, streams[0], n_tokens, args.batch_size)
        del model
    report = export_to_circuit_tracer(cc.to(device), args.out, activations=activations, model_name=args.model_name,
                                      scan=args.scan, overwrite=args.overwrite,
                                      holdout_fraction=args.holdout_fraction, **extra)
    Path(args.out, REPORT_FILENAME).write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        argv = ["--crosscoder", *argv]  # the crosscoder as a positional argument
    report = run_cli(CircuitTracerExportArgs, export_command, argv)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
