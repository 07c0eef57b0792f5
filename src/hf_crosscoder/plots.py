"""Plots of a training run, drawn from the files in its output directory (PNG, next to the model).

- `feature_density.png`: histogram of log10 latent firing frequency (final eval, `feature_stats.safetensors`).
- `decoder_norm_share.png`: the crosscoder signature: each latent's decoder-norm share per output
  layer, in normalized space, latents sorted by their main layer.
- `layer_span.png`: how many output layers each latent spans (share > `SPAN_THRESHOLD` of its total).
- `training_curves.png`: loss, L0 and FVU per output hook vs step (`training_log.jsonl`).
- `target_layer_share.png` (cross-layer transcoders): per source layer (latent group), the mean share of
  its latents' decoder norm that goes to each target (output) layer.

`draw_all(output_dir)` is what the runner calls at the end of training; `python -m hf_crosscoder.plots
OUTPUT_DIR` redraws them for a finished run, or for a running one from its latest checkpoint.
matplotlib is an optional extra (`pip install hf_crosscoder[plots]`), imported only when drawing.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .checkpoints import latest_checkpoint
from .config import layer_labels
from .metrics import DENSE_THRESHOLD, FEATURE_STATS_FILE, density_log10, is_dead_log10
from .modeling import Crosscoder

logger = logging.getLogger(__name__)

SPAN_THRESHOLD = 0.1  # a latent "uses" a layer when that layer holds > 10% of its decoder norm
DENSITY_FILE, SIGNATURE_FILE, SPAN_FILE, CURVES_FILE, TARGET_SHARE_FILE = (
    "feature_density.png", "decoder_norm_share.png", "layer_span.png", "training_curves.png",
    "target_layer_share.png")


def _figure(n_cols: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib Figure on an Agg canvas, without pyplot: no global backend switch, no GUI, no leaks."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError("hf_crosscoder.plots needs matplotlib: pip install hf_crosscoder[plots] "
                          "(or pip install matplotlib).") from err
    fig = Figure(figsize=(width * n_cols, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, n_cols, i + 1) for i in range(n_cols)]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------- inputs
def read_training_log(path: Path) -> list[dict]:
    """Rows of a jsonl log by step; a half-written last line (a run still writing) is skipped, and a
    step logged twice (a resumed run repeats the steps after its checkpoint) keeps its last row."""
    by_step: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[step] for step in sorted(by_step)]


def load_crosscoder(output_dir: Path):
    """The final model in `output_dir`, else the newest checkpoint of a running run, else None."""
    candidates = [output_dir, latest_checkpoint(output_dir / "checkpoints")]
    for folder in candidates:
        if folder is not None and (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return Crosscoder.from_pretrained(folder)
    return None


# ---------------------------------------------------------------- computations (no matplotlib)
@torch.no_grad()
def decoder_norm_shares(crosscoder) -> torch.Tensor:
    """[d_sae, n_out]: each latent's share of its decoder norm per output layer, in normalized space.

    The saved model has the per-hook normalization folded into W_dec; `output_norm_weights()` undoes
    that, or layers with larger raw activations would swamp the profile.
    """
    norms = crosscoder.decoder_norms_per_layer().detach().float()
    return norms / norms.sum(dim=1, keepdim=True).clamp(min=1e-12)


def signature_order(shares: torch.Tensor) -> torch.Tensor:
    """Latent order for the heatmap: grouped by main (argmax) layer, most concentrated first."""
    top_share, top_layer = shares.max(dim=1)
    key = top_layer.double() * 2 - top_share.double()  # layer first; within a layer, share descending
    return key.argsort()


def layer_span(shares: torch.Tensor, threshold: float = SPAN_THRESHOLD) -> torch.Tensor:
    """[d_sae] number of output layers holding more than `threshold` of each latent's decoder norm."""
    return (shares > threshold).sum(dim=1)


def target_shares_by_group(crosscoder, alive: torch.Tensor | None = None) -> torch.Tensor:
    """[n_groups, n_out]: per latent group (a CLT's source layer), the mean decoder-norm share its (alive)
    latents give each output layer; a group's row sums to 1 (0 for a group with no alive latent)."""
    shares = decoder_norm_shares(crosscoder).cpu()
    keep = torch.ones(len(shares), dtype=torch.bool) if alive is None else alive.cpu()
    rows = []
    for group in crosscoder.structure.groups:
        alive_shares = shares[group.latents][keep[group.latents]]
        rows.append(alive_shares.mean(0) if len(alive_shares) else torch.zeros(shares.shape[1]))
    return torch.stack(rows)


# ---------------------------------------------------------------- plots
def plot_feature_density(density_log10: list[float], path: Path) -> Path:
    """Histogram of log10 firing frequency of the latents that fired; dead ones are counted in the title."""
    values = torch.tensor(density_log10, dtype=torch.float64)
    dead = is_dead_log10(values)  # never fired during the eval
    alive = values[~dead].tolist()
    fig, (ax,) = _figure()
    if alive:
        ax.hist(alive, bins=50, color="tab:blue")
    ax.axvline(math.log10(DENSE_THRESHOLD), color="tab:red", linestyle="--",
               label=f"dense (fires on > {DENSE_THRESHOLD:.0%} of tokens)")
    ax.set_xlabel("log10 feature density (fraction of tokens a latent fires on)")
    ax.set_ylabel("latents")
    ax.set_title(f"Feature density: {len(alive)} alive, {int(dead.sum())} dead (not shown) of {len(values)}")
    ax.legend(loc="upper left")
    return _save(fig, path)


def plot_signature(shares: torch.Tensor, hook_names: list[str], path: Path, note: str = "") -> Path:
    """Heatmap [latent x output layer] of decoder-norm shares, latents sorted by `signature_order`."""
    ordered = shares[signature_order(shares)].numpy()
    fig, (ax,) = _figure(width=max(5.0, 1.0 + 0.9 * len(hook_names)), height=6.0)
    image = ax.imshow(ordered, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(hook_names)), hook_names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(f"latent (sorted by main layer), {len(ordered)} shown")
    ax.set_title("Decoder-norm share per output layer" + (f"\n{note}" if note else ""), fontsize=10)
    fig.colorbar(image, ax=ax, label="share of the latent's decoder norm")
    return _save(fig, path)


def plot_layer_span(shares: torch.Tensor, path: Path, threshold: float = SPAN_THRESHOLD) -> Path:
    """Bar chart: how many latents span 1, 2, ..., n_out output layers."""
    n_out = shares.shape[1]
    counts = torch.bincount(layer_span(shares, threshold), minlength=n_out + 1)[1:].tolist()
    fig, (ax,) = _figure()
    ax.bar(range(1, n_out + 1), counts, color="tab:green")
    ax.set_xticks(range(1, n_out + 1))
    ax.set_xlabel(f"output layers spanned (layers holding > {threshold:.0%} of the latent's decoder norm)")
    ax.set_ylabel("latents")
    ax.set_title("Layer span of the latents")
    return _save(fig, path)


def plot_target_shares(matrix: torch.Tensor, hooks_in: list[str], hooks_out: list[str], path: Path) -> Path:
    """Heatmap [source layer x target layer] of `target_shares_by_group` (upper triangle for a CLT)."""
    fig, (ax,) = _figure(width=max(5.0, 1.5 + 0.7 * len(hooks_out)), height=max(4.0, 1.0 + 0.5 * len(hooks_in)))
    image = ax.imshow(matrix.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
    ax.set_xticks(range(len(hooks_out)), hooks_out, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(hooks_in)), hooks_in, fontsize=8)
    ax.set_xlabel("target (output) layer")
    ax.set_ylabel("source layer (latent group)")
    ax.set_title("Decoder-norm share by target layer, mean over each group's latents", fontsize=10)
    fig.colorbar(image, ax=ax, label="mean share of a latent's decoder norm")
    return _save(fig, path)


def plot_training_curves(rows: list[dict], path: Path) -> Path:
    """Loss (log scale), L0 and FVU per output hook against the training step."""
    steps = [r["step"] for r in rows]
    fvu_keys = sorted({k for r in rows for k in r if k.startswith("fvu/")})
    fig, axes = _figure(n_cols=3, width=4.5, height=3.6)
    for ax, key, title in ((axes[0], "loss", "training loss"), (axes[1], "l0", "L0 (active latents/token)")):
        ax.plot(steps, [r.get(key, math.nan) for r in rows])
        ax.set_title(title)
    axes[0].set_yscale("log")
    for key in fvu_keys:
        axes[2].plot(steps, [r.get(key, math.nan) for r in rows], label=key.removeprefix("fvu/"))
    axes[2].set_title("FVU per output hook (normalized)")
    if fvu_keys:
        axes[2].legend(fontsize=7)
    for ax in axes:
        ax.set_xlabel("step")
    return _save(fig, path)


# ---------------------------------------------------------------- entry points
def _read_density_log10(out: Path) -> torch.Tensor | None:
    """log10 latent densities of the final eval (feature_stats.safetensors), None before it exists."""
    path = out / FEATURE_STATS_FILE
    if not path.is_file():
        return None
    density = load_file(str(path)).get("feature_density")
    return None if density is None else density_log10(density)


def _draw_signature(out: Path, crosscoder, density: torch.Tensor | None) -> list[Path]:
    hooks = layer_labels(crosscoder.config, "out")
    if len(hooks) < 2:
        logger.info("One output hook: no cross-layer decoder profile to plot.")
        return []
    shares = decoder_norm_shares(crosscoder).cpu()
    dead, note, alive = (None if density is None else is_dead_log10(density)), "", None
    if dead is not None and len(dead) == len(shares) and 0 < int(dead.sum()) < len(shares):
        # dead latents keep their random initial decoder (equal shares) and would blur the picture
        alive, note = ~dead, f"alive latents only ({int(dead.sum())} dead in the final eval left out)"
    kept = shares if alive is None else shares[alive]
    written = [plot_signature(kept, hooks, out / SIGNATURE_FILE, note), plot_layer_span(kept, out / SPAN_FILE)]
    if crosscoder.config.layer_structure == "cross_layer":
        matrix = target_shares_by_group(crosscoder, alive)
        written.append(plot_target_shares(matrix, layer_labels(crosscoder.config, "in"), hooks,
                                          out / TARGET_SHARE_FILE))
    return written


def draw_all(output_dir: str | Path, crosscoder: Any = None) -> list[Path]:
    """Draw every plot the files in `output_dir` allow; returns the PNGs written (in `output_dir`).

    `crosscoder`: the trained model, when the caller has it in memory (the runner draws before it saves
    model.safetensors); otherwise the model saved in `output_dir` or its newest checkpoint is loaded.
    Missing inputs skip their plot with a log message; matplotlib missing raises ImportError.
    """
    out = Path(output_dir)
    if not out.is_dir():
        raise FileNotFoundError(f"{out} is not a directory; pass a run's output_path.")
    written: list[Path] = []
    density = _read_density_log10(out)
    if density is not None:
        written.append(plot_feature_density(density.tolist(), out / DENSITY_FILE))
    else:
        logger.info("No %s with feature_density in %s (written when training ends): feature density plot "
                    "skipped.", FEATURE_STATS_FILE, out)
    crosscoder = crosscoder if crosscoder is not None else load_crosscoder(out)
    if crosscoder is not None:
        written += _draw_signature(out, crosscoder, density)
    else:
        logger.info("No model (config.json + model.safetensors) in %s or its checkpoints/: decoder "
                    "plots skipped.", out)
    log = out / "training_log.jsonl"
    rows = read_training_log(log) if log.is_file() else []
    if rows:
        written.append(plot_training_curves(rows, out / CURVES_FILE))
    else:
        logger.info("No training_log.jsonl rows in %s: training curves skipped.", out)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    """`python -m hf_crosscoder.plots OUTPUT_DIR`: (re)draw a run's plots and list them."""
    parser = argparse.ArgumentParser(prog="python -m hf_crosscoder.plots", description=main.__doc__)
    parser.add_argument("output_dir", help="A run's output_path (finished, or running: uses its checkpoints).")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = draw_all(args.output_dir)
    except (FileNotFoundError, ImportError) as err:
        raise SystemExit(str(err)) from None
    for path in written:
        print(path)
    if not written:
        print(f"Nothing to plot yet in {args.output_dir}.", file=sys.stderr)
    return written


if __name__ == "__main__":
    main()
