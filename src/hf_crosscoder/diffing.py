"""Model diffing: which latents of a crosscoder over several models (`model_names`) belong to which model.

A diffing crosscoder's output layers are (model, hook) pairs, model-major (config.layer_labels). All
measures here are in normalized activation space (a folded model's decoder is scaled back by its
`activation_scale_out`), so every (model, hook) weighs alike.

- `decoder_norm_shares(cc)` [d_sae, n_models]: latent j's decoder norm in model m (summed over m's output
  hooks) over its total; rows sum to 1. For two models `relative_norms(cc)` is the share of the second
  model (Anthropic's "relative decoder norm": 0 = only in model A, 1 = only in model B, 0.5 = shared).
- `decoder_cosines(cc)`: cosine between the models' decoder vectors of each latent (each model's vector
  concatenated over its hooks); [d_sae] for two models, [d_sae, n, n] for more.
- `classify_latents(cc, low=0.1, high=0.9)`: Anthropic's convention (Sparse Crosscoders, 2024): a latent is
  "only <model>" when that model holds more than `high` of its decoder norm (two models: relative norm
  > 0.9 is only B, < 0.1 only A), otherwise "shared".
- `latent_scaling(cc, batches)`: Latent Scaling (Minder et al. 2025, "Robustly identifying concepts
  introduced during chat fine-tuning", arXiv 2504.02922). For latent j and model m, the least-squares
  scale beta = argmin_b sum_t ||y_m(t) - b f_j(t) d||^2 = sum_t f_j <y_m, d> / (||d||^2 sum_t f_j^2), with d the
  latent's decoder vector (by default each model's own, d_j^m; or that of one model for every target, as
  the paper does with the chat decoder), y_m model m's activations ("activations") or its reconstruction
  error with latent j's own contribution f_j d_j^m added back ("error"). One streaming pass; the ratios
  nu = beta_A / beta_B near 0 mark latents truly specific to B, near 1 latents that L1 made look specific.
- `draw_diffing_plots(folder, cc)`: relative-norm histogram (the three-peak plot), decoder-cosine histogram
  of the shared latents, and (given a `LatentScaling`) the beta-ratio scatter; matplotlib, optional.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .config import n_models
from .plots import _figure, _save

LOW, HIGH = 0.1, 0.9  # Anthropic's relative-norm thresholds of model-specific latents
RELATIVE_NORM_FILE, COSINE_FILE, SCALING_FILE = ("diff_relative_norm.png", "diff_decoder_cosine.png",
                                                 "diff_beta_ratio.png")


def _require_diff(cc) -> int:
    models = n_models(cc.config)
    if models < 2:
        raise ValueError("model diffing needs a crosscoder trained on two or more models (config.model_names); "
                         "this one reads one model.")
    return models


@torch.no_grad()
def model_decoders(cc) -> Tensor:
    """[d_sae, n_models, n_hooks_out * d_model]: each latent's decoder vector per model (its output hooks
    concatenated), in normalized space."""
    models = _require_diff(cc)
    decoder = cc.structure.decoder_vectors(cc.W_dec) * cc.output_norm_weights()[None, :, None]
    return decoder.detach().reshape(cc.config.d_sae, models, -1)


@torch.no_grad()
def decoder_norm_shares(cc) -> Tensor:
    """[d_sae, n_models]: each latent's decoder norm in each model (sum over its output hooks, normalized
    space) divided by the total; rows sum to 1 (a latent with no decoder norm at all: equal shares)."""
    models = _require_diff(cc)
    norms = cc.decoder_norms_per_layer().detach().reshape(cc.config.d_sae, models, -1).sum(-1)
    total = norms.sum(1, keepdim=True)
    return torch.where(total > 0, norms / total.clamp(min=torch.finfo(norms.dtype).tiny), 1.0 / models)


def relative_norms(cc) -> Tensor:
    """[d_sae]: the second model's share of each latent's decoder norm (two models only)."""
    if _require_diff(cc) != 2:
        raise ValueError("relative_norms compares two models; use decoder_norm_shares for more.")
    return decoder_norm_shares(cc)[:, 1]


@torch.no_grad()
def decoder_cosines(cc) -> Tensor:
    """Cosine of each latent's decoder vectors between models (each concatenated over its hooks): [d_sae]
    for two models, [d_sae, n_models, n_models] for more (0 where a model's vector is zero)."""
    unit = torch.nn.functional.normalize(model_decoders(cc), dim=-1)
    cosines = unit @ unit.transpose(1, 2)
    return cosines[:, 0, 1] if cosines.shape[1] == 2 else cosines


@dataclass
class LatentClasses:
    """`labels` [d_sae] long: m for "only model m", n_models for "shared"; `names` the label of each class;
    `counts` latents per class name."""

    labels: Tensor
    names: list[str]

    @property
    def counts(self) -> dict[str, int]:
        found = torch.bincount(self.labels, minlength=len(self.names)).tolist()
        return dict(zip(self.names, found))


def classify_latents(cc, low: float = LOW, high: float = HIGH) -> LatentClasses:
    """"only <model>" when that model holds more than `high` of the latent's decoder norm, else "shared".
    For two models `low` is the mirror threshold (relative norm < low: only A) and must equal 1 - high."""
    shares = decoder_norm_shares(cc)
    models = shares.shape[1]
    if not 0.5 <= high < 1 or (models == 2 and abs(low - (1 - high)) > 1e-9):
        raise ValueError(f"classify_latents needs 0.5 <= high < 1 and, for two models, low = 1 - high; got "
                         f"low={low}, high={high} (Anthropic: 0.1 / 0.9).")
    top, owner = shares.max(1)
    labels = torch.where(top > high, owner, models)
    names = [f"only {name}" for name in _names(cc)] + ["shared"]
    return LatentClasses(labels=labels.cpu(), names=names)


def _names(cc) -> list[str]:
    return list(cc.config.model_names)


# ---------------------------------------------------------------- Latent Scaling
@dataclass
class LatentScaling:
    """beta [d_sae, n_models] per target ("activations": the model's activations; "error": its
    reconstruction error plus the latent's own contribution), and the tokens each latent fired on."""

    beta_activations: Tensor
    beta_error: Tensor
    fired_tokens: Tensor

    def ratios(self, target: str = "error", a: int = 0, b: int = 1) -> Tensor:
        """nu = beta_a / beta_b per latent (NaN where the latent never fired)."""
        beta = self.beta_error if target == "error" else self.beta_activations
        return beta[:, a] / beta[:, b]


@torch.no_grad()
def latent_scaling(cc, batches: Iterable[tuple[Tensor, Tensor]], decoder_model: int | None = None) -> LatentScaling:
    """Latent Scaling over `batches` of (acts_in, acts_out) [B, n_in|n_out, d_model] held-out activations, in
    the space the crosscoder takes (raw for a saved, folded model; normalized for a training-space one), in
    one pass. `decoder_model`: None projects each model's target on its own decoder vector d_j^m; an index k
    projects every model's target on d_j^k (the paper's choice, k = the fine-tuned model)."""
    models = _require_diff(cc)
    D = model_decoders(cc).double()  # [d_sae, n_models, H*d], normalized space
    scale = cc.output_norm_weights().double()  # raw -> normalized per output layer (ones unless folded)
    D_used = D if decoder_model is None else D[:, decoder_model:decoder_model + 1].expand_as(D)
    sums = torch.zeros(3, cc.config.d_sae, models, dtype=torch.float64, device=D.device)
    f2_total = torch.zeros(cc.config.d_sae, dtype=torch.float64, device=D.device)
    for acts_in, acts_out in batches:
        f = cc.encode(acts_in).double()
        recon = cc.decode(f.to(cc.W_dec.dtype), acts_in).double()
        raw = acts_out.reshape(recon.shape).to(recon)
        y = (raw * scale[:, None]).reshape(len(f), models, -1)
        err = ((raw - recon) * scale[:, None]).reshape(len(f), models, -1)
        for m in range(models):
            sums[0, :, m] += (f * (y[:, m] @ D_used[:, m].T)).sum(0)
            sums[1, :, m] += (f * (err[:, m] @ D_used[:, m].T)).sum(0)
        f2_total += f.pow(2).sum(0)
    own_dot = (D * D_used).sum(-1)  # <d_j^m, d_used>: the latent's own contribution, added back
    sums[1] += f2_total[:, None] * own_dot
    denominator = f2_total[:, None] * D_used.pow(2).sum(-1)
    return LatentScaling(beta_activations=(sums[0] / denominator).cpu(), beta_error=(sums[1] / denominator).cpu(),
                         fired_tokens=f2_total.cpu())


# ---------------------------------------------------------------- plots (matplotlib, optional)
def plot_relative_norms(cc, path: Path, low: float = LOW, high: float = HIGH) -> Path:
    """Histogram of the relative decoder norm (two models): peaks at 0 (only A), 0.5 (shared), 1 (only B)."""
    names = _names(cc)
    fig, (ax,) = _figure()
    ax.hist(relative_norms(cc).float().cpu().numpy(), bins=50, range=(0, 1), color="tab:blue")
    for x in (low, high):
        ax.axvline(x, color="tab:red", linestyle="--")
    counts = classify_latents(cc, low, high).counts
    ax.set_xlabel(f"relative decoder norm ||d_{names[1]}|| / (||d_{names[0]}|| + ||d_{names[1]}||)")
    ax.set_ylabel("latents")
    ax.set_title(", ".join(f"{k}: {v}" for k, v in counts.items()), fontsize=9)
    return _save(fig, path)


def plot_decoder_cosines(cc, path: Path, low: float = LOW, high: float = HIGH) -> Path:
    """Histogram of the two models' decoder cosine over the shared latents."""
    shared = classify_latents(cc, low, high).labels == 2
    fig, (ax,) = _figure()
    ax.hist(decoder_cosines(cc)[shared].float().cpu().numpy(), bins=50, range=(-1, 1), color="tab:green")
    ax.set_xlabel("cosine between the two models' decoder vectors")
    ax.set_ylabel("shared latents")
    ax.set_title(f"Decoder cosine of the {int(shared.sum())} shared latents", fontsize=10)
    return _save(fig, path)


def plot_beta_ratios(scaling: LatentScaling, path: Path, latents: Tensor | None = None,
                     names: tuple[str, str] = ("A", "B")) -> Path:
    """Scatter of nu_error against nu_activations (beta_A / beta_B) for `latents` (default: all that fired)."""
    keep = scaling.fired_tokens > 0 if latents is None else latents
    fig, (ax,) = _figure()
    ax.scatter(scaling.ratios("error")[keep].numpy(), scaling.ratios("activations")[keep].numpy(), s=6)
    ax.set_xlabel(f"nu error = beta_{names[0]} / beta_{names[1]} (reconstruction error)")
    ax.set_ylabel(f"nu activations = beta_{names[0]} / beta_{names[1]}")
    ax.set_title("Latent Scaling (Minder et al. 2025)", fontsize=10)
    return _save(fig, path)


def draw_diffing_plots(folder: str | Path, cc, scaling: LatentScaling | None = None) -> list[Path]:
    """The diffing PNGs of a two-model crosscoder in `folder` (the model card embeds them); [] otherwise."""
    if n_models(cc.config) != 2:
        return []
    folder = Path(folder)
    written = [plot_relative_norms(cc, folder / RELATIVE_NORM_FILE), plot_decoder_cosines(cc, folder / COSINE_FILE)]
    if scaling is not None:
        written.append(plot_beta_ratios(scaling, folder / SCALING_FILE, names=tuple(_names(cc))))
    return written
