"""Harvesting: load the frozen model and run it with hooks on token rows (dataset -> hooks -> rows).

- `load_model_and_tokenizer`: checks the model's config (d_model, context size) and the hook names on a
  weightless copy, then lets the caller open the dataset, all before any weights load.
- `ActivationHarvester`: the frozen model's hooked activations of token rows, [m, n_hooks, d_model]
  float32, every hook once, the forward stopped after the last hooked layer.
- `LMActivationSource`: the activation source `ActivationsStore` reads from a language model (the
  store's other source is an activation cache, cache.CachedActivationsReader). A source yields raw
  rows for its `hook_names` (`next_chunk`), knows its position (`state_dict` / `load_state_dict`), and
  may offer precomputed `mean_norms()`; one over a model also serves tokens for CE evals.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import transformers
from accelerate import PartialState
from torch import Tensor, nn
from transformers import AutoConfig, AutoTokenizer
from transformers.integrations import deepspeed as hf_deepspeed

from .cli import no_progress_bars
from .config import torch_dtype
from .data import special_token_mask, train_and_eval_streams
from .hooks import capture_activations, check_d_model, find_layers, resolve_hook


def model_class(name: str) -> type:
    """The transformers class named `name` (AutoModelForCausalLM, AutoModel, GPTNeoXForCausalLM, ...)."""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ValueError(f"model_class_name={name!r} is not a transformers model class; use "
                         "AutoModelForCausalLM (decoders), AutoModel (encoders such as BERT) or another "
                         "transformers Auto class.")
    return cls


def check_context_size(model_config: Any, context_size: int, model_name: str) -> None:
    limit = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", None)
    if isinstance(limit, int) and context_size > limit:
        raise ValueError(f"context_size={context_size} exceeds the {limit} positions of {model_name}; set "
                         f"context_size <= {limit}.")


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


@contextmanager
def loading_whole() -> Iterator[None]:
    """Load models unpartitioned under a DeepSpeed ZeRO-3 launch. While one is active, transformers builds
    every `from_pretrained` model inside `deepspeed.zero.Init` (parameters sharded, empty locally), but
    the frozen LM is never wrapped by a DeepSpeed engine, so each process needs all of its weights."""
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def check_hooks_before_loading(cls: Any, config: Any, hook_names: Sequence[str]) -> None:
    """Resolve the hook names on a weightless (meta-device) copy of the model, so a wrong name fails
    before the weights load. A model class that cannot be built there is checked once loaded instead."""
    try:  # whole (no ZeRO-3 partitioning) and without touching the RNG the crosscoder's init draws from
        with loading_whole(), torch.random.fork_rng(devices=[]), torch.device("meta"):
            skeleton = cls.from_config(config)
    except Exception:  # noqa: BLE001 (any failure only postpones the check to the loaded model)
        return
    for name in dict.fromkeys(hook_names):
        resolve_hook(skeleton, name)


def checked_model_config(cfg: Any, model_name: str) -> tuple[type, Any]:
    """(model class, model config) of `model_name`, checked against `cfg.d_model` / `cfg.context_size` and
    the hook names on a weightless copy: everything about the model that can fail before its weights load."""
    cls = model_class(cfg.model_class_name)
    config = AutoConfig.from_pretrained(model_name)
    check_d_model(config, cfg.d_model, model_name)
    check_context_size(config, cfg.context_size, model_name)
    check_hooks_before_loading(cls, config, [*cfg.hook_names_in, *cfg.hook_names_out])
    return cls, config


def load_weights(cls: Any, config: Any, model_name: str, cfg: Any,
                 device: str | torch.device | None = None) -> nn.Module:
    """The frozen model's weights (whole, also under ZeRO-3), on `device` when given."""
    with loading_whole(), no_progress_bars():
        model = cls.from_pretrained(model_name, config=config, dtype=torch_dtype(cfg.dtype))
    if device is not None:
        model.to(device)
    return freeze(model)


def load_model_and_tokenizer(cfg: Any, device: str | torch.device | None = None,
                             before_weights: Any = None) -> tuple[nn.Module, Any]:
    """Frozen model and tokenizer from `cfg.model_name`. The config is checked against `cfg.d_model` /
    `cfg.context_size` and the hook names against the model's modules first, and `before_weights(tokenizer)`
    (e.g. opening the dataset) runs next, so all of these fail before any weights load."""
    cls, config = checked_model_config(cfg, cfg.model_name)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model_name)
    if before_weights is not None:
        before_weights(tokenizer)
    return load_weights(cls, config, cfg.model_name, cfg, device), tokenizer


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class ActivationHarvester:
    """Runs the frozen model on token rows and returns the hooks' raw activations, stacked.

    Shared by `LMActivationSource` (training) and `CacheActivationsRunner`. With `cfg.compile_llm`, each layer's
    forward is compiled in place (hooks on layer modules stay outside the compiled code, so the early
    stop's exception is raised in eager mode)."""

    def __init__(self, model: nn.Module, tokenizer: Any, hook_names: Sequence[str], cfg: Any) -> None:
        self.model, self.hook_names = model, list(dict.fromkeys(hook_names))  # each hook captured once
        self.d_model = cfg.d_model
        for name in self.hook_names:
            resolve_hook(model, name)  # unknown names fail here, before any forward
        self.device = model_device(model)
        self.autocast = bool(cfg.autocast_lm) and self.device.type == "cuda"
        self.tokenizer = tokenizer
        if cfg.compile_llm:
            for layer in find_layers(model)[1]:
                layer.forward = torch.compile(layer.forward)

    def __call__(self, tokens: Tensor, drop_special: bool = False) -> tuple[Tensor, Tensor]:
        """(activations [m, n_hooks, d_model] float32, special-token mask [m]) for tokens [b, s]: all
        m = b*s positions, or with `drop_special` only the non-special ones (in order)."""
        tokens = tokens.to(self.device)
        special = special_token_mask(tokens, self.tokenizer).flatten()
        rows = (~special).nonzero().squeeze(1) if drop_special else None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            acts = capture_activations(self.model, self.hook_names, tokens, stop_early=True)
        self._check_acts(acts)
        first = acts[self.hook_names[0]]
        out = torch.empty(len(special) if rows is None else len(rows), len(self.hook_names), first.shape[-1],
                          dtype=torch.float32, device=self.device)
        for h, name in enumerate(self.hook_names):
            # one hook at a time, dropping each captured tensor once copied: no stacked copy of the whole
            # chunk next to the captured one (at most one hook's rows are gathered extra)
            flat = acts.pop(name).flatten(0, 1)
            out[:, h] = flat if rows is None else flat[rows]
        return out, special if rows is None else special[rows]

    def _check_acts(self, acts: dict[str, Tensor]) -> None:
        wrong = {name: a.shape[-1] for name, a in acts.items() if a.shape[-1] != self.d_model}
        if wrong:  # a raw module path can name any module, e.g. an MLP's up-projection
            raise ValueError(f"hook(s) {wrong} output a width other than d_model={self.d_model}; hook modules "
                             "that write the residual stream (resid_pre/resid_post/attn_out/mlp_out).")
        # per hook: isfinite's temporaries are then one hook's size, not the chunk's (torch.isfinite of a
        # whole float32 chunk allocates ~1.75 chunks)
        bad = [name for name in self.hook_names if not bool(torch.isfinite(acts[name]).all())]
        if bad:
            dtype = next(self.model.parameters()).dtype
            fix = ("check the model's weights (they may hold NaN/inf) and the input tokens"
                   if dtype == torch.float32 and not self.autocast else
                   "load the model with dtype='float32' (and autocast_lm=False)")
            raise ValueError(f"activations of hook(s) {bad} contain NaN/inf (model dtype {dtype}); {fix}.")


def mean_norm_stats(acts: Tensor, special: Tensor) -> tuple[Tensor, Tensor]:
    """(sum over non-special rows of each hook's L2 norm [n_hooks] float64, number of such rows)."""
    norms = acts.norm(dim=-1)[~special]  # norms first: masking [m, n_hooks] copies no activations
    count = torch.tensor(float(len(norms)), dtype=torch.float64, device=acts.device)
    return norms.sum(0, dtype=torch.float64), count


class TokenRowsSource:
    """What every LM-backed source shares: this process's training token stream and held-out eval split
    (data.train_and_eval_streams), harvested by `self.harvester`; subclasses set `harvester` and call
    `_open_tokens(tokenizer)` (before any weights load, so the dataset is checked first)."""

    cfg: Any
    harvester: Any
    tokens: Any = None
    eval_tokens: Any = None

    def _open_tokens(self, tokenizer: Any) -> None:
        state = PartialState()
        self.tokens, self.eval_tokens = train_and_eval_streams(self.cfg, tokenizer, state.process_index,
                                                               state.num_processes)

    def next_chunk(self) -> tuple[Tensor, Tensor]:
        """(rows [m, n_hooks, d_model] float32 raw, special-token mask [m]) of the next harvest."""
        return self.harvester(self.next_tokens(), drop_special=self.cfg.exclude_special_tokens)

    def next_tokens(self) -> Tensor:
        """The next `store_batch_size_prompts` packed rows [n, context_size] on the harvest device."""
        return self.tokens.next_batch(self.cfg.store_batch_size_prompts).to(self.harvester.device)

    def next_eval_tokens(self) -> Tensor:
        """The next rows of the held-out eval split (the training stream's when nothing is held out)."""
        stream = self.eval_tokens if self.eval_tokens is not None else self.tokens
        return stream.next_batch(self.cfg.store_batch_size_prompts).to(self.harvester.device)

    def reset_eval_tokens(self) -> None:
        if self.eval_tokens is not None:
            self.eval_tokens = self.eval_tokens.restricted(self.eval_tokens.start_doc, self.eval_tokens.end_doc)

    def mean_norms(self) -> Tensor | None:
        return None  # estimated by the store from the first chunks (per stored layer)

    def state_dict(self) -> dict[str, int]:
        return self.tokens.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.tokens.load_state_dict(state)


class LMActivationSource(TokenRowsSource):
    """Raw activation rows of `hook_names` from the frozen model on this process's token stream.

    `model`/`tokenizer` default to `load_model_and_tokenizer(cfg, device)` (the dataset is opened and
    checked before the weights load). Rows drop special-token positions when `cfg.exclude_special_tokens`."""

    def __init__(self, cfg: Any, hook_names: Sequence[str], model: nn.Module | None = None, tokenizer: Any = None,
                 device: str | torch.device | None = None) -> None:
        self.cfg, self.hook_names = cfg, list(hook_names)
        if model is None:
            model, tokenizer = load_model_and_tokenizer(cfg, device, before_weights=self._open_tokens)
        elif tokenizer is None:
            raise ValueError("ActivationsStore got a model without its tokenizer; pass tokenizer= too.")
        else:
            check_d_model(model.config, cfg.d_model, cfg.model_name)
            check_context_size(model.config, cfg.context_size, cfg.model_name)
        self.model, self.tokenizer = freeze(model), tokenizer
        self.harvester = ActivationHarvester(model, tokenizer, self.hook_names, cfg)
        if self.tokens is None:
            self._open_tokens(tokenizer)
        self.provenance: dict[str, Any] = {}
