"""Layer structures: which latents read which input hooks and write which output hooks.

A structure splits the `d_sae` latents into groups (`Group`): each reads a contiguous range of the flat
input x [batch, n_in * d_model] and writes a contiguous range of the flat reconstruction. It owns the
weight shapes and the views the kernels (kernels.py) work on, and the weights hold no structural zeros:

- `dense` (default): one group, every input hook -> every latent -> every output hook (today's crosscoder).
  W_enc [n_in, d_model, d_sae], W_dec [d_sae, n_out, d_model], W_skip [d_in, d_out].
- `cross_layer` (a cross-layer transcoder, CLT): L = n_in = n_out groups of G = d_sae / L latents; group i
  reads input hook i and writes output hooks i..L-1. W_enc [L, d_model, G] (group i: W_enc[i]); W_dec is
  the groups' decoders [G, L - i, d_model] packed one after another as [G * L(L+1)/2, d_model] (rows:
  group, then latent, then target layer); W_skip [L, d_model, d_model] (input hook i -> output hook i).
- `per_layer`: L groups; group i reads input hook i and writes output hook i only (L independent SAEs or
  transcoders trained from one harvest). W_enc [L, d_model, G], W_dec [d_sae, 1, d_model], W_skip as CLT.

Adding a structure: a subclass here, `@register_structure("name")`, and its tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .config import n_models, register_config_check

STRUCTURES: dict[str, type[LayerStructure]] = {}


def register_structure(name: str):
    def wrap(cls: type[LayerStructure]) -> type[LayerStructure]:
        if name in STRUCTURES:
            raise ValueError(f"layer structure {name!r} is already registered (by {STRUCTURES[name].__name__}).")
        cls.name = name
        STRUCTURES[name] = cls
        register_config_check("layer_structure", name, cls.check_config)
        return cls

    return wrap


@dataclass(frozen=True)
class Group:
    """Latent columns of h, input columns of the flat x, output columns of the flat reconstruction; and the
    hook indices behind them (for cards, per-group metrics and exports)."""

    latents: slice
    inputs: slice
    outputs: slice
    hooks_in: tuple[int, ...]
    hooks_out: tuple[int, ...]


class LayerStructure:
    """The dense crosscoder's structure; subclasses override what their grouping changes."""

    name = "dense"
    skip_per_group = False  # W_skip [d_in, d_out] (dense) or [L, d_model, d_model] (input i -> output i)

    def __init__(self, config: Any) -> None:
        # duck-typed: a CrosscoderConfig or the runner's config (hook lists, d_model, d_sae)
        # model diffing: the layer axis is (model, hook) pairs, model-major
        models = n_models(config)
        self.n_in, self.n_out = models * len(config.hook_names_in), models * len(config.hook_names_out)
        self.d_model, self.d_sae = config.d_model, config.d_sae
        self.groups = self._groups()

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Raise a ValueError naming the fix when `config` does not fit this structure."""

    def _groups(self) -> list[Group]:
        everything = slice(None)
        return [Group(everything, everything, everything, tuple(range(self.n_in)), tuple(range(self.n_out)))]

    # --- weights
    @property
    def encoder_shape(self) -> tuple[int, ...]:
        return (self.n_in, self.d_model, self.d_sae)

    @property
    def decoder_shape(self) -> tuple[int, ...]:
        return (self.d_sae, self.n_out, self.d_model)

    @property
    def skip_shape(self) -> tuple[int, ...]:
        return (self.n_in * self.d_model, self.n_out * self.d_model)

    @property
    def group_width(self) -> int:
        """Latents per group (all groups are equally wide)."""
        return self.d_sae // len(self.groups)

    @property
    def encoder_fan_in(self) -> int:
        """Inputs each latent reads (the Kaiming bound of an untied encoder init)."""
        return self.n_in * self.d_model

    def encoder_views(self, W_enc: Tensor) -> list[Tensor]:
        """Per group its encoder [d_in_g, G] (views tiling W_enc)."""
        return [W_enc.flatten(0, 1)]

    def decoder_views(self, W_dec: Tensor) -> list[Tensor]:
        """Per group its decoder [G, d_out_g] (views tiling W_dec)."""
        return [W_dec.flatten(1)]

    def decoder_vectors(self, W_dec: Tensor) -> Tensor:
        """[d_sae, n_out, d_model]: each latent's decoder vector per output hook, zeros where it writes none
        (a dense copy for analysis and export: the model never computes with it)."""
        return W_dec

    def decoder_norms_per_layer(self, W_dec: Tensor) -> Tensor:
        """[d_sae, n_out]: ||decoder vector|| of each latent per output hook (0 where it writes none)."""
        return W_dec.norm(dim=-1)

    def init_decoder(self, W_dec: Tensor, norm: float) -> None:
        """Random directions of L2 norm `norm` per latent and output hook."""
        W_dec.copy_(torch.randn_like(W_dec))
        W_dec.div_(W_dec.norm(dim=-1, keepdim=True)).mul_(norm)

    def init_encoder_from_decoder(self, W_enc: Tensor, W_dec: Tensor) -> None:
        """Tied init (same hooks in and out): the encoder starts as the decoder's transpose."""
        W_enc.copy_(W_dec.permute(1, 2, 0))

    def fold_scales(self, W_enc: Tensor, W_dec: Tensor, s_in: Tensor, s_out: Tensor) -> None:
        """Raw-scale weights: input block of hook l times s_in[l], output block of hook l divided by s_out[l]."""
        W_enc.mul_(s_in[:, None, None])
        W_dec.div_(s_out[None, :, None])

    # --- skip path
    def skip(self, x_flat: Tensor, W_skip: Tensor) -> Tensor:
        return x_flat @ W_skip

    def fold_skip(self, W_skip: Tensor, s_in: Tensor, s_out: Tensor) -> None:
        blocks = W_skip.view(self.n_in, self.d_model, self.n_out, self.d_model)
        blocks.mul_(s_in[:, None, None, None] / s_out[None, None, :, None])


register_structure("dense")(LayerStructure)


class _Layered(LayerStructure):
    """L groups of G latents, group i reading input hook i only (what cross_layer and per_layer share)."""

    skip_per_group = True

    @classmethod
    def check_config(cls, config: Any) -> None:
        n_in, n_out = len(config.hook_names_in), len(config.hook_names_out)
        if n_in != n_out:
            raise ValueError(f"layer_structure={cls.name!r} pairs input hook i with output hook i, so it needs as "
                             f"many input as output hooks; got {n_in} in and {n_out} out.")
        if config.d_sae is not None and config.d_sae % n_in:
            raise ValueError(f"layer_structure={cls.name!r}: d_sae={config.d_sae} is the total over {n_in} layers "
                             f"and must be divisible by {n_in} (e.g. d_sae={n_in * max(1, config.d_sae // n_in)}).")

    @property
    def width(self) -> int:
        return self.d_sae // self.n_in

    @property
    def encoder_shape(self) -> tuple[int, ...]:
        return (self.n_in, self.d_model, self.width)

    @property
    def skip_shape(self) -> tuple[int, ...]:
        return (self.n_in, self.d_model, self.d_model)

    @property
    def encoder_fan_in(self) -> int:
        return self.d_model

    def targets(self, i: int) -> range:
        raise NotImplementedError

    def _groups(self) -> list[Group]:
        G, d = self.d_sae // self.n_in, self.d_model
        groups = []
        for i in range(self.n_in):
            t = self.targets(i)
            groups.append(Group(slice(i * G, (i + 1) * G), slice(i * d, (i + 1) * d), slice(t.start * d, t.stop * d),
                                (i,), tuple(t)))
        return groups

    def encoder_views(self, W_enc: Tensor) -> list[Tensor]:
        return list(W_enc.unbind(0))

    def init_encoder_from_decoder(self, W_enc: Tensor, W_dec: Tensor) -> None:
        # a group's latents read one hook: the transpose of their decoder vectors at that same hook
        vectors = self.decoder_vectors(W_dec)
        for i, view in enumerate(self.encoder_views(W_enc)):
            view.copy_(vectors[self.groups[i].latents, i].T)

    def fold_scales(self, W_enc: Tensor, W_dec: Tensor, s_in: Tensor, s_out: Tensor) -> None:
        W_enc.mul_(s_in[:, None, None])
        for grp, view in zip(self.groups, self.decoder_views(W_dec)):
            view.view(view.shape[0], len(grp.hooks_out), self.d_model).div_(s_out[list(grp.hooks_out)][None, :, None])

    def skip(self, x_flat: Tensor, W_skip: Tensor) -> Tensor:
        x = x_flat.view(x_flat.shape[0], self.n_in, self.d_model)
        return torch.einsum("bld,lde->ble", x, W_skip).flatten(1)

    def fold_skip(self, W_skip: Tensor, s_in: Tensor, s_out: Tensor) -> None:
        W_skip.mul_((s_in / s_out)[:, None, None])

    def decoder_norms_per_layer(self, W_dec: Tensor) -> Tensor:
        rows = []
        for grp, view in zip(self.groups, self.decoder_views(W_dec)):
            norms = view.view(view.shape[0], len(grp.hooks_out), self.d_model).norm(dim=-1)
            rows.append(torch.nn.functional.pad(norms, (grp.hooks_out[0], self.n_out - 1 - grp.hooks_out[-1])))
        return torch.cat(rows)

    def decoder_vectors(self, W_dec: Tensor) -> Tensor:
        out = W_dec.new_zeros(self.d_sae, self.n_out, self.d_model)
        for grp, view in zip(self.groups, self.decoder_views(W_dec)):
            out[grp.latents, grp.hooks_out[0]:grp.hooks_out[-1] + 1] = view.view(view.shape[0], -1, self.d_model)
        return out

    def init_decoder(self, W_dec: Tensor, norm: float) -> None:
        for grp, view in zip(self.groups, self.decoder_views(W_dec)):
            v = view.view(view.shape[0], len(grp.hooks_out), self.d_model)
            v.copy_(torch.randn_like(v))
            v.div_(v.norm(dim=-1, keepdim=True)).mul_(norm)


@register_structure("cross_layer")
class CrossLayer(_Layered):
    """A cross-layer transcoder: group i reads input hook i and writes output hooks i..L-1."""

    def targets(self, i: int) -> range:
        return range(i, self.n_out)

    @property
    def decoder_shape(self) -> tuple[int, ...]:
        return (self.width * self.n_out * (self.n_out + 1) // 2, self.d_model)

    def decoder_views(self, W_dec: Tensor) -> list[Tensor]:
        G, L, d = self.width, self.n_out, self.d_model
        sizes = [G * (L - i) for i in range(L)]
        return [rows.view(G, (L - i) * d) for i, rows in enumerate(W_dec.split(sizes))]


@register_structure("per_layer")
class PerLayer(_Layered):
    """L independent dictionaries: group i reads input hook i and writes output hook i."""

    def targets(self, i: int) -> range:
        return range(i, i + 1)

    @property
    def decoder_shape(self) -> tuple[int, ...]:
        return (self.d_sae, 1, self.d_model)

    def decoder_views(self, W_dec: Tensor) -> list[Tensor]:
        return [rows.flatten(1) for rows in W_dec.split(self.width)]


def structure_of(config: Any) -> LayerStructure:
    """The structure object of a config (default 'dense': configs written before structures existed)."""
    return STRUCTURES[getattr(config, "layer_structure", "dense") or "dense"](config)
