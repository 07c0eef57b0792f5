"""Evaluation, callable on its own and run during training whether or not wandb is on.

SAEBench's core metrics under SAEBench's names (sae_bench/evals/core/main.py, functions
get_sparsity_and_variance_metrics, get_recons_loss, get_downstream_reconstruction_metrics,
calculate_misc_metrics, calculate_max_cosine_sim; read at github.com/adamkarvonen/SAEBench), per output hook
(key f"{name}/{hook}") where SAEBench has one hook, over the eval tokens x (targets) and their
reconstructions x_hat, in normalized activation space (each hook scaled to mean norm sqrt(d_model)):

- `explained_variance` = 1 - E||x - x_hat||^2 / E||x - E[x]||^2 over all eval tokens (the mean centred per
  dimension): SAEBench's "new (correct) formula". (Its code computes the total variance as
  E||x||^2 - (mean_d E[x_d^2])^2, squaring second moments instead of means; we keep the stated definition.
  Its `explained_variance_legacy`, a mean of per-token ratios centred on each batch, is not reported.)
  Without a hook: all output hooks together, 1 - sum SSE / sum SST. `fvu` = 1 - explained_variance.
- `mse` = E||x - x_hat||^2 (summed over d_model, averaged over tokens), in the model's raw activation
  scale (what SAEBench measures on a folded model); `mse_normalized` the same in normalized space.
  (SAEBench divides each token's error by its batch's token count as well, which makes its number depend
  on the eval batch size; we do not.)
- `cossim` = E[<x, x_hat> / (||x|| ||x_hat||)] (a zero vector counts as cosine 0, where SAEBench gets NaN).
- `l2_ratio` = E[||x_hat|| / ||x||] (||x|| < 1e-4 divides by 1, as SAEBench).
- `relative_reconstruction_bias` = E[||x_hat||^2] / E[<x, x_hat>] (Gated SAE paper eq. 10), over all eval
  tokens (SAEBench averages the per-batch ratios).
- `l0` = E[#{s: f_s != 0}], `l1` = E[sum_s f_s] per token; `frac_alive` = share of latents that fired on
  any eval token; `freq_over_1_percent` / `freq_over_10_percent` = share of latents firing on more than 1%
  / 10% of eval tokens (densities: f_s > 0).
- causal LMs, one output hook spliced at a time (reconstruction in raw scale; special-token positions keep
  their activation): `ce_loss_without_sae`, `ce_loss_with_sae`, `ce_loss_with_ablation` (the hook
  zero-ablated), `ce_loss_score` = (with_ablation - with_sae) / (with_ablation - without_sae);
  `kl_div_with_sae` / `kl_div_with_ablation` = E KL(clean || spliced), summed over the vocabulary,
  `kl_div_score` = (with_ablation - with_sae) / with_ablation. Means over the predicted positions whose
  input token is not special (with exclude_special_tokens; SAEBench's ignore_tokens), all otherwise.
  Other models: these keys are None.
- `average_max_encoder_cosine_sim` / `average_max_decoder_cosine_sim`: mean over latents of the largest
  cosine similarity of its encoder (decoder) vector with any other latent's, on the concatenation over
  hooks; per output hook for the decoder (among the latents that write that hook).

A model diff (`model_names`) splices each model with its own (model, hook) reconstructions, keys per
`model/hook` and `ce_loss_without_sae/<model>` (`ce_loss_without_sae` is then the models' mean). With several
output hooks (one model) the CE/KL metrics are also taken with every output hook spliced at once in one
forward (`*_all` keys: the "replacement model" score of a set of transcoders or a CLT; the reconstructions
are those of the clean activations, not recomputed from the spliced forward's inputs), against every output
hook zero-ablated at once. For a CLT or a per-layer transcoder set whose input hooks are not output hooks,
`*_replacement` keys are the closed-loop replacement model (circuit-tracer's): in one forward every output
hook is replaced by the reconstruction computed from that same forward's (already spliced) input hooks, so
errors compound through the layers as they do in an attribution graph's replacement model; NaN (null) if an
output hook fires before an input its latents read.

Per-latent statistics (`feature_density`, `max_encoder_cosine_sim`, `max_decoder_cosine_sim[/hook]`) are
tensors in the returned dict: `feature_stats()` picks them (the runner writes feature_stats.safetensors),
`json_metrics()` / `scalar_metrics()` the numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .config import layer_labels
from .hooks import forward_kwargs, splice
from .modeling import Crosscoder

LOGITS_CHUNK_ELEMENTS = 2**25  # CE evals: prompts per LM forward so that one logits tensor is <= 128 MiB
COSINE_CHUNK = 1024  # latents per block of the max-cosine-similarity search (an F x F matrix never exists)
CE_KEYS = ("ce_loss_with_sae", "ce_loss_with_ablation", "ce_loss_score", "kl_div_with_sae", "kl_div_with_ablation",
           "kl_div_score")


class _Sums:
    """Running sums that reduce to the metrics; kept as tensors so processes can all-reduce them."""

    def __init__(self, n_out: int, d_model: int, d_sae: int, device, n_models: int = 1) -> None:
        z = dict(device=device, dtype=torch.float64)
        self.sse = torch.zeros(n_out, **z)
        self.sum_y = torch.zeros(n_out, d_model, **z)
        self.sum_y2 = torch.zeros(n_out, d_model, **z)
        self.cossim = torch.zeros(n_out, **z)  # sums over tokens of cos(x, x_hat), ||x_hat||/||x||, ...
        self.l2_ratio = torch.zeros(n_out, **z)
        self.recon_sq = torch.zeros(n_out, **z)  # ||x_hat||^2
        self.dot = torch.zeros(n_out, **z)  # <x, x_hat>
        self.fires = torch.zeros(d_sae, **z)
        self.nonzero = torch.zeros((), **z)
        self.l1 = torch.zeros((), **z)
        self.n = torch.zeros((), **z)
        # CE sums over predicted tokens: the clean model, and per output hook spliced / zero-ablated / KLs
        self.ce_clean = torch.zeros(n_models, **z)  # per model (model diffing: each its own)
        self.ce_spliced = torch.zeros(n_out, **z)
        self.ce_zero = torch.zeros(n_out, **z)
        self.kl = torch.zeros(n_out, **z)
        self.kl_zero = torch.zeros(n_out, **z)
        # every output hook replaced at once (several output hooks, one model): spliced / zeroed CE, KLs
        self.ce_spliced_all, self.ce_zero_all, self.kl_all, self.kl_zero_all = (torch.zeros((), **z) for _ in range(4))
        self.ce_replacement, self.kl_replacement = torch.zeros((), **z), torch.zeros((), **z)  # closed loop
        self.n_predicted = torch.zeros((), **z)

    def tensors(self) -> list[Tensor]:
        return list(vars(self).values())


def is_causal_lm(model) -> bool:
    """CE-loss evals need next-token logits from the same model the hooks sit in: a class that
    AutoModelForCausalLM builds (GPT2LMHeadModel as well as the *ForCausalLM ones)."""
    if model is None:
        return False
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@torch.no_grad()
def evaluate(crosscoder: Crosscoder, store, n_batches: int, accelerator=None, weight_metrics: bool = True) -> dict:
    """Metrics over `n_batches` eval batches of `store` (see the module docstring for the definitions);
    `weight_metrics=False` skips the max-cosine-similarity searches (O(d_sae^2 d), weights only).

    `store` provides next_eval_tokens() (or next_tokens()), reset_eval_tokens() (optional),
    activations_from_tokens(tokens), scale_out and model (an ActivationsStore). Under data parallelism the sums are all-reduced, so every process
    returns the same.
    """
    cfg = crosscoder.config
    was_training = crosscoder.training
    crosscoder.eval()
    models = spliceable_models(store)
    sums = _Sums(cfg.n_out, cfg.d_model, cfg.d_sae, crosscoder.W_dec.device, max(1, len(models)))
    causal = bool(models) and all(is_causal_lm(model) for model in models)
    hooks = list(cfg.hook_names_out)
    closed = closed_loop_replacement(crosscoder, store.scale_in, store.scale_out) if len(models) == 1 else None
    for tokens, acts_in, acts_out, keep in _eval_batches(store, n_batches):
        out = crosscoder(acts_in[keep], acts_out[keep])
        _accumulate_reconstruction(sums, out, acts_out[keep])
        if causal:
            recon = torch.zeros_like(acts_out)
            recon[keep] = out.reconstruction.view_as(acts_out[keep]).to(recon.dtype)
            for m, model in enumerate(models):  # each model with its own (model, hook) reconstructions
                layers = slice(m * len(hooks), (m + 1) * len(hooks))
                _accumulate_ce(sums, model, store.scale_out[layers], hooks, tokens, recon[:, layers], keep, m,
                               closed)
    if accelerator is not None and accelerator.num_processes > 1:
        for t in sums.tensors():
            t.copy_(accelerator.reduce(t, "sum"))
    crosscoder.train(was_training)
    metrics = _finish(sums, layer_labels(cfg, "out"), store.scale_out.double().to(sums.n.device), causal,
                      getattr(cfg, "model_names", None))
    if causal and closed is not None:
        n_pred = sums.n_predicted.clamp(min=1)
        values = (sums.ce_replacement, sums.ce_zero_all, sums.kl_replacement, sums.kl_zero_all)
        metrics.update(_scores(metrics["ce_loss_without_sae"], *((v / n_pred).item() for v in values), "_replacement"))
    if weight_metrics:
        metrics.update(cosine_metrics(crosscoder))
    return metrics


def closed_loop_replacement(crosscoder: Crosscoder, scale_in: Tensor, scale_out: Tensor):
    """For a cross_layer / per_layer crosscoder whose input and output hooks differ: `make(keep)` giving the
    splice replacements of the closed-loop replacement model (inputs captured as the forward reaches them,
    each output hook rebuilt from the inputs captured so far); None for other crosscoders."""
    cfg = crosscoder.config
    hooks_in, hooks_out = list(cfg.hook_names_in), list(cfg.hook_names_out)
    if (cfg.layer_structure == "dense" or len(hooks_out) < 2 or set(hooks_in) & set(hooks_out)
            or getattr(cfg, "model_names", None)):
        return None
    groups = crosscoder.structure.groups
    reads = [{i for g in groups if j in g.hooks_out for i in g.hooks_in} for j in range(len(hooks_out))]

    def make(keep: Tensor) -> dict:
        captured: dict[int, Tensor] = {}

        def capture(i: int):
            return lambda act: captured.setdefault(i, act)

        def rebuild(j: int):
            def fn(act: Tensor) -> Tensor:
                if not reads[j] <= captured.keys():  # an input this output's latents read comes later
                    return torch.full_like(act, math.nan)
                x = act.new_zeros(act.shape[0] * act.shape[1], len(hooks_in), act.shape[-1], dtype=torch.float32)
                for i, a in captured.items():
                    x[:, i] = a.reshape(len(x), -1).float() * scale_in[i]
                raw = crosscoder(x.to(crosscoder.W_dec.dtype)).reconstruction[:, j] / scale_out[j]
                return torch.where(keep[..., None], raw.view_as(act).to(act.dtype), act)
            return fn

        return {**{h: capture(i) for i, h in enumerate(hooks_in)}, **{h: rebuild(j) for j, h in enumerate(hooks_out)}}

    return make


def spliceable_models(store) -> list:
    """The language model(s) whose hooks the CE evals splice: the store's model, or a model diff's models
    (in model_names order); none for an activation cache."""
    source_models = getattr(getattr(store, "source", None), "models", None)
    if source_models:
        return list(source_models)
    return [store.model] if store.model is not None else []


def _eval_batches(store, n_batches: int):
    """(tokens, acts_in, acts_out, keep) per batch, from the store's eval split. Training from an
    activation cache there is no model, so no tokens: the batches come from the store's stream
    (reconstruction metrics only)."""
    next_tokens = getattr(store, "next_eval_tokens", None) or store.next_tokens
    if hasattr(store, "reset_eval_tokens"):
        store.reset_eval_tokens()  # every evaluation reads the same held-out rows
    for _ in range(n_batches):
        if not getattr(store, "serves_tokens", store.model is not None):
            acts_in, acts_out = store.next_batch()
            yield None, acts_in, acts_out, torch.ones(acts_in.shape[0], dtype=torch.bool, device=acts_in.device)
        else:
            tokens = next_tokens()
            yield tokens, *store.activations_from_tokens(tokens)


def _accumulate_reconstruction(sums: _Sums, out, y: Tensor) -> None:
    y = y.double()
    r = out.reconstruction.view_as(y).double()
    y_norm, r_norm, dot = y.norm(dim=-1), r.norm(dim=-1), (y * r).sum(-1)  # [b, n_out]
    sums.sse += (y - r).pow(2).sum(dim=(0, 2))
    sums.sum_y += y.sum(0)
    sums.sum_y2 += y.pow(2).sum(0)
    sums.cossim += (dot / (y_norm * r_norm).clamp(min=1e-30)).sum(0)
    sums.l2_ratio += (r_norm / torch.where(y_norm < 1e-4, torch.ones_like(y_norm), y_norm)).sum(0)
    sums.recon_sq += r_norm.pow(2).sum(0)
    sums.dot += dot.sum(0)
    f = out.feature_acts
    sums.fires += (f > 0).sum(0).double()
    sums.nonzero += (f != 0).sum().double()
    sums.l1 += f.double().sum()
    sums.n += y.shape[0]


def _accumulate_ce(sums: _Sums, model, scale_out: Tensor, hooks: list[str], tokens: Tensor, recon_norm: Tensor,
                   keep: Tensor, m: int = 0, closed=None) -> None:
    """CE of clean `model` (the m-th), and with each of its output `hooks` replaced by the reconstruction
    (raw scale) or zeros; KL(clean || spliced) summed over the vocabulary, into the sums of output layers
    m * len(hooks), .... Excluded positions (BOS) keep their activation.
    Runs over groups of prompts whose logits stay under LOGITS_CHUNK_ELEMENTS: a whole batch of logits is
    [b, s, vocab] floats (0.8 GB for 32 x 128 pythia tokens, several alive at once), and the full-size
    temporaries cost more time in page faults than the LM head's arithmetic."""
    b, s = tokens.shape
    device = next(model.parameters()).device
    tokens, keep = tokens.to(device), keep.to(device).view(b, s)
    recon = recon_norm.view(b, s, *recon_norm.shape[1:]).to(device)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
    rows = max(1, LOGITS_CHUNK_ELEMENTS // (s * vocab))
    for i in range(0, b, rows):
        _accumulate_ce_rows(sums, model, scale_out.to(device), hooks, tokens[i:i + rows], recon[i:i + rows],
                            keep[i:i + rows], m, closed)
    if m == 0:
        sums.n_predicted += keep[:, :-1].sum().to(sums.n_predicted)


def _accumulate_ce_rows(sums: _Sums, model, scale_out: Tensor, hooks: list[str], tokens: Tensor, recon: Tensor,
                        keep: Tensor, m: int, closed=None) -> None:
    kwargs, first = forward_kwargs(model), m * len(hooks)
    counted = keep[:, :-1].double()  # predicted positions whose input token is not special

    def ce_of(logp: Tensor) -> Tensor:
        return -(logp.gather(-1, tokens[:, 1:, None])[..., 0] * counted).sum().to(sums.ce_clean)

    def ce_and_kl(replacements: dict) -> tuple[Tensor, Tensor]:
        with splice(model, replacements):
            logp = _next_token_logp(model(tokens, **kwargs).logits)
        kl = ((clean_p * (clean_logp - logp)).sum(-1) * counted).sum()  # KL(clean || spliced)
        return ce_of(logp), kl.to(sums.ce_clean)

    clean_logp = _next_token_logp(model(tokens, **kwargs).logits)
    clean_p = clean_logp.exp()
    sums.ce_clean[m] += ce_of(clean_logp)
    spliced = {}
    for j, hook in enumerate(hooks):
        raw = recon[:, :, j] / scale_out[j]
        spliced[hook] = lambda act, raw=raw: torch.where(keep[..., None], raw.to(act.dtype), act)
        ce, kl = ce_and_kl({hook: spliced[hook]})
        sums.ce_spliced[first + j] += ce
        sums.kl[first + j] += kl
        ce, kl = ce_and_kl({hook: torch.zeros_like})
        sums.ce_zero[first + j] += ce
        sums.kl_zero[first + j] += kl
    if len(hooks) > 1 and sums.ce_clean.numel() == 1:  # the replacement model: every output hook at once
        ce, kl = ce_and_kl(spliced)
        sums.ce_spliced_all += ce
        sums.kl_all += kl
        ce, kl = ce_and_kl(dict.fromkeys(hooks, torch.zeros_like))
        sums.ce_zero_all += ce
        sums.kl_zero_all += kl
    if closed is not None:
        ce, kl = ce_and_kl(closed(keep))
        sums.ce_replacement += ce
        sums.kl_replacement += kl


def _next_token_logp(logits: Tensor) -> Tensor:
    """Log-probabilities at the positions that have a next token, in float32."""
    return F.log_softmax(logits[:, :-1].float(), -1)


def _ratio(a: Tensor, b: Tensor) -> float:
    """a / b as a float, NaN when b is 0 (json_metrics writes it as null)."""
    return (a / b).item() if b.item() != 0 else math.nan


def _finish(sums: _Sums, hooks: list[str], scale_out: Tensor, causal: bool,
            model_names: list[str] | None = None) -> dict:
    n = sums.n.clamp(min=1)
    sst = (sums.sum_y2 - sums.sum_y.pow(2) / n).sum(-1)  # centred on the per-dimension mean
    m: dict = {"n_eval_tokens": int(sums.n.item())}
    for j, hook in enumerate(hooks):
        fvu = _ratio(sums.sse[j], sst[j])
        m[f"explained_variance/{hook}"], m[f"fvu/{hook}"] = 1 - fvu, fvu
        m[f"mse/{hook}"] = (sums.sse[j] / n / scale_out[j] ** 2).item()
        m[f"mse_normalized/{hook}"] = (sums.sse[j] / n).item()
        m[f"cossim/{hook}"] = (sums.cossim[j] / n).item()
        m[f"l2_ratio/{hook}"] = (sums.l2_ratio[j] / n).item()
        m[f"relative_reconstruction_bias/{hook}"] = _ratio(sums.recon_sq[j], sums.dot[j])
    fvu_all = _ratio(sums.sse.sum(), sst.sum())
    m["explained_variance"], m["fvu"] = 1 - fvu_all, fvu_all
    density = sums.fires / n
    m["l0"], m["l1"] = (sums.nonzero / n).item(), (sums.l1 / n).item()
    m["frac_alive"] = (density > 0).double().mean().item()
    m["freq_over_1_percent"] = (density > 0.01).double().mean().item()
    m["freq_over_10_percent"] = (density > 0.1).double().mean().item()
    m["feature_density"] = density.float().cpu()
    if causal:
        m.update(_finish_ce(sums, hooks, model_names))
        if len(hooks) > 1 and not model_names:
            m.update(_finish_ce_all(sums, m["ce_loss_without_sae"]))
    else:
        m["ce_loss_without_sae"] = None
        m.update({f"{key}/{hook}": None for key in CE_KEYS for hook in hooks})
    return m


def _scores(clean: float, spliced: float, zero: float, kl: float, kl_zero: float, suffix: str) -> dict:
    """SAEBench's CE/KL entries for one splice (`suffix` '/<hook>' or '_all')."""
    return {f"ce_loss_with_sae{suffix}": spliced, f"ce_loss_with_ablation{suffix}": zero,
            f"ce_loss_score{suffix}": (zero - spliced) / (zero - clean) if zero != clean else math.nan,
            f"kl_div_with_sae{suffix}": kl, f"kl_div_with_ablation{suffix}": kl_zero,
            f"kl_div_score{suffix}": (kl_zero - kl) / kl_zero if kl_zero != 0 else math.nan}


def _finish_ce(sums: _Sums, hooks: list[str], model_names: list[str] | None = None) -> dict:
    """CE metrics per output layer; for a model diff each (model, hook) against its own model's clean CE."""
    n_pred = sums.n_predicted.clamp(min=1)
    clean_per_model = (sums.ce_clean / n_pred).tolist()
    m: dict = {"ce_loss_without_sae": sum(clean_per_model) / len(clean_per_model)}
    if model_names:
        m.update({f"ce_loss_without_sae/{name}": value for name, value in zip(model_names, clean_per_model)})
    per_model = len(hooks) // len(clean_per_model)
    for j, hook in enumerate(hooks):
        values = (sums.ce_spliced[j], sums.ce_zero[j], sums.kl[j], sums.kl_zero[j])
        m.update(_scores(clean_per_model[j // per_model], *((v / n_pred).item() for v in values), f"/{hook}"))
    return m


def _finish_ce_all(sums: _Sums, clean: float) -> dict:
    n_pred = sums.n_predicted.clamp(min=1)
    values = (sums.ce_spliced_all, sums.ce_zero_all, sums.kl_all, sums.kl_zero_all)
    return _scores(clean, *((v / n_pred).item() for v in values), "_all")


def max_cosine_sim(vectors: Tensor, chunk: int = COSINE_CHUNK) -> Tensor:
    """[F]: for each row of `vectors` [F, D], the largest cosine similarity with any other row (SAEBench's
    calculate_max_cosine_sim, in blocks of `chunk` rows; a zero row has cosine 0 with everything)."""
    unit = F.normalize(vectors.float(), dim=-1)
    out = torch.empty(len(unit), device=unit.device)
    for start in range(0, len(unit), chunk):
        sims = unit[start:start + chunk] @ unit.T
        rows = torch.arange(len(sims), device=unit.device)
        sims[rows, rows + start] = -math.inf  # not with itself
        out[start:start + chunk] = sims.max(dim=1).values
    return out


def encoder_vectors(crosscoder: Crosscoder) -> Tensor:
    """[d_sae, n_in * d_model]: each latent's encoder vector over the concatenated input hooks (zeros
    where its group reads nothing)."""
    s = crosscoder.structure
    out = crosscoder.W_enc.new_zeros(crosscoder.config.d_sae, s.n_in * s.d_model)
    for grp, view in zip(s.groups, s.encoder_views(crosscoder.W_enc)):
        out[grp.latents, grp.inputs] = view.T
    return out


def cosine_metrics(crosscoder: Crosscoder) -> dict:
    """SAEBench's weight-based metrics: average (and per-latent) max cosine similarity of the encoder and
    decoder vectors, overall and per output hook for the decoder (decoder in normalized space)."""
    hooks = layer_labels(crosscoder.config, "out")
    dec = crosscoder.structure.decoder_vectors(crosscoder.W_dec) * crosscoder.output_norm_weights()[:, None]
    enc_max, dec_max = max_cosine_sim(encoder_vectors(crosscoder)), max_cosine_sim(dec.flatten(1))
    m: dict = {"average_max_encoder_cosine_sim": enc_max.mean().item(),
               "average_max_decoder_cosine_sim": dec_max.mean().item(),
               "max_encoder_cosine_sim": enc_max.cpu(), "max_decoder_cosine_sim": dec_max.cpu()}
    if len(hooks) > 1:
        for j, hook in enumerate(hooks):
            writes = dec[:, j].norm(dim=-1) > 0  # (a cross-layer latent writes only later hooks)
            per_hook = torch.full((len(dec),), math.nan, device=dec.device)
            if writes.sum() > 1:
                per_hook[writes] = max_cosine_sim(dec[writes, j])
            m[f"average_max_decoder_cosine_sim/{hook}"] = per_hook[writes].mean().item() if writes.sum() > 1 \
                else math.nan
            m[f"max_decoder_cosine_sim/{hook}"] = per_hook.cpu()
    return m


def scalar_metrics(metrics: dict) -> dict:
    """The metrics that are plain numbers (for logs and tables)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def json_metrics(metrics: dict) -> dict:
    """What metrics.json holds: numbers, or None for what was not measured or is undefined (NaN)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, Tensor):
            continue
        out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


def feature_stats(metrics: dict) -> dict[str, Tensor]:
    """The per-latent statistics (feature_stats.safetensors): tensors [d_sae]."""
    return {k: v.contiguous() for k, v in metrics.items() if isinstance(v, Tensor)}
