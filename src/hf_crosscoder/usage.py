"""Using a downloaded crosscoder on its model: latents per token, and splicing reconstructions in.

A published crosscoder has its activation normalization folded into the weights, so the model's raw
activations at `config.hook_names_in` go straight in:

    crosscoder = Crosscoder.from_pretrained("org/name")
    [(tokens, acts)] = feature_activations(crosscoder, "EleutherAI/pythia-70m", texts=["Hello"])
    with spliced(crosscoder, model):      # output hooks now carry the reconstruction
        logits = model(input_ids).logits
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from .config import hook_union
from .hooks import capture_activations, splice


def load_model(name: str, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a Hub id or local folder: AutoModelForCausalLM, falling back to AutoModel
    for architectures without an LM head (BERT-style encoders). tokenizer is None when there is none."""
    kwargs = {"dtype": dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except ValueError:  # "Unrecognized configuration class ... for AutoModelForCausalLM"
        model = AutoModel.from_pretrained(name, **kwargs)
    if device is not None:
        model = model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError):  # a folder without tokenizer files: input_ids still work
        tokenizer = None
    return model.eval(), tokenizer


def _resolve_model(crosscoder: nn.Module, model: nn.Module | str | None, tokenizer: Any) -> tuple[nn.Module, Any]:
    if model is None:
        model = crosscoder.config.model_name
        if not model:
            raise ValueError("This crosscoder's config has no model_name; pass the model (an object, a Hub id "
                             "or a local folder) it was trained on.")
    if isinstance(model, str):
        loaded, loaded_tokenizer = load_model(model, device=crosscoder.device)
        return loaded, tokenizer if tokenizer is not None else loaded_tokenizer
    return model, tokenizer


def _resolve_models(crosscoder: nn.Module, model: Any, tokenizer: Any) -> tuple[list[nn.Module], Any]:
    """The model(s) the crosscoder reads: one, or for a model diff one per entry of `config.model_names`
    (given as a list of modules / names, or by default loaded by those names), with the tokenizer."""
    names = getattr(crosscoder.config, "model_names", None)
    if not names:
        one, tokenizer = _resolve_model(crosscoder, model, tokenizer)
        return [one], tokenizer
    given = list(names) if model is None else list(model) if isinstance(model, (list, tuple)) else [model]
    if len(given) != len(names):
        raise ValueError(f"this crosscoder diffs {len(names)} models ({', '.join(names)}); pass a list of "
                         f"{len(names)} models (objects, Hub ids or folders) in that order, not {len(given)}.")
    resolved = [_resolve_model(crosscoder, m, tokenizer) for m in given]
    return [m for m, _ in resolved], tokenizer if tokenizer is not None else resolved[0][1]


def _token_id_lists(tokenizer: Any, texts: Sequence[str] | None, input_ids: Any,
                    attention_mask: Any) -> list[list[int]]:
    """One list of token ids per sequence (padding removed when an attention mask is given)."""
    if input_ids is not None:
        rows = [torch.as_tensor(row).tolist() for row in input_ids]
        if attention_mask is not None:
            rows = [[t for t, m in zip(row, torch.as_tensor(mask).tolist()) if m] for row, mask in
                    zip(rows, attention_mask)]
        return rows
    if texts is None:
        raise ValueError("Pass texts (with a tokenizer, or a model name to load one) or input_ids.")
    if tokenizer is None:
        raise ValueError("texts need a tokenizer: pass tokenizer=..., a model name instead of a model "
                         "object, or token ids as input_ids=...")
    if isinstance(texts, str):
        texts = [texts]
    return [list(tokenizer(text)["input_ids"]) for text in texts]


def _pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Right-padded ids and mask: real tokens keep their positions (causal and bidirectional models)."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _stacked_inputs(crosscoder: nn.Module, acts: dict[str, Tensor]) -> Tensor:
    """[batch, seq, n_in, d_model] on the crosscoder's device and dtype, in hook_names_in order."""
    x = torch.stack([acts[name] for name in crosscoder.config.hook_names_in], dim=2)
    return x.to(device=crosscoder.W_enc.device, dtype=crosscoder.W_enc.dtype)


@torch.no_grad()
def feature_activations(crosscoder: nn.Module, model: nn.Module | str | None = None, tokenizer: Any = None,
                        texts: Sequence[str] | str | None = None, *, input_ids: Any = None,
                        attention_mask: Any = None, batch_size: int = 8) -> list[tuple[Any, Tensor]]:
    """Latent activations per token: one `(tokens, acts [seq, d_sae])` per text or input_ids row.

    `model` is a module or a name (loaded with `load_model`; default: the crosscoder's
    `config.model_name`); for a model diff a list of them, one per `config.model_names` (default: those). With a tokenizer, `tokens` are token strings; on the tokenizer-free path
    (`input_ids=` a tensor or lists of ids, optional `attention_mask=` to drop padding) they are the ids.
    """
    models, tokenizer = _resolve_models(crosscoder, model, tokenizer)
    rows = _token_id_lists(tokenizer, texts, input_ids, attention_mask)
    pad_id = getattr(tokenizer, "pad_token_id", None) or 0
    results = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        parts = []
        for one in models:  # a model diff: the same tokens through every model, layers model-major
            ids, mask = _pad(batch, pad_id, _model_device(one))
            parts.append(_stacked_inputs(crosscoder, capture_activations(one, crosscoder.config.hook_names_in, ids,
                                                                         attention_mask=mask)))
        x = torch.cat(parts, dim=2)
        feats = crosscoder.encode(x.flatten(0, 1)).view(x.shape[0], x.shape[1], -1)
        for i, row in enumerate(batch):
            tokens = tokenizer.convert_ids_to_tokens(row) if tokenizer is not None else torch.tensor(row)
            results.append((tokens, feats[i, :len(row)].cpu()))
    return results


class _Splicer:
    """Per forward: record the input hooks' activations, and at each output hook return the crosscoder's
    reconstruction of it (computed once, when the first output hook fires)."""

    def __init__(self, crosscoder: nn.Module) -> None:
        self.crosscoder = crosscoder
        self.hooks_in = list(crosscoder.config.hook_names_in)
        self.hooks_out = list(crosscoder.config.hook_names_out)
        self.reset()

    def reset(self) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.recon: Tensor | None = None
        self.served = 0

    def fn(self, name: str):
        def hook(act: Tensor) -> Tensor | None:
            if name in self.hooks_in:
                if name in self.inputs:
                    self.reset()  # the hook fired again: a new forward began
                self.inputs[name] = act
            if name not in self.hooks_out:
                return None
            return self._output(name, act)
        return hook

    @torch.no_grad()
    def _output(self, name: str, act: Tensor) -> Tensor:
        if self.recon is None:
            missing = [h for h in self.hooks_in if h not in self.inputs]
            if missing:
                self.reset()
                raise ValueError(
                    f"Output hook {name!r} fired before input hook(s) {missing}: splicing computes the "
                    "reconstruction from the inputs captured in the same forward, so every input hook must "
                    "run before the first output hook. This crosscoder reads layers after one it writes "
                    "(acausal); evaluate it on captured activations instead (crosscoder(acts_in)).")
            x = _stacked_inputs(self.crosscoder, self.inputs)
            batch, seq = x.shape[:2]
            self.recon = self.crosscoder(x.flatten(0, 1)).reconstruction.view(batch, seq, len(self.hooks_out), -1)
        out = self.recon[:, :, self.hooks_out.index(name)].to(device=act.device, dtype=act.dtype)
        self.served += 1
        if self.served == len(self.hooks_out):
            self.reset()
        return out


@contextmanager
def spliced(crosscoder: nn.Module, model: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every forward of `model` has each output hook's activation replaced by the
    crosscoder's reconstruction of it, computed from the input hooks' activations of the same forward.

    Needs every input hook to run before the first output hook (SAEs, transcoders, causal
    crosscoders); an acausal crosscoder raises a ValueError from the forward. Undone on exit."""
    if getattr(crosscoder.config, "model_names", None):
        raise ValueError("spliced() runs one model, but this crosscoder's reconstruction of each model reads "
                         "every model's inputs (model diffing); measure the splices with hf_crosscoder.evals."
                         "evaluate (CE per model) instead.")
    splicer = _Splicer(crosscoder)
    names = hook_union(splicer.hooks_in, splicer.hooks_out)
    with splice(model, {name: splicer.fn(name) for name in names}):
        yield model
