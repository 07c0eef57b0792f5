"""Hook points on `transformers` models: TransformerLens-style names, capture with early stop, splicing.

Names (resolved on the model's own modules, no TransformerLens needed):

- `blocks.{i}.hook_resid_post`: output of decoder layer i (the first element if the layer returns a
  tuple). In transformers 5 the last layer's output is *not* `hidden_states[-1]`: the final norm is
  applied there.
- `blocks.{i}.hook_resid_pre`: input of layer i (a forward pre-hook; positional or `hidden_states=`).
- `blocks.{i}.hook_attn_out`, `blocks.{i}.hook_mlp_out`: what the attention / MLP sub-block of layer i
  adds to the residual stream. Pre-LN models (GPT-NeoX `attention`/`mlp`, GPT-2 `attn`/`mlp`,
  Llama-style `self_attn`/`mlp`): the sub-module's output. Post-LN BERT-style layers have no such
  module: their `attention` and `output` blocks return `LayerNorm(residual + x)`, i.e. the residual
  stream itself. There the hooks sit on the projections that produce `x`: `attention.output.dense` and
  `output.dense` (before dropout, the residual add and the LayerNorm).
- any module path from `model.named_modules()` (`gpt_neox.layers.3`): that module's output.

The layer list is found generically: the longest `nn.ModuleList` named `layers`, `h`, `layer`,
`blocks` or `block` (`gpt_neox.layers`, `model.layers`, `transformer.h`, `encoder.layer`, ...).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from transformers.utils import ModelOutput

LAYER_LIST_NAMES = ("layers", "h", "layer", "blocks", "block")
ATTENTION_NAMES = ("self_attn", "attention", "attn", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")
HOOK_KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(resid_pre|resid_post|attn_out|mlp_out)$")
_MAX_LISTED = 12


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: the module whose output (or input, when `is_input`) is the activation."""

    name: str
    module: nn.Module
    is_input: bool = False
    layer_index: int | None = None


class _StopForward(Exception):
    """Raised from a hook once every needed activation is captured, to skip the rest of the forward."""


def find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, module list) of the model's decoder/encoder layers; ValueError if there is none."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 \
                and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES:
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError(f"could not find the layer list of {type(model).__name__} (no nn.ModuleList named "
                         f"{'/'.join(LAYER_LIST_NAMES)}); pass raw module paths as hook names instead, e.g. "
                         f"{_example_paths(model)}.")
    return best


def _example_paths(model: nn.Module, n: int = 3) -> str:
    names = [name for name, _ in model.named_modules() if name.count(".") == 2][:n]
    return ", ".join(names) or "a name from model.named_modules()"


def _sub_block(layer: nn.Module, kind: str) -> nn.Module | None:
    """The module whose output is what the attention ('attn') or MLP ('mlp') sub-block adds."""
    names = ATTENTION_NAMES if kind == "attn" else MLP_NAMES
    for name in names:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            # BERT-style attention = self-attention + an output block doing LayerNorm(residual + dense(x))
            dense = getattr(getattr(module, "output", None), "dense", None)
            return dense if kind == "attn" and isinstance(dense, nn.Linear) else module
    # BERT-style MLP: intermediate (up-projection) then output = LayerNorm(residual + dense(x))
    dense = getattr(getattr(layer, "output", None), "dense", None)
    if kind == "mlp" and hasattr(layer, "intermediate") and isinstance(dense, nn.Linear):
        return dense
    return None


def valid_hook_names(model: nn.Module) -> list[str]:
    """TransformerLens-style names this model supports (module paths from named_modules() work too).

    For a model without a recognised layer list, the module paths are the valid names."""
    try:
        _, layers = find_layers(model)
    except ValueError:
        return [name for name, _ in model.named_modules() if name]
    names = []
    for i, layer in enumerate(layers):
        for kind in HOOK_KINDS:
            if kind in ("resid_pre", "resid_post") or _sub_block(layer, kind[:-4]) is not None:
                names.append(f"blocks.{i}.hook_{kind}")
    return names


def _unknown_hook_message(model: nn.Module, name: str) -> str:
    valid = valid_hook_names(model)
    if len(valid) <= _MAX_LISTED:
        listed = ", ".join(valid)
    else:
        n = len(valid) // len(HOOK_KINDS)
        listed = (f"blocks.{{i}}.hook_{{{','.join(HOOK_KINDS)}}} for i in 0..{n - 1} "
                  f"(e.g. {', '.join(valid[:4])}, ...)")
    return (f"Unknown hook name {name!r} for {type(model).__name__}. Valid names: {listed}; or a module "
            f"path from model.named_modules(), e.g. {_example_paths(model)}.")


def _layer_index_of(model: nn.Module, path: str) -> int | None:
    try:
        layers_name, _ = find_layers(model)
    except ValueError:
        return None
    rest = path[len(layers_name) + 1:].split(".", 1)[0] if path.startswith(layers_name + ".") else ""
    return int(rest) if rest.isdigit() else None


def resolve_hook(model: nn.Module, name: str) -> HookPoint:
    """Resolve a hook name (TransformerLens-style or a module path); ValueError listing valid names."""
    match = _HOOK_RE.match(name)
    if match is None:
        try:
            module = model.get_submodule(name) if name else None
        except AttributeError:
            module = None
        if module is None:
            raise ValueError(_unknown_hook_message(model, name))
        return HookPoint(name, module, False, _layer_index_of(model, name))
    _, layers = find_layers(model)
    i, kind = int(match[1]), match[2]
    if i >= len(layers):
        raise ValueError(f"Hook {name!r}: {type(model).__name__} has {len(layers)} layers (0..{len(layers) - 1}); "
                         "use a layer index in that range.")
    if kind in ("resid_pre", "resid_post"):
        return HookPoint(name, layers[i], kind == "resid_pre", i)
    module = _sub_block(layers[i], kind[:-4])
    if module is None:
        raise ValueError(f"Hook {name!r}: found no {kind[:-4]} sub-module in {type(layers[i]).__name__}; "
                         f"pass its module path instead ({_example_paths(layers[i])} inside the layer).")
    return HookPoint(name, module, False, i)


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list, ModelOutput)) else value


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    # transformers 5 passes the residual stream positionally, but some callers use hidden_states=
    if args:
        return args[0]
    if "hidden_states" not in kwargs:
        raise ValueError(f"a resid_pre hook found no positional input and no hidden_states= among "
                         f"{sorted(kwargs)}; hook the previous layer's resid_post instead.")
    return kwargs["hidden_states"]


def _register(point: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> torch.utils.hooks.RemovableHandle:
    """Call fn on the point's activation; a non-None result replaces it (the first element of tuples)."""
    if point.is_input:
        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            new = fn(_input_of(args, kwargs))
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        new = fn(_first(output))
        if new is None:
            return None
        if isinstance(output, ModelOutput):
            output[next(iter(output.keys()))] = new
            return output
        if isinstance(output, (tuple, list)):
            return type(output)((new, *output[1:]))
        return new
    return point.module.register_forward_hook(hook)


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keyword arguments for a forward whose outputs are read once (no KV cache, where the model has one)."""
    # no KV cache: it is never read back, and an early-stopped forward leaves it half-filled
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


def capture_activations(model: nn.Module, hook_names: Sequence[str], input_ids: Tensor,
                        attention_mask: Tensor | None = None, stop_early: bool = True) -> dict[str, Tensor]:
    """Run `model` (no grad) and return each hook's activation [batch, seq, d_model].

    A hook named twice is captured once. With `stop_early`, the forward is abandoned as soon as every
    hook has fired (later layers never run). Hooks are removed even when the forward raises."""
    points = [resolve_hook(model, name) for name in dict.fromkeys(hook_names)]
    captured: dict[str, Tensor] = {}

    def recorder(point: HookPoint) -> Callable[[Tensor], None]:
        def record(act: Tensor) -> None:
            captured.setdefault(point.name, act.detach())
            if stop_early and len(captured) == len(points):
                raise _StopForward
        return record

    handles = []
    try:
        for point in points:
            handles.append(_register(point, recorder(point)))
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, **forward_kwargs(model))
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [p.name for p in points if p.name not in captured]
    if missing:
        raise ValueError(f"Hooks {missing} never fired during the forward of {type(model).__name__}; their "
                         "modules are not used by its forward. Pick hooks on modules the forward runs.")
    return {p.name: captured[p.name] for p in points}


@contextmanager
def splice(model: nn.Module, replacements: dict[str, Callable[[Tensor], Tensor]]) -> Iterator[None]:
    """Within the context, each hook's activation is replaced by `fn(activation)` in every forward
    (the input for resid_pre, the first element of tuple outputs). Undone on exit, also on errors."""
    handles = []
    try:
        for name, fn in replacements.items():
            handles.append(_register(resolve_hook(model, name), fn))
        yield
    finally:
        for handle in handles:
            handle.remove()


def model_hidden_size(model_config: Any) -> int | None:
    """The residual-stream width a `PretrainedConfig` declares (text sub-config of multimodal ones)."""
    text = getattr(model_config, "text_config", None)
    for cfg in (model_config, text):
        for attr in ("hidden_size", "d_model", "n_embd"):
            value = getattr(cfg, attr, None) if cfg is not None else None
            if isinstance(value, int):
                return value
    return None


def check_d_model(model_config: Any, d_model: int, model_name: str) -> None:
    """The seed's error when d_model differs from the model's hidden size (checked before weights load)."""
    hidden = model_hidden_size(model_config)
    if hidden is not None and hidden != d_model:
        raise ValueError(f"d_model={d_model} does not match the hidden size {hidden} of {model_name}; set "
                         f"d_model={hidden} (pythia-70m: 512, pythia-160m: 768).")
