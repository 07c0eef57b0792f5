"""Evaluation, callable on its own and run during training whether or not wandb is on.

Reconstruction metrics are computed in normalized activation space (each hook weighs alike) and say
so in their keys. Explained variance is 1 - SSE/SST over all eval tokens, SST centred on the
per-dimension mean (not a mean of per-token ratios); the overall value is sum SSE / sum SST across hooks.
CE metrics splice one output hook at a time, in raw scale, and need a causal LM; for other models they
are reported as "n/a". A model diff splices each model with its own (model, hook) reconstructions.
With several output hooks (one model) they also splice every output hook at once in one forward (`*_all`
keys: the "replacement model" score of a set of transcoders or a CLT; the reconstructions are those of the
clean activations, not recomputed from the spliced forward's inputs).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .config import layer_labels
from .hooks import forward_kwargs, splice
from .metrics import dead_and_dense_fractions, density_log10
from .modeling import Crosscoder

LOGITS_CHUNK_ELEMENTS = 2**25  # CE evals: prompts per LM forward so that one logits tensor is <= 128 MiB


class _Sums:
    """Running sums that reduce to the metrics; kept as tensors so processes can all-reduce them."""

    def __init__(self, n_out: int, d_model: int, d_sae: int, device, n_models: int = 1) -> None:
        z = dict(device=device, dtype=torch.float64)
        self.sse = torch.zeros(n_out, **z)
        self.sum_y = torch.zeros(n_out, d_model, **z)
        self.sum_y2 = torch.zeros(n_out, d_model, **z)
        self.fires = torch.zeros(d_sae, **z)
        self.n = torch.zeros((), **z)
        # CE sums over predicted tokens: the clean model, and per output hook spliced / zero-ablated / KL
        self.ce_clean = torch.zeros(n_models, **z)  # per model (model diffing: each its own)
        self.ce_spliced = torch.zeros(n_out, **z)
        self.ce_zero = torch.zeros(n_out, **z)
        self.kl = torch.zeros(n_out, **z)
        # every output hook replaced at once (with several output hooks)
        self.ce_spliced_all, self.ce_zero_all, self.kl_all = (torch.zeros((), **z) for _ in range(3))
        self.n_predicted = torch.zeros((), **z)

    def tensors(self) -> list[Tensor]:
        return [self.sse, self.sum_y, self.sum_y2, self.fires, self.n, self.ce_clean, self.ce_spliced,
                self.ce_zero, self.kl, self.ce_spliced_all, self.ce_zero_all, self.kl_all, self.n_predicted]


def is_causal_lm(model) -> bool:
    """CE-loss evals need next-token logits from the same model the hooks sit in: a class that
    AutoModelForCausalLM builds (GPT2LMHeadModel as well as the *ForCausalLM ones)."""
    if model is None:
        return False
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@torch.no_grad()
def evaluate(crosscoder: Crosscoder, store, n_batches: int, accelerator=None) -> dict:
    """Metrics over `n_batches` fresh batches of `store` (see module docstring for the definitions).

    `store` provides next_tokens(), activations_from_tokens(tokens), scale_out and model (an
    ActivationsStore). Under data parallelism the sums are all-reduced, so every process returns the same.
    """
    cfg = crosscoder.config
    was_training = crosscoder.training
    crosscoder.eval()
    models = spliceable_models(store)
    sums = _Sums(cfg.n_out, cfg.d_model, cfg.d_sae, crosscoder.W_dec.device, max(1, len(models)))
    causal = bool(models) and all(is_causal_lm(model) for model in models)
    for tokens, acts_in, acts_out, keep in _eval_batches(store, n_batches):
        out = crosscoder(acts_in[keep], acts_out[keep])
        _accumulate_reconstruction(sums, out, acts_out[keep])
        if causal:
            recon = torch.zeros_like(acts_out)
            recon[keep] = out.reconstruction.view_as(acts_out[keep]).to(recon.dtype)
            hooks = list(cfg.hook_names_out)
            for m, model in enumerate(models):  # each model with its own (model, hook) reconstructions
                layers = slice(m * len(hooks), (m + 1) * len(hooks))
                _accumulate_ce(sums, model, store.scale_out[layers], hooks, tokens, recon[:, layers], keep, m,
                               m * len(hooks))
    if accelerator is not None and accelerator.num_processes > 1:
        for t in sums.tensors():
            t.copy_(accelerator.reduce(t, "sum"))
    crosscoder.train(was_training)
    return _finish(sums, layer_labels(cfg, "out"), causal, getattr(cfg, "model_names", None))


def spliceable_models(store) -> list:
    """The language model(s) whose hooks the CE evals splice: the store's model, or a model diff's models
    (in model_names order); none for an activation cache."""
    source_models = getattr(getattr(store, "source", None), "models", None)
    if source_models:
        return list(source_models)
    return [store.model] if store.model is not None else []


def _eval_batches(store, n_batches: int):
    """(tokens, acts_in, acts_out, keep) per batch. Training from an activation cache there is no model,
    so no tokens: the batches come from the store's stream (reconstruction metrics only)."""
    for _ in range(n_batches):
        if not getattr(store, "serves_tokens", store.model is not None):
            acts_in, acts_out = store.next_batch()
            yield None, acts_in, acts_out, torch.ones(acts_in.shape[0], dtype=torch.bool, device=acts_in.device)
        else:
            tokens = store.next_tokens()
            yield tokens, *store.activations_from_tokens(tokens)


def _accumulate_reconstruction(sums: _Sums, out, y: Tensor) -> None:
    y = y.double()
    r = out.reconstruction.view_as(y).double()
    sums.sse += (y - r).pow(2).sum(dim=(0, 2))
    sums.sum_y += y.sum(0)
    sums.sum_y2 += y.pow(2).sum(0)
    sums.fires += (out.feature_acts > 0).sum(0).double()
    sums.n += y.shape[0]


def _accumulate_ce(sums: _Sums, model, scale_out: Tensor, hooks: list[str], tokens: Tensor, recon_norm: Tensor,
                   keep: Tensor, m: int = 0, first: int = 0) -> None:
    """CE of clean `model` (the m-th), and with each of its output `hooks` replaced by the reconstruction
    (raw scale) or zeros; KL(clean || spliced) summed over the vocabulary, into the sums of output layers
    first, first + 1, .... Excluded positions (BOS) keep their activation.
    Runs over groups of prompts whose logits stay under LOGITS_CHUNK_ELEMENTS: a whole batch of logits is
    [b, s, vocab] floats (0.8 GB for 32 x 128 pythia tokens, several alive at once), and the full-size
    temporaries cost more time in page faults than the LM head's arithmetic."""
    b, s = tokens.shape
    device = next(model.parameters()).device
    tokens, keep = tokens.to(device), keep.to(device)
    recon = recon_norm.view(b, s, *recon_norm.shape[1:]).to(device)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    rows = max(1, LOGITS_CHUNK_ELEMENTS // (s * vocab))
    for i in range(0, b, rows):
        _accumulate_ce_rows(sums, model, scale_out.to(device), hooks, tokens[i:i + rows], recon[i:i + rows],
                            keep.view(b, s)[i:i + rows], m, first)
    if m == 0:
        sums.n_predicted += b * (s - 1)


def _accumulate_ce_rows(sums: _Sums, model, scale_out: Tensor, hooks: list[str], tokens: Tensor, recon: Tensor,
                        keep: Tensor, m: int, first: int) -> None:
    keep, kwargs = keep[..., None], forward_kwargs(model)
    clean_logp = _next_token_logp(model(tokens, **kwargs).logits)
    clean_p = clean_logp.exp()
    targets = tokens[:, 1:, None]
    sums.ce_clean[m] -= clean_logp.gather(-1, targets).sum().to(sums.ce_clean)
    for j, hook in enumerate(hooks):
        raw = recon[:, :, j] / scale_out[j]

        def with_recon(act: Tensor, raw=raw) -> Tensor:
            return torch.where(keep, raw.to(act.dtype), act)

        with splice(model, {hook: with_recon}):
            spliced_logp = _next_token_logp(model(tokens, **kwargs).logits)
        sums.ce_spliced[first + j] -= spliced_logp.gather(-1, targets).sum().to(sums.ce_spliced)
        sums.kl[first + j] += (clean_p * (clean_logp - spliced_logp)).sum().to(sums.kl)  # KL(clean || spliced)
        del spliced_logp
        with splice(model, {hook: torch.zeros_like}):
            zero_logp = _next_token_logp(model(tokens, **kwargs).logits)
            sums.ce_zero[first + j] -= zero_logp.gather(-1, targets).sum().to(sums.ce_zero)
    if len(hooks) > 1 and sums.ce_clean.numel() == 1:
        _accumulate_ce_all(sums, model, scale_out, hooks, tokens, recon, keep, clean_logp, clean_p)


def _accumulate_ce_all(sums: _Sums, model, scale_out: Tensor, hooks: list[str], tokens: Tensor, recon: Tensor,
                       keep: Tensor, clean_logp: Tensor, clean_p: Tensor) -> None:
    """CE and KL with every output hook replaced by its reconstruction in one forward, and with every
    output hook zeroed (the replacement model's score: how much of the zero-ablation gap it closes)."""
    kwargs, targets = forward_kwargs(model), tokens[:, 1:, None]
    replacements = {}
    for j, hook in enumerate(hooks):
        raw = recon[:, :, j] / scale_out[j]
        replacements[hook] = lambda act, raw=raw: torch.where(keep, raw.to(act.dtype), act)
    with splice(model, replacements):
        spliced_logp = _next_token_logp(model(tokens, **kwargs).logits)
    sums.ce_spliced_all -= spliced_logp.gather(-1, targets).sum().to(sums.ce_spliced_all)
    sums.kl_all += (clean_p * (clean_logp - spliced_logp)).sum().to(sums.kl_all)
    del spliced_logp
    with splice(model, dict.fromkeys(hooks, torch.zeros_like)):
        zero_logp = _next_token_logp(model(tokens, **kwargs).logits)
        sums.ce_zero_all -= zero_logp.gather(-1, targets).sum().to(sums.ce_zero_all)


def _next_token_logp(logits: Tensor) -> Tensor:
    """Log-probabilities at the positions that have a next token, in float32."""
    return F.log_softmax(logits[:, :-1].float(), -1)


def _finish(sums: _Sums, hooks: list[str], causal: bool, model_names: list[str] | None = None) -> dict:
    n = sums.n.clamp(min=1)
    sst = (sums.sum_y2 - sums.sum_y.pow(2) / n).sum(-1)  # centred on the per-dimension mean
    m: dict = {"n_eval_tokens": int(sums.n.item())}
    for j, hook in enumerate(hooks):
        fvu = (sums.sse[j] / sst[j].clamp(min=1e-12)).item()
        m[f"fvu_normalized/{hook}"] = fvu
        m[f"explained_variance_normalized/{hook}"] = 1 - fvu
        m[f"mse_normalized/{hook}"] = (sums.sse[j] / n).item()
    fvu_all = (sums.sse.sum() / sst.sum().clamp(min=1e-12)).item()
    m["fvu_normalized"], m["explained_variance_normalized"] = fvu_all, 1 - fvu_all
    density = sums.fires / n
    m["l0"] = (sums.fires.sum() / n).item()
    m["dead_fraction"], m["dense_fraction"] = dead_and_dense_fractions(density)
    m["feature_density_log10"] = density_log10(density).float().tolist()
    m.update(_finish_ce(sums, hooks, model_names) if causal else {"ce_loss_clean": "n/a"})
    if causal and len(hooks) > 1 and not model_names:
        m.update(_finish_ce_all(sums, m["ce_loss_clean"]))
    return m


def _finish_ce(sums: _Sums, hooks: list[str], model_names: list[str] | None = None) -> dict:
    """CE metrics per output layer; for a model diff each (model, hook) against its own model's clean CE
    (`ce_loss_clean/<model>`; `ce_loss_clean` is then their mean)."""
    n_pred = sums.n_predicted.clamp(min=1)
    clean_per_model = (sums.ce_clean / n_pred).tolist()
    m: dict = {"ce_loss_clean": sum(clean_per_model) / len(clean_per_model)}
    if model_names:
        m.update({f"ce_loss_clean/{name}": value for name, value in zip(model_names, clean_per_model)})
    per_model = len(hooks) // len(clean_per_model)
    for j, hook in enumerate(hooks):
        clean = clean_per_model[j // per_model]
        spliced = (sums.ce_spliced[j] / n_pred).item()
        zero = (sums.ce_zero[j] / n_pred).item()
        m[f"ce_loss_spliced/{hook}"] = spliced
        m[f"ce_loss_zero_ablated/{hook}"] = zero
        gap = zero - clean
        m[f"ce_loss_score/{hook}"] = (zero - spliced) / gap if abs(gap) > 1e-12 else math.nan
        m[f"kl_div/{hook}"] = (sums.kl[j] / n_pred).item()
    return m


def _finish_ce_all(sums: _Sums, clean: float) -> dict:
    n_pred = sums.n_predicted.clamp(min=1)
    spliced, zero = (sums.ce_spliced_all / n_pred).item(), (sums.ce_zero_all / n_pred).item()
    gap = zero - clean
    return {"ce_loss_spliced_all": spliced, "ce_loss_zero_ablated_all": zero,
            "ce_loss_score_all": (zero - spliced) / gap if abs(gap) > 1e-12 else math.nan,
            "kl_div_all": (sums.kl_all / n_pred).item()}


def scalar_metrics(metrics: dict) -> dict:
    """The metrics that are plain numbers (for logs and tables)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

