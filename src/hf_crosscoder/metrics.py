"""Metric names and conventions shared by the evaluation, the trainer's logs, the model card and the plots:
one table, so a metric is named and thresholded the same everywhere."""

from __future__ import annotations

import math

import torch
from torch import Tensor

DENSE_THRESHOLD = 0.1  # a latent firing on more than 10% of tokens is "dense" (a convention)
DENSITY_EPS = 1e-10  # log10(density + eps): a latent that never fired sits at log10(eps) = -10
DEAD_LOG10 = math.log10(DENSITY_EPS)

# (card column, metrics key prefix; the key is f"{prefix}/{hook}")
PER_HOOK_COLUMNS = (
    ("FVU", "fvu_normalized"),
    ("explained variance", "explained_variance_normalized"),
    ("MSE", "mse_normalized"),
    ("CE loss spliced", "ce_loss_spliced"),
    ("CE loss zero-ablated", "ce_loss_zero_ablated"),
    ("CE loss score", "ce_loss_score"),
    ("KL div (clean vs spliced)", "kl_div"),
)
SUMMARY_ROWS = (
    ("FVU (all output hooks)", "fvu_normalized"),
    ("explained variance (all output hooks)", "explained_variance_normalized"),
    ("L0 (active latents per token)", "l0"),
    ("dead fraction", "dead_fraction"),
    (f"dense fraction (fires on > {DENSE_THRESHOLD:.0%} of tokens)", "dense_fraction"),
    ("CE loss clean", "ce_loss_clean"),
    # every output hook spliced at once (several output hooks: a transcoder set's / CLT's replacement model)
    ("CE loss, all output hooks spliced at once", "ce_loss_spliced_all"),
    ("CE loss, all output hooks zero-ablated at once", "ce_loss_zero_ablated_all"),
    ("CE loss score, all output hooks at once", "ce_loss_score_all"),
    ("KL div (clean vs all output hooks spliced)", "kl_div_all"),
)


def density_log10(density: Tensor) -> Tensor:
    """log10 of each latent's firing frequency, dead latents at DEAD_LOG10."""
    return torch.log10(density.double() + DENSITY_EPS)


def is_dead_log10(values: Tensor) -> Tensor:
    """Which log10 densities are those of latents that never fired."""
    return values <= DEAD_LOG10 + 0.01


def dead_and_dense_fractions(density: Tensor) -> tuple[float, float]:
    """(fraction of latents that never fired, fraction firing on more than DENSE_THRESHOLD of tokens)."""
    return float((density == 0).double().mean()), float((density > DENSE_THRESHOLD).double().mean())
