"""A static feature browser for a trained crosscoder: `python -m hf_crosscoder.dashboard OUTPUT_DIR`.

It writes `OUTPUT_DIR/dashboard/index.html` + `data.js`: a self-contained site (no server, no network,
no CDN; it opens from disk and on the Hub) with a searchable, sortable list of the latents (density,
max activation, layer span, per-model share for multi-model crosscoders) and, per latent
(`index.html#latent=12`), its decoder-norm share per output hook, its activation histogram, its
top-activating contexts with tokens shaded by activation and, for causal LMs, the tokens its decoder
promotes through the unembedding.

The statistics come from one streaming pass over token rows (`collect_latent_stats`) whose state does
not grow with the number of tokens:

- per latent: firing count, sum and max of its activations;
- a histogram of its nonzero activations over `n_bins` linear bins on [0, 2**e), where 2**e is the
  smallest power of two above the latent's running max. When the max passes 2**e the range doubles
  (as often as needed) and bin pairs merge; with power-of-two ranges and bin counts this is exact: the
  result equals a histogram of all the values on the final range;
- the top-k activations ([d_sae, k] values, sequence ids, positions) with a window of tokens around
  each (`context_before` before, `context_after` after) and the latent's activations on that window:
  each chunk's per-latent top-k is merged with the kept one by `torch.topk` of the concatenation.

Special-token positions (BOS/EOS/PAD, the attention sinks training leaves out) are not counted.
Memory: about d_sae * (k * (24 + 8W) + 8 * n_bins + 28) bytes (W = window length, 17 by default: 3.5 MB
per 1000 latents at k = 20) plus one chunk of latents (CHUNK_ELEMENTS) and one batch's hooked
activations, whatever the number of tokens.

The page carries every latent's density, max and mean activation, layer span (output hooks holding
> 10% of its decoder norm, plots.SPAN_THRESHOLD) and, for several models, each model's share of its
decoder norm; and details for the `max_latents` most frequent latents that fired. Promoted tokens:
the top entries of W_dec[latent, last output hook] @ W_U^T (the raw-scale decoder direction through the
unembedding, no final norm).

Eval tokens (CLI): `--dataset_path`, else the run's `eval_dataset_path` when its config has one, else
its training dataset read from the start (tokens it trained on: a held-out split is better).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .config import LanguageModelCrosscoderRunnerConfig
from .dashboard_page import render_page
from .data import TokenStream, special_token_ids
from .evals import is_causal_lm
from .harvest import load_model_and_tokenizer
from .hooks import capture_activations
from .modeling import Crosscoder
from .plots import decoder_norm_shares, layer_span

HIST_BINS = 32
CONTEXT_BEFORE, CONTEXT_AFTER = 12, 4
CHUNK_ELEMENTS = 2**24  # latents [rows, d_sae] encoded at a time (64 MiB of float32)
DASHBOARD_DIR = "dashboard"
NO_VALUES_EXPONENT = -1000  # histogram range exponent of a latent that never fired


@dataclass
class LatentStats:
    """What one pass over the eval tokens found per latent (CPU tensors; see the module docstring)."""

    n_tokens: int          # positions counted (special tokens left out)
    count: Tensor          # [d_sae] int64: positions where the latent fired (> 0)
    sum: Tensor            # [d_sae] float64: sum of its activations
    max: Tensor            # [d_sae] float32
    hist: Tensor           # [d_sae, n_bins] int64: nonzero activations in linear bins on [0, 2**hist_exponent)
    hist_exponent: Tensor  # [d_sae] int64
    top_values: Tensor     # [d_sae, k] float32, descending; <= 0 where fewer than k positions fired
    top_seq: Tensor        # [d_sae, k] int64: index of the sequence in the stream (-1: none)
    top_pos: Tensor        # [d_sae, k] int64: position in the sequence
    top_tokens: Tensor     # [d_sae, k, W] int32: token ids of the window (-1 beyond the sequence)
    top_acts: Tensor       # [d_sae, k, W] float32: the latent's activations on the window
    context_before: int

    @property
    def density(self) -> Tensor:
        return self.count.double() / max(self.n_tokens, 1)

    @property
    def mean(self) -> Tensor:
        """Mean activation where the latent fired (0 for latents that never did)."""
        return self.sum / self.count.clamp(min=1)

    def hist_range(self) -> Tensor:
        """[d_sae] float64: the upper edge 2**e of each latent's histogram (0 when it never fired)."""
        fired = self.count > 0
        return torch.where(fired, torch.ldexp(torch.ones(len(fired), dtype=torch.float64),
                                              self.hist_exponent.clamp(min=-1000)), 0.0)


class LatentStatsAccumulator:
    """The streaming state of `collect_latent_stats`: fixed-size tensors, updated per chunk."""

    def __init__(self, d_sae: int, top_k: int = 20, n_bins: int = HIST_BINS,
                 context_before: int = CONTEXT_BEFORE, context_after: int = CONTEXT_AFTER,
                 device: str | torch.device = "cpu") -> None:
        if n_bins <= 0 or n_bins & (n_bins - 1):
            raise ValueError(f"n_bins must be a power of two (bin pairs merge when a range doubles); got {n_bins}.")
        if top_k <= 0:
            raise ValueError(f"top_k must be positive; got {top_k}.")
        if context_before < 0 or context_after < 0:
            raise ValueError("context_before and context_after must be >= 0.")
        self.top_k, self.n_bins, self.before = top_k, n_bins, context_before
        self.width = context_before + 1 + context_after
        kw = dict(device=device)
        self.n_tokens = 0
        self.n_sequences = 0
        self.count = torch.zeros(d_sae, dtype=torch.long, **kw)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, **kw)
        self.max = torch.zeros(d_sae, dtype=torch.float32, **kw)
        self.hist = torch.zeros(d_sae, n_bins, dtype=torch.long, **kw)
        self.exponent = torch.full((d_sae,), NO_VALUES_EXPONENT, dtype=torch.long, **kw)
        self.top_values = torch.full((d_sae, top_k), -1.0, **kw)
        self.top_seq = torch.full((d_sae, top_k), -1, dtype=torch.long, **kw)
        self.top_pos = torch.full((d_sae, top_k), -1, dtype=torch.long, **kw)
        self.top_tokens = torch.full((d_sae, top_k, self.width), -1, dtype=torch.int32, **kw)
        self.top_acts = torch.zeros(d_sae, top_k, self.width, **kw)

    def state_tensors(self) -> dict[str, Tensor]:
        return {name: value for name, value in vars(self).items() if isinstance(value, Tensor)}

    @torch.no_grad()
    def update(self, feats: Tensor, tokens: Tensor, counted: Tensor | None = None) -> None:
        """Add whole sequences: latents `feats` [r, s, d_sae] (>= 0) of token rows `tokens` [r, s];
        `counted` [r, s] bool is False at positions to leave out (their latents must be zero)."""
        r, s, _ = feats.shape
        flat = feats.reshape(r * s, -1).float()
        self.n_tokens += int(counted.sum()) if counted is not None else r * s
        self.count += (flat > 0).sum(0)
        self.sum += flat.sum(0, dtype=torch.float64)
        self.max = torch.maximum(self.max, flat.max(0).values)
        self._update_hist(flat)
        self._update_top(feats.float(), tokens.to(feats.device))
        self.n_sequences += r

    def _update_hist(self, flat: Tensor) -> None:
        # the smallest power of two strictly above the max: frexp gives max = m * 2**e, m in [0.5, 1)
        fired = self.max > 0
        new_exp = torch.where(fired, torch.frexp(self.max).exponent.long(), self.exponent)
        shift = (new_exp - self.exponent).clamp(0, 62)
        if bool((shift > 0).any()):
            target = torch.arange(self.n_bins, device=flat.device)[None] >> shift[:, None]
            target = target.clamp(max=self.n_bins - 1)
            merged = torch.zeros_like(self.hist)
            self.hist = merged.scatter_add_(1, target, self.hist)
        self.exponent = new_exp
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        # v * n_bins / 2**e is exact in floating point: the bin index never rounds across an edge
        scaled = torch.ldexp(flat[rows, cols], int(math.log2(self.n_bins)) - new_exp[cols])
        bins = scaled.floor().long().clamp(max=self.n_bins - 1)
        self.hist.view(-1).index_add_(0, cols * self.n_bins + bins, torch.ones_like(bins))

    def _update_top(self, feats: Tensor, tokens: Tensor) -> None:
        r, s, d_sae = feats.shape
        k = min(self.top_k, r * s)
        values, rows = torch.topk(feats.reshape(r * s, d_sae), k, dim=0)  # [k, d_sae]
        values, rows = values.T, rows.T  # [d_sae, k]
        seq, pos = rows // s, rows % s
        window = pos[..., None] + torch.arange(-self.before, self.width - self.before, device=feats.device)
        inside = (window >= 0) & (window < s)
        w = window.clamp(0, s - 1)
        latent = torch.arange(d_sae, device=feats.device)[:, None, None]
        win_tokens = torch.where(inside, tokens[seq[..., None], w], -1).int()
        win_acts = torch.where(inside, feats[seq[..., None], w, latent], 0.0)
        all_values = torch.cat([self.top_values, values], 1)
        keep = torch.topk(all_values, self.top_k, dim=1).indices  # [d_sae, top_k]
        self.top_values = all_values.gather(1, keep)
        self.top_seq = torch.cat([self.top_seq, seq + self.n_sequences], 1).gather(1, keep)
        self.top_pos = torch.cat([self.top_pos, pos], 1).gather(1, keep)
        keep_w = keep[..., None].expand(-1, -1, self.width)
        self.top_tokens = torch.cat([self.top_tokens, win_tokens], 1).gather(1, keep_w)
        self.top_acts = torch.cat([self.top_acts, win_acts], 1).gather(1, keep_w)

    def result(self) -> LatentStats:
        fired = self.top_values > 0  # an entry that never fired is no context
        cpu = {name: t.cpu() for name, t in self.state_tensors().items()}
        return LatentStats(
            n_tokens=self.n_tokens, count=cpu["count"], sum=cpu["sum"], max=cpu["max"], hist=cpu["hist"],
            hist_exponent=cpu["exponent"], top_values=cpu["top_values"],
            top_seq=torch.where(fired, self.top_seq, -1).cpu(), top_pos=torch.where(fired, self.top_pos, -1).cpu(),
            top_tokens=cpu["top_tokens"], top_acts=cpu["top_acts"], context_before=self.before)


# ---------------------------------------------------------------- the streaming pass
def _models(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _input_acts(crosscoder: nn.Module, models: list[nn.Module], tokens: Tensor) -> Tensor:
    """[r, s, n_in, d_model]: each model's input hooks (several models: model-major, as model diffing
    lays them out), on the crosscoder's device and dtype."""
    hooks = list(crosscoder.config.hook_names_in)
    parts = []
    for model in models:
        device = next(model.parameters()).device
        acts = capture_activations(model, hooks, tokens.to(device), stop_early=True)
        parts += [acts[h].to(device=crosscoder.W_enc.device, dtype=crosscoder.W_enc.dtype) for h in hooks]
    if len(parts) != crosscoder.W_enc.shape[0]:
        raise ValueError(f"the crosscoder reads {crosscoder.W_enc.shape[0]} hooked activations but "
                         f"{len(models)} model(s) x {len(hooks)} input hooks give {len(parts)}; pass one "
                         "model per entry of its config's model_names.")
    return torch.stack(parts, dim=2)


@torch.no_grad()
def collect_latent_stats(crosscoder: nn.Module, model: nn.Module | Sequence[nn.Module],
                         token_batches: Iterable[Tensor], top_k: int = 20, n_tokens: int | None = None,
                         exclude_token_ids: Sequence[int] = (), n_bins: int = HIST_BINS,
                         context_before: int = CONTEXT_BEFORE, context_after: int = CONTEXT_AFTER) -> LatentStats:
    """One streaming pass over `token_batches` (LongTensors [n, context_size]): the input hooks'
    activations (the forward stops after the last one), the crosscoder's latents, and per latent the
    statistics of `LatentStats`. Stops after the batch that reaches `n_tokens` positions (all when None).
    Positions holding `exclude_token_ids` (BOS/EOS/PAD, say) get zero latents and are not counted."""
    models = _models(model)
    acc = LatentStatsAccumulator(crosscoder.config.d_sae, top_k, n_bins, context_before, context_after,
                                 device=crosscoder.W_enc.device)
    excluded = torch.tensor(list(exclude_token_ids), dtype=torch.long)
    seen = 0
    for tokens in token_batches:
        if n_tokens is not None and seen >= n_tokens:
            break
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        x = _input_acts(crosscoder, models, tokens)  # one model forward per batch
        counted = ~torch.isin(tokens, excluded.to(tokens.device)).to(crosscoder.W_enc.device)
        rows = max(1, CHUNK_ELEMENTS // (tokens.shape[1] * crosscoder.config.d_sae))
        for start in range(0, len(tokens), rows):  # whole sequences per chunk: windows stay inside them
            part = slice(start, start + rows)
            feats = crosscoder.encode(x[part].flatten(0, 1)).view(*tokens[part].shape, -1) * counted[part, :, None]
            acc.update(feats, tokens[part], counted[part])
        seen += tokens.numel()
    if acc.n_sequences == 0:
        raise ValueError("collect_latent_stats got no token batches; pass at least one [n, context_size] batch.")
    return acc.result()


# ---------------------------------------------------------------- per-latent summaries
@torch.no_grad()
def promoted_tokens(crosscoder: nn.Module, model: nn.Module, latents: Tensor,
                    n: int = 10) -> tuple[Tensor, Tensor] | None:
    """(values, token ids) [len(latents), n]: the largest entries of W_dec[latent, last output hook] @
    W_U^T, W_U the model's unembedding (raw scale, no final norm: a direct logit attribution). None when
    the model has no output embedding (not a causal LM)."""
    head = model.get_output_embeddings() if is_causal_lm(model) else None
    if head is None or len(latents) == 0:
        return None
    unembed = head.weight.detach()
    out_values, out_ids = [], []
    for chunk in latents.split(max(1, CHUNK_ELEMENTS // unembed.shape[0])):
        direction = crosscoder.W_dec[chunk.to(crosscoder.W_dec.device), -1].to(unembed.device, unembed.dtype)
        values, ids = torch.topk((direction @ unembed.T).float(), min(n, unembed.shape[0]), dim=1)
        out_values.append(values.cpu())
        out_ids.append(ids.cpu())
    return torch.cat(out_values), torch.cat(out_ids)


def output_hook_labels(config: Any, n_out: int) -> list[str]:
    """Names of the decoder's output rows: hooks, or `model/hook` pairs (model-major) for several models."""
    hooks, models = list(config.hook_names_out), _model_names(config)
    if models and n_out == len(models) * len(hooks):
        return [f"{m}/{h}" for m in models for h in hooks]
    return hooks if len(hooks) == n_out else [f"output {i}" for i in range(n_out)]


def _model_names(config: Any) -> list[str] | None:
    names = getattr(config, "model_names", None)
    return list(names) if names and len(names) > 1 else None


def model_shares(config: Any, shares: Tensor) -> Tensor | None:
    """[d_sae, n_models]: each model's share of a latent's decoder norm, for crosscoders of several
    models (output rows model-major); None for one model."""
    models = _model_names(config)
    if models is None or shares.shape[1] % len(models):
        return None
    return shares.view(shares.shape[0], len(models), -1).sum(-1)


def token_label(tokenizer: Any, token_id: int) -> str:
    """How a token shows in the page: its text with the space before it where the tokenizer marks word
    starts (byte-level BPE decodes with it; SentencePiece marks it with U+2581; WordPiece / word-level
    tokens start words unless they carry the continuation prefix), line breaks and tabs made visible."""
    if tokenizer is None:
        return str(token_id)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    kind = type(backend).__name__
    if isinstance(piece, str) and piece.startswith("\u2581"):
        text = " " + piece[1:]
    elif kind == "WordPiece" and isinstance(piece, str) and piece.startswith(backend.continuing_subword_prefix):
        text = piece[len(backend.continuing_subword_prefix):]
    elif kind in ("WordPiece", "WordLevel") and token_id not in special_ids(tokenizer):
        text = " " + tokenizer.decode([token_id])
    else:
        text = tokenizer.decode([token_id])
    return text.replace("\n", "\u21b5").replace("\t", "\u21e5") or str(piece)


def special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", None) or ())


# ---------------------------------------------------------------- the page's data
def _round(values: Tensor, digits: int = 4) -> list[float]:
    return [float(f"{v:.{digits}g}") for v in values.tolist()]


def shown_latents(stats: LatentStats, max_latents: int) -> Tensor:
    """The latents whose details the page carries: those that fired, most frequent first, at most
    `max_latents` (the list still shows every latent)."""
    alive = (stats.count > 0).nonzero().squeeze(1)
    order = torch.argsort(stats.count[alive], descending=True, stable=True)
    return alive[order][:max_latents]


def _add_labels(vocab: dict[int, str], ids: list[int], tokenizer: Any) -> None:
    for t in ids:
        if t not in vocab:
            vocab[t] = token_label(tokenizer, t)


def _contexts(stats: LatentStats, latent: int, vocab: dict[int, str], tokenizer: Any) -> list[dict]:
    """The latent's top contexts: token ids (window cut to its sequence), activations, where it was."""
    out = []
    for j in (stats.top_seq[latent] >= 0).nonzero().squeeze(1).tolist():
        ids, acts = stats.top_tokens[latent, j], stats.top_acts[latent, j]
        inside = ids >= 0
        first = int(inside.nonzero()[0])  # position of the window's first token inside its sequence
        _add_labels(vocab, ids[inside].tolist(), tokenizer)
        out.append({"t": ids[inside].tolist(), "a": _round(acts[inside], 3),
                    "v": float(f"{stats.top_values[latent, j]:.4g}"),
                    "seq": int(stats.top_seq[latent, j]), "pos": int(stats.top_pos[latent, j]),
                    "at": stats.context_before - first})
    return out


def _top_tokens(contexts: list[dict], vocab: dict[int, str], n: int = 5) -> list[str]:
    """Distinct tokens at the maximum of the latent's top contexts, strongest first (what search matches)."""
    labels = dict.fromkeys(vocab[c["t"][c["at"]]] for c in contexts)
    return list(labels)[:n]


def _details(crosscoder: nn.Module, stats: LatentStats, tokenizer: Any, model: Any, latents: Tensor,
             shares: Tensor, n_promoted: int, vocab: dict[int, str]) -> tuple[dict, dict]:
    """(details by latent index, top tokens by latent index) for the shown latents."""
    promoted = promoted_tokens(crosscoder, model, latents, n_promoted) if model is not None else None
    edges = stats.hist_range()
    details, tops = {}, {}
    for row, latent in enumerate(latents.tolist()):
        contexts = _contexts(stats, latent, vocab, tokenizer)
        entry = {"shares": _round(shares[latent]), "contexts": contexts,
                 "hist": {"hi": float(edges[latent]), "counts": stats.hist[latent].tolist()}}
        if promoted is not None:
            values, ids = promoted[0][row], promoted[1][row].tolist()
            _add_labels(vocab, ids, tokenizer)
            entry["promoted"] = [[t, v] for t, v in zip(ids, _round(values))]
        details[str(latent)] = entry
        tops[str(latent)] = _top_tokens(contexts, vocab)
    return details, tops


def _short_name(name: str | None) -> str:
    """A Hub id as is; a local folder by its last two path parts."""
    if not name:
        return "a model"
    return "/".join(Path(name).parts[-2:]) if Path(name).is_absolute() else name


def dashboard_data(crosscoder: nn.Module, stats: LatentStats, tokenizer: Any = None, model: Any = None,
                   max_latents: int = 2000, n_promoted: int = 10, title: str | None = None) -> dict:
    """Everything the page shows, as plain JSON-able values: a column per statistic over all latents,
    details (contexts, histogram, decoder profile, promoted tokens) for `shown_latents`."""
    config = crosscoder.config
    shares = decoder_norm_shares(crosscoder).cpu()
    per_model = model_shares(config, shares)
    vocab: dict[int, str] = {}
    latents = shown_latents(stats, max_latents)
    details, tops = _details(crosscoder, stats, tokenizer, _models(model)[-1] if model is not None else None,
                             latents, shares, n_promoted, vocab)
    return {
        "title": title or f"{config.architecture} on {_short_name(getattr(config, 'model_name', None))}",
        "model_name": getattr(config, "model_name", None), "n_tokens": stats.n_tokens, "d_sae": config.d_sae,
        "hooks_out": output_hook_labels(config, shares.shape[1]), "model_names": _model_names(config),
        "n_bins": stats.hist.shape[1], "promoted_hook": output_hook_labels(config, shares.shape[1])[-1],
        "columns": {"density": _round(stats.density), "max": _round(stats.max), "mean": _round(stats.mean),
                    "span": layer_span(shares).tolist(),
                    "model_share": None if per_model is None else [_round(s) for s in per_model.T]},
        "top_tokens": tops, "details": details, "vocab": {str(k): v for k, v in vocab.items()},
    }


def write_dashboard(out_dir: str | Path, crosscoder: nn.Module, stats: LatentStats, tokenizer: Any = None,
                    model: Any = None, max_latents: int = 2000, n_promoted: int = 10,
                    title: str | None = None) -> Path:
    """Write `out_dir/dashboard/index.html` and its `data.js` (a plain script, so the page works from
    file://, where fetch() of local files is refused); returns the index.html path."""
    if max_latents < 0:
        raise ValueError(f"max_latents must be >= 0; got {max_latents}.")
    data = dashboard_data(crosscoder, stats, tokenizer, model, max_latents, n_promoted, title)
    folder = Path(out_dir) / DASHBOARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    # ensure_ascii: the script is pure ASCII, whatever encoding the browser assumes for a local file
    (folder / "data.js").write_text("window.DASHBOARD_DATA = " + json.dumps(data, separators=(",", ":")) + ";\n")
    index = folder / "index.html"
    index.write_text(render_page(data["title"]))
    return index


# ---------------------------------------------------------------- a run's folder -> dashboard
def _runner_defaults() -> dict[str, Any]:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(LanguageModelCrosscoderRunnerConfig)}


def run_settings(output_dir: str | Path, crosscoder_config: Any = None,
                 dataset_path: str | None = None) -> SimpleNamespace:
    """The model and data fields of the run that wrote `output_dir`: its runner_config.json over the
    runner's defaults, else the provenance of the crosscoder's config (model_name, dataset_path,
    context_size; model_name None when it names none). The eval data: `dataset_path` when given, else
    the run's `eval_dataset_path` when it has one, else its training dataset (same split)."""
    out = Path(output_dir)
    cc = (crosscoder_config.to_dict() if crosscoder_config is not None
          else json.loads((out / "config.json").read_text()))
    runner = out / "runner_config.json"
    if runner.is_file():
        settings = {**_runner_defaults(), **json.loads(runner.read_text())}
    else:
        settings = {**_runner_defaults(), "model_name": cc.get("model_name"),
                    **{k: cc[k] for k in ("dataset_path", "context_size") if cc.get(k) is not None}}
    for name in ("d_model", "hook_names_in", "hook_names_out", "model_names"):
        if cc.get(name) is not None:
            settings[name] = cc[name]  # the crosscoder's own record wins
    settings["dataset_path"] = dataset_path or settings.get("eval_dataset_path") or settings["dataset_path"]
    settings["dataset_split"] = settings.get("eval_dataset_split") or settings["dataset_split"]
    return SimpleNamespace(**settings)


def _check_output_dir(output_dir: str | Path) -> Path:
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory; pass a training run's output_path.")
    missing = [name for name in ("config.json", "model.safetensors") if not (out / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{out} has no {' or '.join(missing)}: not a finished run's output_path "
                                "(the runner writes them when training ends).")
    return out


def _load_models(settings: SimpleNamespace, device: str,
                 before_weights: Any = None) -> tuple[list[nn.Module], Any]:
    """The run's model(s) (every entry of model_names for a multi-model crosscoder) and the tokenizer
    (the first model's); `before_weights(tokenizer)` runs before the first model's weights load."""
    names = getattr(settings, "model_names", None) or [settings.model_name]
    models, tokenizer = [], None
    for i, name in enumerate(names):
        model, tok = load_model_and_tokenizer(SimpleNamespace(**{**vars(settings), "model_name": name}), device,
                                              before_weights=before_weights if i == 0 else None)
        models.append(model)
        tokenizer = tokenizer or tok
    return models, tokenizer


def _limited(batches: Iterable[Tensor], n_rows: int) -> Iterable[Tensor]:
    for batch in batches:
        if n_rows <= 0:
            return
        yield batch[:n_rows]
        n_rows -= len(batch)


def make_dashboard(output_dir: str | Path, crosscoder: nn.Module | None = None, model: Any = None,
                   tokenizer: Any = None, n_tokens: int = 20_000, top_k: int = 20, batch_size: int = 8,
                   dataset_path: str | None = None, device: str | None = None, max_latents: int = 2000) -> Path:
    """The dashboard of a run's folder: loads what the caller does not pass (the crosscoder saved in
    `output_dir`; the model(s) and tokenizer of its run), reads `n_tokens` eval tokens (see
    `run_settings`), collects the statistics and writes `output_dir/dashboard/`. Returns index.html."""
    for name, value in (("n_tokens", n_tokens), ("top_k", top_k), ("batch_size", batch_size)):
        if value <= 0:
            raise ValueError(f"{name} must be positive; got {value}.")
    if max_latents < 0:
        raise ValueError(f"max_latents must be >= 0; got {max_latents}.")
    out = _check_output_dir(output_dir) if crosscoder is None else Path(output_dir)
    settings = run_settings(out, crosscoder.config if crosscoder is not None else None, dataset_path)
    if (model is None or tokenizer is None) and not settings.model_name:
        raise ValueError(f"{out} has no runner_config.json and its config.json names no model_name; pass "
                         "the model (the runner writes runner_config.json, which names it).")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    streams = []

    def open_stream(tok: Any) -> None:  # the dataset is checked before any weights load
        streams.append(TokenStream(settings, tok, process_index=0, num_processes=1, max_epochs=1))

    if model is None or tokenizer is None:
        model, tokenizer = _load_models(settings, device, open_stream)
    else:
        open_stream(tokenizer)
    stream = streams[0]
    if crosscoder is None:  # after the checks of the model and the dataset
        crosscoder = Crosscoder.from_pretrained(out).to(device)
    crosscoder.eval()
    batches = _limited(stream.iter_batches(batch_size), math.ceil(n_tokens / settings.context_size))
    stats = collect_latent_stats(crosscoder, model, batches, top_k=top_k,
                                 exclude_token_ids=special_token_ids(tokenizer))
    return write_dashboard(out, crosscoder, stats, tokenizer, model, max_latents=max_latents)


def main(argv: list[str] | None = None) -> Path | None:
    """`python -m hf_crosscoder.dashboard OUTPUT_DIR`: write OUTPUT_DIR/dashboard/index.html."""
    parser = argparse.ArgumentParser(
        prog="python -m hf_crosscoder.dashboard",
        description="Write a static feature browser (OUTPUT_DIR/dashboard/index.html) for a trained crosscoder.")
    parser.add_argument("output_dir", help="A finished run's output_path (config.json, model.safetensors, "
                        "runner_config.json).")
    parser.add_argument("--n_tokens", type=int, default=20_000, help="Eval tokens to read (default 20000).")
    parser.add_argument("--top_k", type=int, default=20, help="Top-activating contexts kept per latent.")
    parser.add_argument("--batch_size", type=int, default=8, help="Sequences per model forward.")
    parser.add_argument("--max_latents", type=int, default=2000, help="Latents with details in the page "
                        "(the most frequent ones that fired; the list shows all).")
    parser.add_argument("--dataset_path", default=None, help="Eval data; default the run's eval_dataset_path, "
                        "else its dataset_path.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of an error.")
    args = parser.parse_args(argv)
    try:
        index = make_dashboard(args.output_dir, n_tokens=args.n_tokens, top_k=args.top_k,
                               batch_size=args.batch_size,
                               dataset_path=args.dataset_path, device=args.device, max_latents=args.max_latents)
    except (ValueError, OSError) as err:  # user errors: a wrong folder, model, dataset or flag
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(index)
    return index


if __name__ == "__main__":
    main()
