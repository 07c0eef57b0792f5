"""Metric names and conventions shared by the evaluation, the trainer's logs, the model card and the plots:
one table, so a metric is named and thresholded the same everywhere."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens is "dense" (a convention)
DENSITY_EPS = 1e-10  # log10(density + eps): a latent that never fired sits at log10(eps) = -10
DEAD_LOG10 = math.log10(DENSITY_EPS)
FEATURE_STATS_FILE = "feature_stats.safetensors"  # per-latent eval statistics in a run's output folder

# (card column, metrics key prefix; the key is f"{prefix}/{hook}"): SAEBench's core names (evals.py)
PER_HOOK_COLUMNS = (
    ("explained variance", "explained_variance"),
    ("MSE (raw scale)", "mse"),
    ("cossim", "cossim"),
    ("L2 ratio", "l2_ratio"),
    ("relative reconstruction bias", "relative_reconstruction_bias"),
    ("CE loss with crosscoder", "ce_loss_with_sae"),
    ("CE loss zero-ablated", "ce_loss_with_ablation"),
    ("CE loss score", "ce_loss_score"),
    ("KL div with crosscoder", "kl_div_with_sae"),
    ("KL div score", "kl_div_score"),
)
SUMMARY_ROWS = (
    ("explained variance (all output hooks)", "explained_variance"),
    ("L0 (active latents per token)", "l0"),
    ("L1 (sum of latent activations per token)", "l1"),
    ("alive fraction (fired on an eval token)", "frac_alive"),
    ("fraction firing on > 1% of tokens", "freq_over_1_percent"),
    (f"fraction firing on > {DENSE_THRESHOLD:.0%} of tokens", "freq_over_10_percent"),
    ("average max encoder cosine similarity", "average_max_encoder_cosine_sim"),
    ("average max decoder cosine similarity", "average_max_decoder_cosine_sim"),
    ("CE loss without crosscoder (clean)", "ce_loss_without_sae"),
    ("eval tokens (held out)", "n_eval_tokens"),
    # every output hook spliced at once (several output hooks: a transcoder set's / CLT's replacement model)
    ("CE loss, all output hooks spliced at once", "ce_loss_with_sae_all"),
    ("CE loss, all output hooks zero-ablated at once", "ce_loss_with_ablation_all"),
    ("CE loss score, all output hooks at once", "ce_loss_score_all"),
    ("KL div, all output hooks spliced at once", "kl_div_with_sae_all"),
    # the closed-loop replacement model (CLTs / per-layer transcoder sets: outputs rebuilt from spliced inputs)
    ("CE loss, replacement model (closed loop)", "ce_loss_with_sae_replacement"),
    ("CE loss score, replacement model (closed loop)", "ce_loss_score_replacement"),
    ("KL div score, replacement model (closed loop)", "kl_div_score_replacement"),
)
# the card's model-index: (metrics key prefix, readable name); one entry per output hook and overall
MODEL_INDEX_METRICS = (("explained_variance", "explained variance"), ("ce_loss_score", "CE loss score"),
                       ("kl_div_score", "KL div score"), ("l0", "L0"))


def density_log10(density: Tensor) -> Tensor:
    """log10 of each latent's firing frequency, dead latents at DEAD_LOG10."""
    return torch.log10(density.double() + DENSITY_EPS)


def is_dead_log10(values: Tensor) -> Tensor:
    """Which log10 densities are those of latents that never fired."""
    return values <= DEAD_LOG10 + 0.01


def dead_and_dense_fractions(density: Tensor) -> tuple[float, float]:
    """(fraction of latents that never fired, fraction firing on more than DENSE_THRESHOLD of tokens)."""
    return float((density == 0).double().mean()), float((density > DENSE_THRESHOLD).double().mean())
