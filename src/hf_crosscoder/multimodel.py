"""Several frozen models on the same tokens: the activation source of model diffing (`model_names`).

`MultiModelActivationSource` reads one token stream (one tokenizer, the same packing and positions for
every model) and runs each model on the identical batch with the single-model `ActivationHarvester`
(each stopped after its own last needed hook), then concatenates the rows model-major: row layer
`m * n_hooks + h` is model m's hook h, named `model/hook` (config.layer_labels). The store's per-layer
scales then normalize each (model, hook) on its own.

Before any weights load, the models must agree on what makes the rows comparable: the tokenizer
(vocabulary and special tokens; the error names the first difference) and d_model (from each model's
config; the error names both sizes). The dataset is opened next, then the weights, each model on its
own device (`model_devices`, default the training device).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer

from .config import per_model
from .harvest import (
    ActivationHarvester,
    TokenRowsSource,
    check_context_size,
    checked_model_config,
    freeze,
    load_weights,
)
from .hooks import check_d_model, model_hidden_size


def tokenizer_difference(a: Any, b: Any) -> str | None:
    """The first difference between two tokenizers' vocabularies and special tokens, in words (None if
    they agree on both)."""
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    for token, index in sorted(vocab_a.items(), key=lambda item: item[1]):
        if vocab_b.get(token) != index:
            other = "is missing" if token not in vocab_b else f"has id {vocab_b[token]}"
            return f"token {token!r} has id {index} in the first and {other} in the second"
    extra = sorted((index, token) for token, index in vocab_b.items() if token not in vocab_a)
    if extra:
        return f"token {extra[0][1]!r} (id {extra[0][0]}) is only in the second"
    map_a, map_b = a.special_tokens_map, b.special_tokens_map
    for key in sorted(set(map_a) | set(map_b)):
        if map_a.get(key) != map_b.get(key):
            return f"special token {key} is {map_a.get(key)!r} in the first and {map_b.get(key)!r} in the second"
    return None


def check_same_tokenizers(names: Sequence[str], tokenizers: Sequence[Any]) -> None:
    """Every model must tokenize alike: the rows of one token batch are then the same positions."""
    for name, tokenizer in zip(names[1:], tokenizers[1:]):
        difference = tokenizer_difference(tokenizers[0], tokenizer)
        if difference is not None:
            raise ValueError(f"model diffing needs one tokenizer, but those of {names[0]} and {name} differ: "
                             f"{difference}. Diff models that share a tokenizer (a model and its fine-tune).")


def check_same_d_model(names: Sequence[str], configs: Sequence[Any]) -> None:
    sizes = [model_hidden_size(config) for config in configs]
    for name, size in zip(names[1:], sizes[1:]):
        if size != sizes[0]:
            raise ValueError(f"model diffing needs one d_model, but {names[0]} has hidden size {sizes[0]} and "
                             f"{name} has {size}. Diff models of the same width.")


def load_models(cfg: Any, device: str | torch.device | None = None,
                before_weights: Any = None) -> tuple[list[nn.Module], Any]:
    """The frozen models of `cfg.model_names` and their shared tokenizer, each model on its entry of
    `cfg.model_devices` (default `device`). The tokenizers, d_model and hook names are checked and
    `before_weights(tokenizer)` (opening the dataset) runs before any weights load."""
    names = list(cfg.model_names)
    tokenizers = [AutoTokenizer.from_pretrained(name) for name in names]
    check_same_tokenizers(names, tokenizers)
    check_same_d_model(names, [AutoConfig.from_pretrained(name) for name in names])
    checked = [checked_model_config(cfg, name) for name in names]
    if before_weights is not None:
        before_weights(tokenizers[0])
    devices = list(cfg.model_devices) if cfg.model_devices else [device] * len(names)
    models = [load_weights(cls, config, name, cfg, dev) for (cls, config), name, dev in zip(checked, names, devices)]
    return models, tokenizers[0]


def models_for(cfg: Any, models: Sequence[nn.Module] | nn.Module | None, tokenizer: Any,
               device: str | torch.device | None, before_weights: Any) -> tuple[list[nn.Module], Any]:
    """(the models of `cfg.model_names`, their tokenizer): those given, checked, else loaded (load_models)."""
    if models is None:
        return load_models(cfg, device, before_weights)
    return checked_models(cfg, models, tokenizer), tokenizer


def checked_models(cfg: Any, models: Sequence[nn.Module] | nn.Module, tokenizer: Any) -> list[nn.Module]:
    """Models given for `cfg.model_names` (one per name, in order, with their tokenizer), checked against the
    config's d_model and context size."""
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if len(models) != len(cfg.model_names):
        raise ValueError(f"model diffing got {len(models)} model(s) for the {len(cfg.model_names)} of model_names; "
                         "pass one model per entry, in the same order.")
    if tokenizer is None:
        raise ValueError("got models without their tokenizer; pass tokenizer= too.")
    for model, name in zip(models, cfg.model_names):
        check_d_model(model.config, cfg.d_model, name)
        check_context_size(model.config, cfg.context_size, name)
    return models


class MultiModelHarvester:
    """The harvesters of several models as one: (rows [m, n_models * n_hooks, d_model] float32 model-major,
    special-token mask [m]) for one token batch, on `device`."""

    def __init__(self, harvesters: Sequence[ActivationHarvester], device: str | torch.device | None = None) -> None:
        self.harvesters = list(harvesters)
        self.device = self.harvesters[0].device  # where token batches are made
        self.out_device = torch.device(device) if device is not None else self.device

    @classmethod
    def for_models(cls, models: Sequence[nn.Module], tokenizer: Any, hooks: Sequence[str], cfg: Any,
                   device: str | torch.device | None = None) -> MultiModelHarvester:
        return cls([ActivationHarvester(m, tokenizer, hooks, cfg) for m in models], device)

    def __call__(self, tokens: Tensor, drop_special: bool = False) -> tuple[Tensor, Tensor]:
        parts = [harvester(tokens, drop_special) for harvester in self.harvesters]
        special = parts[0][1].to(self.out_device)
        return torch.cat([acts.to(self.out_device) for acts, _ in parts], dim=1), special


class MultiModelActivationSource(TokenRowsSource):
    """Raw activation rows of `hook_names` from every model of `cfg.model_names`, on one token stream.

    `models` (one per name, with their shared `tokenizer`) default to loading `cfg.model_names` (checks
    first, see the module docstring). `hook_names` are the plain hooks (each once); `self.hook_names` are
    the stored layers, `model/hook` model-major."""

    def __init__(self, cfg: Any, hook_names: Sequence[str], models: Sequence[nn.Module] | None = None,
                 tokenizer: Any = None, device: str | torch.device | None = None) -> None:
        self.cfg, self.names = cfg, list(cfg.model_names)
        hooks = list(dict.fromkeys(hook_names))
        self.hook_names = per_model(self.names, hooks)
        models, tokenizer = models_for(cfg, models, tokenizer, device, self._open_tokens)
        self.models, self.tokenizer = [freeze(m) for m in models], tokenizer
        self.model = None  # no single model for CE splices (reconstruction evals run on held-out tokens)
        self.harvester = MultiModelHarvester.for_models(self.models, tokenizer, hooks, cfg, device)
        if self.tokens is None:
            self._open_tokens(tokenizer)
        self.provenance: dict[str, Any] = {}
