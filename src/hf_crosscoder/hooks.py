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
- The MLP's inputs, read at the MLP's input norm (`ln_2` in GPT-2; `post_attention_layernorm` in
  Llama and GPT-NeoX; `pre_feedforward_layernorm` in Gemma-2/3, whose `post_attention_layernorm`
  normalizes the attention output instead; `attention.output.LayerNorm` in BERT-style layers), with
  TransformerLens's meanings (`components/transformer_block.py`, `bert_block.py`):
  - `blocks.{i}.hook_resid_mid` = resid_pre + attn_out, the residual stream between the attention and
    the MLP: the input of that norm. Sequential-residual layers only: on a parallel-residual layer
    (GPT-NeoX/pythia's `use_parallel_residual`, Falcon's `parallel_attn`) attention and MLP both read
    resid_pre, there is no resid_mid (TransformerLens has no such hook there either), and the name
    raises a ValueError that names the alternatives. BERT-style: the input of
    `attention.output.LayerNorm` (before the post-LN, as TransformerLens's BertBlock).
  - `blocks.{i}.hook_mlp_in` = the MLP block's input before its norm, also the norm's input: resid_mid
    on sequential layers, resid_pre on parallel ones (TransformerLens: `hook_mlp_in(resid_pre)` in its
    parallel branch, with `use_hook_mlp_in`).
  - `blocks.{i}.ln2.hook_normalized` = that norm's output, the MLP's actual input (weight and bias
    applied). Every family, parallel ones included. TransformerLens's own `hook_normalized` sits
    before the norm's weight and bias (`x / scale`), which is the same tensor only when the weights
    are folded into the MLP (its default `fold_ln=True`). BERT-style layers: the output of
    `attention.output.LayerNorm`, the MLP's input (TransformerLens's BertBlock calls that norm `ln1`).
  Splicing follows TransformerLens too: replacing mlp_in or ln2.hook_normalized changes the MLP's
  input only; replacing resid_mid changes the residual stream as well (the change is carried into the
  layer's output).
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
# the norm whose output is the MLP's input, most specific first; `post_attention_layernorm` is the
# attention output's norm instead when the layer also has a `post_feedforward_layernorm` (Gemma-2/3, OLMo-2)
MLP_NORM_NAMES = ("pre_feedforward_layernorm", "pre_ff_layernorm", "pre_mlp_layernorm", "pre_mlp_layer_norm",
                  "pre_mlp_norm", "ffn_norm", "ffn_layer_norm", "mlp_norm", "ln_mlp", "ln_2", "ln2",
                  "layer_norm2", "layer_norm_2", "norm2", "layernorm_after", "post_attention_layernorm")
# config flags of parallel-residual layers (attention and MLP both read resid_pre)
PARALLEL_FLAGS = ("use_parallel_residual", "parallel_attn", "new_decoder_architecture")
HOOK_KINDS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_in",
              "ln2.hook_normalized", "hook_mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k) for k in HOOK_KINDS) + r")$")
_MLP_INPUT_KINDS = ("hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized")
_MAX_LISTED = 12


@dataclass(frozen=True)
class HookPoint:
    """A resolved hook: the module whose output (or input, when `is_input`) is the activation.

    `carry`: a module whose output a replacement's change is added to as well (resid_mid, read at the
    MLP norm's input, is carried into the layer's output so the residual stream sees the change)."""

    name: str
    module: nn.Module
    is_input: bool = False
    carry: nn.Module | None = None


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


def _bert_mlp_norm(layer: nn.Module) -> nn.Module | None:
    # post-LN: attention.output = LayerNorm(resid_pre + dense(attn)), whose output feeds `intermediate`
    if not hasattr(layer, "intermediate"):
        return None
    for name in ATTENTION_NAMES:
        norm = getattr(getattr(getattr(layer, name, None), "output", None), "LayerNorm", None)
        if isinstance(norm, nn.Module):
            return norm
    return None


def _mlp_norm(layer: nn.Module) -> nn.Module | None:
    """The norm whose output is the MLP's input (its input: resid_mid, or resid_pre if parallel)."""
    for name in MLP_NORM_NAMES:
        if name == "post_attention_layernorm" and hasattr(layer, "post_feedforward_layernorm"):
            continue
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return _bert_mlp_norm(layer)


def _is_parallel(model: nn.Module, layer: nn.Module) -> bool:
    """Whether attention and MLP both read the layer's input (no resid_mid between them)."""
    flag = getattr(layer, "use_parallel_residual", None)
    if isinstance(flag, bool):
        return flag
    config = getattr(model, "config", None)
    configs = [config, getattr(config, "text_config", None)]
    return any(getattr(c, f, None) is True for c in configs if c is not None for f in PARALLEL_FLAGS)


def _layer_kinds(model: nn.Module, layer: nn.Module) -> list[str]:
    """The HOOK_KINDS this layer has."""
    kinds = []
    for kind in HOOK_KINDS:
        if kind in _MLP_INPUT_KINDS:
            ok = _mlp_norm(layer) is not None and not (kind == "hook_resid_mid" and _is_parallel(model, layer))
        elif kind in ("hook_attn_out", "hook_mlp_out"):
            ok = _sub_block(layer, kind[5:-4]) is not None
        else:
            ok = True
        if ok:
            kinds.append(kind)
    return kinds


def valid_hook_names(model: nn.Module) -> list[str]:
    """TransformerLens-style names this model supports (module paths from named_modules() work too).

    For a model without a recognised layer list, the module paths are the valid names."""
    try:
        _, layers = find_layers(model)
    except ValueError:
        return [name for name, _ in model.named_modules() if name]
    return [f"blocks.{i}.{kind}" for i, layer in enumerate(layers) for kind in _layer_kinds(model, layer)]


def _unknown_hook_message(model: nn.Module, name: str) -> str:
    valid = valid_hook_names(model)
    if len(valid) <= _MAX_LISTED:
        listed = ", ".join(valid)
    else:
        _, layers = find_layers(model)
        kinds = _layer_kinds(model, layers[0])
        listed = (f"blocks.{{i}}.{{{','.join(kinds)}}} for i in 0..{len(layers) - 1} "
                  f"(e.g. {', '.join(valid[:4])}, ...)")
    return (f"Unknown hook name {name!r} for {type(model).__name__}. Valid names: {listed}; or a module "
            f"path from model.named_modules(), e.g. {_example_paths(model)}.")


def _mlp_input_point(model: nn.Module, name: str, layer: nn.Module, i: int, kind: str) -> HookPoint:
    norm = _mlp_norm(layer)
    if norm is None:
        raise ValueError(f"Hook {name!r}: found no norm before the MLP in {type(layer).__name__} (looked for "
                         f"{', '.join(MLP_NORM_NAMES)} and BERT-style attention.output.LayerNorm); pass the "
                         f"module path of the MLP's input instead ({_example_paths(layer)} inside the layer).")
    if kind == "ln2.hook_normalized":
        return HookPoint(name, norm)
    if kind == "hook_mlp_in":
        return HookPoint(name, norm, is_input=True)
    if _is_parallel(model, layer):
        raise ValueError(f"Hook {name!r}: {type(layer).__name__} has a parallel residual (attention and MLP "
                         f"both read resid_pre), so there is no resid_mid. Use blocks.{i}.ln2.hook_normalized "
                         f"(the MLP's input after its norm), blocks.{i}.hook_mlp_in (before the norm, equal to "
                         f"resid_pre here) or blocks.{i}.hook_resid_pre instead.")
    # pre-LN: the layer adds the MLP's output to its own copy of resid_mid, so a replacement's change
    # is carried into the layer's output; post-LN (BERT-style): the norm's output is the residual itself
    return HookPoint(name, norm, is_input=True, carry=None if norm is _bert_mlp_norm(layer) else layer)


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
        return HookPoint(name, module)
    _, layers = find_layers(model)
    i, kind = int(match[1]), match[2]
    if i >= len(layers):
        raise ValueError(f"Hook {name!r}: {type(model).__name__} has {len(layers)} layers (0..{len(layers) - 1}); "
                         "use a layer index in that range.")
    if kind in ("hook_resid_pre", "hook_resid_post"):
        return HookPoint(name, layers[i], is_input=kind == "hook_resid_pre")
    if kind in _MLP_INPUT_KINDS:
        return _mlp_input_point(model, name, layers[i], i, kind)
    module = _sub_block(layers[i], kind[5:-4])
    if module is None:
        raise ValueError(f"Hook {name!r}: found no {kind[5:-4]} sub-module in {type(layers[i]).__name__}; "
                         f"pass its module path instead ({_example_paths(layers[i])} inside the layer).")
    return HookPoint(name, module)


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list, ModelOutput)) else value


def _input_of(point: HookPoint, args: tuple, kwargs: dict) -> Tensor:
    # transformers 5 passes the residual stream positionally, but some callers use hidden_states=
    if args:
        return args[0]
    if "hidden_states" not in kwargs:
        raise ValueError(f"hook {point.name!r} found no positional input and no hidden_states= among "
                         f"{sorted(kwargs)} of {type(point.module).__name__}; hook a module's output instead.")
    return kwargs["hidden_states"]


def _replace_first(output: Any, new: Tensor) -> Any:
    """`output` with its activation (the first element of tuples and ModelOutputs) replaced by `new`."""
    if isinstance(output, ModelOutput):
        output[next(iter(output.keys()))] = new
        return output
    if isinstance(output, (tuple, list)):
        return type(output)((new, *output[1:]))
    return new


Handle = torch.utils.hooks.RemovableHandle


def _register_input(point: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> list[Handle]:
    delta: list[Tensor] = []  # a replacement's change, for `carry` to add to its output in the same forward

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        old = _input_of(point, args, kwargs)
        new = fn(old)
        if new is None:
            return None
        if point.carry is not None:
            delta[:] = [new - old]
        if args:
            return (new, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": new}

    def carry_hook(module: nn.Module, args: tuple, output: Any) -> Any:
        return _replace_first(output, _first(output) + delta.pop()) if delta else None

    handles = [point.module.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    if point.carry is not None:  # prepend: hooks reading this output see the carried change
        handles.append(point.carry.register_forward_hook(carry_hook, prepend=True))
    return handles


def _register(point: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> list[Handle]:
    """Call fn on the point's activation; a non-None result replaces it (the first element of tuples)."""
    if point.is_input:
        return _register_input(point, fn)

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        new = fn(_first(output))
        return None if new is None else _replace_first(output, new)
    return [point.module.register_forward_hook(hook)]


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

    handles: list[Handle] = []
    try:
        for point in points:
            handles.extend(_register(point, recorder(point)))
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
    (the input of the hooked module for resid_pre / resid_mid / mlp_in, the first element of tuple
    outputs; a resid_mid replacement reaches the layer's output too). Undone on exit, also on errors."""
    handles: list[Handle] = []
    try:
        for name, fn in replacements.items():
            handles.extend(_register(resolve_hook(model, name), fn))
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
