"""The crosscoder: a `PreTrainedModel` with one small base class and an architecture registry.

Shapes (dense layer structure, layer axis explicit): W_enc [n_in, d_model, d_sae], b_enc [d_sae], W_dec
[d_sae, n_out, d_model], b_dec [n_out, d_model]; other layer structures (structures.py: cross_layer,
per_layer) shape W_enc / W_dec / W_skip by their groups of latents. The fused kernels (kernels.py) work on
the structure's block views.

An architecture is a sparsity family: a subclass registered with `@register(name)` that declares what the
rest of the package needs to know about it:
- `hyperparameters`: the config fields it uses (the model card lists them) and `check_config` for them;
- `saelens_architectures`: its SAELens counterparts (saelens.py): (SAE name, transcoder name or None) for
  export, and `saelens_imports`, the SAELens names it reads back;
- `inference_threshold()` (JumpReLU / BatchTopK gate, else None) and `reduce_statistics(reduce)` for the
  statistics it keeps that data-parallel processes must agree on;
- `card_rows()`: what its model card adds (default: its hyper-parameters).
It overrides only what its math changes: `_core` (encode, decode and sparsity terms) and `_extra_losses`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from . import kernels
from .config import CrosscoderConfig, n_models, register_config_check
from .kernels import GatheredPreActs, JumpReLUCore, ReLUCore, Selection, SparseDecode
from .structures import structure_of

ARCHITECTURES: dict[str, type[Crosscoder]] = {}


def register(name: str):
    """Register an architecture class under `name` (and its config check); a name is registered once."""
    def wrap(cls: type[Crosscoder]) -> type[Crosscoder]:
        if name in ARCHITECTURES:
            raise ValueError(f"architecture {name!r} is already registered (by {ARCHITECTURES[name].__name__}).")
        cls.architecture_name = name
        ARCHITECTURES[name] = cls
        register_config_check("architecture", name, cls.check_config)
        return cls

    return wrap


@dataclass
class CrosscoderOutput(ModelOutput):
    """One record per forward. `losses` holds the scalar terms that sum to `loss` plus `mse_per_layer`
    ([n_out], the per-output-hook part of `mse`, for logging)."""

    loss: Tensor | None = None
    feature_acts: Tensor | None = None
    reconstruction: Tensor | None = None
    losses: dict[str, Tensor] | None = None
    fired: Tensor | None = None  # [d_sae] bool: latents active on any token of this batch
    fire_counts: Tensor | None = None  # [d_sae] long: tokens of this batch on which each latent fired


@dataclass
class _Encoded:
    """Activations of one batch: dense `acts` [B, d_sae] (the public `feature_acts`), `counts` [d_sae]
    (tokens on which each latent fired); for TopK families the selected pairs per group and the AuxK
    selection of dead latents (values, selections, dead count)."""

    acts: Tensor
    counts: Tensor
    selections: list[Selection] | None = None
    values: Tensor | None = None
    aux: tuple[Tensor, list[Selection], Tensor] | None = None


def any_dead(dead_mask: Tensor | None, device: torch.device) -> bool:
    """Whether dead-latent terms must run. On CPU a host check is free and skips them when none is dead;
    elsewhere they always run (their value is then exactly 0), so no step waits for the device."""
    if dead_mask is None:
        return False
    return bool(dead_mask.any()) if kernels.host_reads_are_free(device) else True


class Crosscoder(PreTrainedModel):
    """ReLU crosscoder with the decoder-norm-weighted L1 penalty (Anthropic's crosscoder loss).

    `Crosscoder(config)` returns the subclass registered for `config.architecture`, so one class name
    loads every architecture (also through `from_pretrained` and `AutoModel`).
    """

    config_class = CrosscoderConfig
    base_model_prefix = "crosscoder"
    main_input_name = "acts_in"
    architecture_name = "crosscoder"
    _no_split_modules: list[str] = []
    hyperparameters: tuple[str, ...] = ("l1_coefficient", "sparsity_decoder_norm")
    saelens_architectures: tuple[str | None, str | None] = ("standard", "transcoder")
    saelens_imports: tuple[str, ...] = ("standard", "transcoder")

    def __new__(cls, config: CrosscoderConfig | None = None, *args, **kwargs):
        if cls is Crosscoder and config is not None:  # (copy/pickle call __new__ without a config)
            cls = ARCHITECTURES[config.architecture]
        return super().__new__(cls)

    def __init__(self, config: CrosscoderConfig) -> None:
        super().__init__(config)
        self.structure = structure_of(config)
        s = self.structure
        self.W_enc = nn.Parameter(torch.empty(s.encoder_shape))
        self.b_enc = nn.Parameter(torch.zeros(config.d_sae))
        self.W_dec = nn.Parameter(torch.empty(s.decoder_shape))
        self.b_dec = nn.Parameter(torch.zeros(config.n_out, config.d_model))
        self._add_parameters(config)
        if config.n_shared_latents:
            self.W_dec.register_hook(self._tie_shared_gradient)
        self.post_init()

    # ---------------------------------------------------------------- declarations
    @classmethod
    def check_config(cls, config) -> None:
        """Raise a ValueError naming the fix for hyper-parameters this architecture cannot use."""

    def inference_threshold(self) -> Tensor | None:
        """The gate an exported / inference model applies (JumpReLU, BatchTopK), else None."""
        return None

    def pre_activation_threshold(self) -> Tensor | None:
        """[d_sae] the JumpReLU threshold on the pre-activation h equivalent to this model's inference gate
        (f = h where h > threshold), for exports to formats that know JumpReLU; None without a gate."""
        return None

    def reduce_statistics(self, reduce: Callable[[Tensor, str], Tensor]) -> None:
        """Make statistics kept outside the optimizer equal on every process (`reduce(t, 'min'|'sum'|'mean')`
        returns the reduced tensor)."""

    def card_rows(self) -> list[tuple[str, object]]:
        """(name, value) rows the model card lists for this architecture."""
        return [(name, getattr(self.config, name)) for name in self.hyperparameters]

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        """Architecture-specific parameters and buffers."""

    def _reset_extra(self) -> None:
        """Initial values of the architecture-specific parameters."""

    # ---------------------------------------------------------------- init
    def _init_weights(self, module: nn.Module) -> None:
        if module is self:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        c, s = self.config, self.structure
        s.init_decoder(self.W_dec, c.decoder_init_norm)
        if c.n_shared_latents:  # every model's copy starts as the first model's
            shared = self._shared_decoders(self.W_dec)
            shared.copy_(shared[:, :1].clone().expand_as(shared))
        if c.hook_names_in == c.hook_names_out:
            # same layers in and out: the encoder starts as the decoder's transpose (tied init)
            s.init_encoder_from_decoder(self.W_enc, self.W_dec)
        else:
            # inputs and outputs differ, so a transpose has no meaning: Kaiming-uniform, independent
            bound = 1 / math.sqrt(s.encoder_fan_in)
            self.W_enc.uniform_(-bound, bound)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self._reset_extra()

    # ---------------------------------------------------------------- shared latents (model diffing)
    def _shared_decoders(self, W_dec: Tensor) -> Tensor:
        """[n_shared_latents, n_models, n_hooks_out, d_model] view of the shared latents' decoder rows."""
        n, models = self.config.n_shared_latents, n_models(self.config)
        return W_dec[:n].view(n, models, -1, self.config.d_model)

    def _tie_shared_gradient(self, grad: Tensor) -> Tensor:
        """Shared latents have one decoder vector per hook, kept as equal copies in every model's rows: each
        copy gets the gradient of the one shared vector (the sum over models), so from their equal init the
        copies take identical optimizer steps and stay equal (the fused kernels see a plain W_dec)."""
        grad = grad.clone()
        shared = self._shared_decoders(grad)
        shared.copy_(shared.sum(1, keepdim=True).expand_as(shared))
        return grad

    def _penalty_norms(self, dn: Tensor) -> Tensor:
        """The decoder norms the sparsity term weighs latents by: the shared latents' scaled by
        `shared_sparsity_scale` (Anthropic: 0.1-0.2, so shared latents are cheaper)."""
        n, scale = self.config.n_shared_latents, self.config.shared_sparsity_scale
        return dn if not n or scale == 1 else torch.cat([dn[:n] * scale, dn[n:]])

    # ---------------------------------------------------------------- shapes
    def _as_3d(self, x: Tensor, n: int, name: str) -> Tensor:
        d = self.config.d_model
        if x.dim() == 2 and x.shape[1] == n * d:
            x = x.view(x.shape[0], n, d)
        if x.dim() != 3 or x.shape[1:] != (n, d):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [batch, {n * d}] (flat) or "
                             f"[batch, {n}, {d}] for {n} hooks of d_model={d}.")
        if x.shape[0] == 0:  # else a shape error deep inside the encoder
            raise ValueError(f"{name} has no rows (shape {tuple(x.shape)}); pass at least one token's activations.")
        return x.to(self.W_enc.dtype)

    def _flat_in(self, acts_in: Tensor) -> Tensor:
        return self._as_3d(acts_in, self.config.n_in, "acts_in").flatten(1)

    def _blocks(self) -> list[kernels.Block]:
        return kernels.blocks(self.structure, self.W_enc, self.W_dec)

    # ---------------------------------------------------------------- decoder norms
    def output_norm_weights(self) -> Tensor:
        """Per-output-layer weights that bring decoder norms back to normalized space after folding, so
        ranking and penalties do not change when the normalization is folded into W_dec."""
        scale = self.config.activation_scale_out if self.config.activation_norm_folded else None
        if scale is None:
            return torch.ones(self.config.n_out, device=self.W_dec.device, dtype=self.W_dec.dtype)
        return torch.tensor(scale, device=self.W_dec.device, dtype=self.W_dec.dtype)

    def decoder_norms_per_layer(self) -> Tensor:
        """[d_sae, n_out]: each latent's decoder norm per output hook in normalized space (0 where its group
        writes no such hook): the crosscoder's signature, and what model diffing compares."""
        return self.structure.decoder_norms_per_layer(self.W_dec) * self.output_norm_weights()

    def decoder_norms(self) -> Tensor:
        """dn_s: sum over output layers of ||W_dec[s, l]|| ('sum'), or the norm of the concatenation."""
        norms = self.structure.decoder_norms_per_layer(self.W_dec)
        w = self.output_norm_weights()
        if self.config.sparsity_decoder_norm == "concat":
            return (norms * w).norm(dim=-1)
        return norms @ w

    # ---------------------------------------------------------------- encode / decode
    def pre_activations(self, acts_in: Tensor) -> Tensor:
        return kernels.encode(self._flat_in(acts_in), self.b_enc, self._blocks())

    def _core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        """(activations, reconstruction [B, d_out] without the skip path, {"sparsity": unscaled term, any
        other term}) of flat inputs x. ReLU: f = relu(h); sparsity = l1_coefficient * mean_b f @ dn."""
        ws = kernels.workspace(self)
        f, recon, l1 = ReLUCore.apply(x, self.W_enc, self.b_enc, self.W_dec, self.b_dec.flatten(),
                                      self._penalty_norms(dn), self.structure, ws)
        enc = _Encoded(acts=f, counts=kernels.fire_counts(f.detach(), ws.get("grad_h", f)))
        return enc, recon, {"sparsity": self.config.l1_coefficient * l1 / x.shape[0]}

    def encode(self, acts_in: Tensor) -> Tensor:
        """Feature activations [batch, d_sae]."""
        return self._core(self._flat_in(acts_in), self.decoder_norms(), None)[0].acts

    def _decode_flat(self, acts: Tensor) -> Tensor:
        return kernels.decode(acts, self.b_dec.flatten(), self._blocks())

    def _skip(self, x_flat: Tensor) -> Tensor | None:
        return None

    def decode(self, feature_acts: Tensor, acts_in: Tensor | None = None) -> Tensor:
        """Reconstruction [batch, n_out, d_model] of `feature_acts`; the skip path needs `acts_in`."""
        out = self._decode_flat(feature_acts.to(self.W_dec.dtype))
        if acts_in is not None and (skip := self._skip(self._flat_in(acts_in))) is not None:
            out = out + skip
        return out.view(-1, self.config.n_out, self.config.d_model)

    # ---------------------------------------------------------------- losses
    def _extra_losses(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, y: Tensor,
                      dead_mask: Tensor | None) -> dict:
        return {}

    def forward(self, acts_in: Tensor, acts_out: Tensor | None = None, dead_mask: Tensor | None = None,
                sparsity_scale: float = 1.0) -> CrosscoderOutput:
        """Encode `acts_in`, decode to the output hooks, and with `acts_out` compute the training loss.

        acts_in: [batch, d_in] or [batch, n_in, d_model]; the reconstruction comes back in the same layout.
        dead_mask: [d_sae] bool, latents counted dead by the trainer (AuxK / pre-activation losses).
        sparsity_scale: multiplier of the sparsity coefficient (the trainer's warmup ramp).
        """
        flat_layout = acts_in.dim() == 2
        x = self._flat_in(acts_in)
        dec_norms = self.decoder_norms()
        enc, recon, terms = self._core(x, dec_norms, dead_mask)
        if (skip := self._skip(x)) is not None:
            recon = recon + skip
        counts = {"fired": enc.counts > 0, "fire_counts": enc.counts}
        out_shape = (x.shape[0], -1) if flat_layout else (x.shape[0], self.config.n_out, self.config.d_model)
        if acts_out is None:
            return CrosscoderOutput(feature_acts=enc.acts, reconstruction=recon.view(out_shape), **counts)
        y = self._as_3d(acts_out, self.config.n_out, "acts_out").flatten(1)
        err = y - recon
        mse_per_layer = err.view(err.shape[0], self.config.n_out, -1).pow(2).sum(-1).mean(0)
        losses = {"mse": mse_per_layer.sum(), "sparsity": sparsity_scale * terms.pop("sparsity"), **terms}
        losses.update(self._extra_losses(enc, dec_norms, err, y, dead_mask))
        loss = sum(losses.values())
        losses["mse_per_layer"] = mse_per_layer.detach()
        return CrosscoderOutput(loss=loss, feature_acts=enc.acts, reconstruction=recon.view(out_shape),
                                losses=losses, **counts)

    # ---------------------------------------------------------------- normalization fold-in
    @torch.no_grad()
    def fold_activation_norm_scaling(self, scale_in, scale_out) -> None:
        """Fold per-hook input/output scales into the weights so the model runs on raw activations.

        Training saw x_norm = s_in * x and predicted y_norm = s_out * y. Afterwards: W_enc[l] *= s_in[l];
        W_dec[:, l], b_dec[l] /= s_out[l]; skip blocks *= s_in / s_out; b_enc and thresholds unchanged
        (the pre-activations are identical). Decoder-norm weighting keeps using normalized-space norms.
        """
        if self.config.activation_norm_folded:
            raise ValueError("The activation normalization is already folded into this model's weights.")
        scales_in = _as_scale(scale_in, self.config.n_in, "scale_in")
        scales_out = _as_scale(scale_out, self.config.n_out, "scale_out")
        s_in, s_out = scales_in.to(self.W_enc), scales_out.to(self.W_dec)
        self.structure.fold_scales(self.W_enc, self.W_dec, s_in, s_out)
        self.b_dec.div_(s_out[:, None])
        self._fold_skip(s_in, s_out)
        self.config.activation_scale_in = scales_in.tolist()
        self.config.activation_scale_out = scales_out.tolist()
        self.config.activation_norm_folded = True

    def _fold_skip(self, s_in: Tensor, s_out: Tensor) -> None:
        pass


def _as_scale(scale, n: int, name: str) -> Tensor:
    s = torch.as_tensor(scale, dtype=torch.float64).flatten().detach().cpu()
    if s.numel() == 1:
        s = s.expand(n)
    if s.numel() != n or not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"{name} must be {n} positive finite scalars (one per hook); got {scale}.")
    return s  # float64, so config.json records the scales as given (not float32-rounded)


AutoConfig.register("crosscoder", CrosscoderConfig)
AutoModel.register(CrosscoderConfig, Crosscoder)
register("crosscoder")(Crosscoder)


@register("skip_crosscoder")
class SkipCrosscoder(Crosscoder):
    """Adds a learnable linear map of the inputs to the reconstruction (a skip transcoder); per layer
    (input hook i -> output hook i) for the cross_layer / per_layer structures."""

    saelens_architectures = ("skip_transcoder", "skip_transcoder")  # SAELens has no skip SAE
    saelens_imports = ("skip_transcoder",)

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        self.W_skip = nn.Parameter(torch.zeros(self.structure.skip_shape))

    def _reset_extra(self) -> None:
        self.W_skip.zero_()  # starts as a plain crosscoder; the skip learns only what latents miss

    def _skip(self, x_flat: Tensor) -> Tensor:
        return self.structure.skip(x_flat, self.W_skip)

    def _fold_skip(self, s_in: Tensor, s_out: Tensor) -> None:
        self.structure.fold_skip(self.W_skip, s_in, s_out)


@register("jumprelu_crosscoder")
class JumpReLUCrosscoder(Crosscoder):
    """JumpReLU with a raw fp32 threshold `theta`, used as relu(theta) (log-thresholds froze under Adam)."""

    hyperparameters = ("l1_coefficient", "jumprelu_sparsity", "jumprelu_bandwidth", "jumprelu_init_threshold",
                       "jumprelu_tanh_scale", "jumprelu_pre_act_coefficient", "jumprelu_pre_act_latents",
                       "sparsity_decoder_norm")
    saelens_architectures = ("jumprelu", "jumprelu_transcoder")
    saelens_imports = ("jumprelu", "jumprelu_transcoder")

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        self.theta = nn.Parameter(torch.full((c.d_sae,), float(c.jumprelu_init_threshold)))

    def _reset_extra(self) -> None:
        self.theta.fill_(self.config.jumprelu_init_threshold)

    def inference_threshold(self) -> Tensor:
        """[d_sae] the gate on the pre-activation: f = h where h > relu(theta)."""
        return F.relu(self.theta)

    def pre_activation_threshold(self) -> Tensor:
        return self.inference_threshold()

    def _core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        """f = h * H(h - relu(theta)); sparsity "step" = l1_coefficient * mean_b sum_s H(h - t), "tanh" =
        l1_coefficient * mean_b sum_s tanh(c f dn); pre_act = coefficient * mean_b relu(t - h) @ w with w = dn
        on all or on dead latents (exactly 0 when none is dead)."""
        c = self.config
        w = None
        if c.jumprelu_pre_act_latents == "all":
            w = dn
        elif c.jumprelu_pre_act_latents == "dead" and any_dead(dead_mask, x.device):
            w = dn * dead_mask.to(dn.dtype)
        dn_tanh = dn if c.jumprelu_sparsity == "tanh" else None
        f, recon, l0, tanh, pre, counts = JumpReLUCore.apply(
            x, self.W_enc, self.b_enc, self.inference_threshold(), self.W_dec, self.b_dec.flatten(), dn_tanh, w,
            float(c.jumprelu_bandwidth), float(c.jumprelu_tanh_scale), self.structure, kernels.workspace(self))
        batch = x.shape[0]
        terms = {"sparsity": c.l1_coefficient * (tanh if dn_tanh is not None else l0) / batch,
                 "pre_act": c.jumprelu_pre_act_coefficient * pre / batch}
        return _Encoded(acts=f, counts=counts), recon, terms


def _offset(group) -> int:
    return group.latents.start or 0


@register("topk_crosscoder")
class TopKCrosscoder(Crosscoder):
    """k latents per token (per group of latents, for the layered structures), ranked by decoder-scaled
    activation relu(h) * dn (raw h would drift with the decoder's scale), or by raw h with
    topk_ranking='pre_activation'; decoded by a sparse gather. No sparsity term; AuxK on dead latents."""

    hyperparameters = ("k", "topk_ranking", "k_aux", "aux_coefficient")
    saelens_architectures = ("topk", None)
    saelens_imports = ("topk",)

    @classmethod
    def check_config(cls, config) -> None:
        width = structure_of(config).group_width
        if isinstance(config.k, bool) or not isinstance(config.k, int) or not 1 <= config.k <= width:
            where = f"d_sae={width}" if width == config.d_sae else f"the latents per layer group (d_sae / layers) = {width}"
            raise ValueError(f"k={config.k} must be between 1 and {where}; lower k or raise d_sae.")
        if config.k_aux is not None and config.k_aux <= 0:
            raise ValueError(f"k_aux must be positive (or None for the default); got {config.k_aux}.")

    def rank_scale(self, dn: Tensor) -> Tensor:
        """Per-latent factor of the ranking score relu(h) * factor: the decoder norms ('decoder_scaled'), or
        ones ('pre_activation': raw h, as SAELens with rescale_acts_by_decoder_norm=False and sparsify)."""
        return dn if self.config.topk_ranking == "decoder_scaled" else torch.ones_like(dn)

    def _k_aux(self) -> int:
        return min(self.config.k_aux, self.structure.group_width)

    def _select_rows(self, scores: Tensor):
        """This chunk of rows' part of the selection: the k best latents of each row."""
        return scores.topk(self.config.k, dim=-1, sorted=False).indices

    def _select(self, parts: list, x_g: Tensor, W_s: Tensor, b_s: Tensor, group: int) -> Selection:
        """The group's selected (token, latent) pairs, grouped by token."""
        batch, k = x_g.shape[0], self.config.k
        return Selection(kernels.token_rows(batch, k, x_g.device), torch.cat(parts).flatten(),
                         torch.arange(0, batch * k, k, device=x_g.device))

    @torch.no_grad()
    def _select_group(self, x_g: Tensor, W_s: Tensor, b_s: Tensor, dead_g: Tensor | None,
                      group: int) -> tuple[Selection, Selection | None]:
        """Rank by relu(h) * r = relu(x (W_enc r) + b_enc r) (r >= 0) in chunks of rows into one small reused
        buffer; the AuxK candidates are the dead latents' top k_aux by the same score (-inf keeps live
        latents out; if fewer are dead, live picks get value 0 in `_core`)."""
        batch, width = x_g.shape[0], W_s.shape[1]
        chunk = kernels.chunk_rows(batch, width)
        buf = kernels.workspace(self).get("scores", x_g, (chunk, width))
        parts, aux = [], []
        for i in range(0, batch, chunk):
            scores = torch.addmm(b_s, x_g[i:i + chunk], W_s, out=buf[:min(chunk, batch - i)])
            parts.append(self._select_rows(scores))
            if dead_g is not None:
                aux.append(scores.masked_fill_(~dead_g, -math.inf).topk(self._k_aux(), dim=-1, sorted=False).indices)
        sel = self._select(parts, x_g, W_s, b_s, group)
        if dead_g is None:
            return sel, None
        k_aux = self._k_aux()
        return sel, Selection(kernels.token_rows(batch, k_aux, x_g.device), torch.cat(aux).flatten(),
                              torch.arange(0, batch * k_aux, k_aux, device=x_g.device))

    def _core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        """Per group: select without autograd, gather the selected pre-activations by a sampled matmul
        (sparse backward) and decode with embedding_bag (sparse backward). No [B, d_sae] tensor but the
        dense feature_acts output."""
        c, s = self.config, self.structure
        rank, dead = self.rank_scale(dn).detach(), dead_mask if any_dead(dead_mask, x.device) else None
        sels, aux_sels = [], []
        for i, (grp, W_g) in enumerate(zip(s.groups, s.encoder_views(self.W_enc.detach()))):
            r_g = rank[grp.latents]
            sel, aux = self._select_group(x[:, grp.inputs], W_g * r_g, self.b_enc.detach()[grp.latents] * r_g,
                                          None if dead is None else dead[grp.latents], i)
            sels.append(sel)
            aux_sels.append(aux)
        vals = F.relu(GatheredPreActs.apply(x, self.W_enc, self.b_enc, s, sels))
        recon = SparseDecode.apply(vals, self.W_dec, s, sels, c.d_out) + self.b_dec.flatten()
        with torch.no_grad():
            tok, lat = self._global_pairs(sels)
            acts = torch.zeros((x.shape[0], c.d_sae), dtype=vals.dtype, device=x.device)
            acts.index_put_((tok, lat), vals.detach())
            counts = torch.zeros(c.d_sae, dtype=torch.long, device=x.device).scatter_add_(0, lat, (vals > 0).long())
        enc = _Encoded(acts=acts, counts=counts, selections=sels, values=vals)
        if dead is not None:
            _, lat_a = self._global_pairs(aux_sels)
            pre = GatheredPreActs.apply(x, self.W_enc, self.b_enc, s, aux_sels)
            enc.aux = (F.relu(pre) * dead[lat_a], aux_sels, dead)  # a live latent picked has value 0
        return enc, recon, {"sparsity": x.new_zeros(())}

    def _global_pairs(self, sels: list[Selection]) -> tuple[Tensor, Tensor]:
        groups = self.structure.groups
        tok = torch.cat([sel.tok for sel in sels])
        lat = torch.cat([sel.lat + _offset(g) for g, sel in zip(groups, sels)])
        return tok, lat

    def _extra_losses(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, y: Tensor,
                      dead_mask: Tensor | None) -> dict:
        return {"aux": self._auxk(enc, err)}

    def _auxk(self, enc: _Encoded, err: Tensor) -> Tensor:
        """Dead latents' top k_aux reconstruct the detached residual error (decoded without bias), weighted
        by min(n_dead / k_aux, 1) (SAELens), k_aux counted over all groups."""
        if enc.aux is None:
            return err.new_zeros(())
        vals, sels, dead = enc.aux
        e_hat = SparseDecode.apply(vals, self.W_dec, self.structure, sels, self.config.d_out)
        aux = (e_hat - err.detach()).pow(2).sum(-1).mean()
        k_total = self._k_aux() * len(self.structure.groups)
        scale = (dead.sum().to(aux.dtype) / k_total).clamp(max=1.0)
        return self.config.aux_coefficient * scale * aux


@register("batchtopk_crosscoder")
class BatchTopKCrosscoder(TopKCrosscoder):
    """k * batch latents over the whole batch (per group) in training; at inference a JumpReLU gate at
    `threshold` (one per group), an EMA of the smallest kept score (negative until the first training batch)."""

    hyperparameters = ("k", "topk_ranking", "k_aux", "aux_coefficient", "batchtopk_threshold_momentum")
    saelens_architectures = ("jumprelu", "jumprelu_transcoder")  # as SAELens saves BatchTopK for inference
    # a SAELens Matryoshka BatchTopK runs as BatchTopK at inference: the nesting only adds training losses
    saelens_imports = ("batchtopk", "matryoshka_batchtopk")

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        n = len(self.structure.groups)
        self.register_buffer("threshold", torch.full((n,) if n > 1 else (), -1.0))

    def _reset_extra(self) -> None:
        self.threshold.fill_(-1.0)

    def inference_threshold(self) -> Tensor:
        """The gate on the ranking score relu(h) * rank_scale: a scalar (dense) or one per group."""
        return self.threshold

    def pre_activation_threshold(self) -> Tensor:
        """Our gate relu(h) * r > T (r the rank scale) as a per-latent threshold on h: T / r (r > 0; a latent
        with r = 0 never fires: infinite threshold)."""
        if bool((self.threshold < 0).any()):
            raise ValueError(f"This {self.architecture_name} has no inference threshold yet (it is estimated "
                             "during training); train it before exporting.")
        r = self.rank_scale(self.decoder_norms().detach())
        t = self._latent_thresholds().detach()
        return torch.where(r > 0, t / r.clamp_min(1e-30), torch.full_like(r, float("inf")))

    def reduce_statistics(self, reduce: Callable[[Tensor, str], Tensor]) -> None:
        # each process took its local batch minimum; the global EMA is the minimum of them
        self.threshold.copy_(reduce(self.threshold, "min"))

    def card_rows(self) -> list[tuple[str, object]]:
        t = self.threshold.detach().cpu()
        value = float(t) if t.dim() == 0 else [round(v, 6) for v in t.tolist()]
        return [*super().card_rows(), ("inference threshold (on the ranking score)", value)]

    def _gated(self) -> bool:
        return not self.training and bool((self.threshold >= 0).all())

    def _select_rows(self, scores: Tensor):
        """Candidates: each row's 4k best (an exact pre-selection unless a row holds more winners)."""
        return scores.topk(min(scores.shape[1], 4 * self.config.k), dim=-1, sorted=False)

    def _select(self, parts: list, x_g: Tensor, W_s: Tensor, b_s: Tensor, group: int) -> Selection:
        """The k * batch best scores of the group over the whole batch: from the rows' 4k candidates. On CPU
        exactly: when a row's smallest positive candidate beats the k * batch-th best (an unseen score of it
        might too), from all scores, recomputed. On GPUs that check would stall every step on a host read,
        so the candidates are taken as they are (exact unless one token holds more than 4k of the batch's
        k * batch winners). Grouped by token (ascending flat index)."""
        (batch, width) = x_g.shape[0], W_s.shape[1]
        k_total = min(self.config.k * batch, batch * width)
        values, indices = torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])
        per_row = values.shape[1]
        top = values.flatten().topk(k_total, sorted=False)
        floor = values.min(-1).values  # every unseen score of a row is <= its floor
        if per_row == width or not kernels.host_reads_are_free(x_g.device) or bool(((floor < top.values.min()) | (floor <= 0)).all()):
            flat = torch.div(top.indices, per_row, rounding_mode="floor") * width + indices.flatten()[top.indices]
        else:
            top = torch.addmm(b_s, x_g, W_s).flatten().topk(k_total, sorted=False)
            flat = top.indices
        order = flat.argsort()
        flat, kept = flat[order], top.values[order]
        if self.training:
            self._update_threshold(kept, group)
        tok = torch.div(flat, width, rounding_mode="floor")
        return Selection(tok, flat % width, torch.searchsorted(tok, torch.arange(batch, device=x_g.device)))

    @torch.no_grad()
    def _update_threshold(self, kept_scores: Tensor, group: int) -> None:
        """The group's threshold: the first batch's smallest positive kept score, then its EMA; unchanged
        by a batch without positive scores. Tensor ops only: no step waits for the device."""
        t = self.threshold if self.threshold.dim() == 0 else self.threshold[group]
        smallest = torch.where(kept_scores > 0, kept_scores, math.inf).min().to(t.dtype)
        m = self.config.batchtopk_threshold_momentum
        updated = torch.where(t < 0, smallest, m * t + (1 - m) * smallest)
        t.copy_(torch.where(torch.isfinite(smallest), updated, t))

    def _core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        if not self._gated():
            return super()._core(x, dn, dead_mask)
        return self._gated_core(x, dn, dead_mask)

    def _latent_thresholds(self) -> Tensor:
        """The gate per latent ([d_sae], or the scalar for one group)."""
        t = self.threshold
        return t if t.dim() == 0 else t.repeat_interleave(self.structure.group_width)

    def _gated_core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        """Inference: a dense JumpReLU gate on relu(h) * rank_scale (AuxK from the dense h if asked)."""
        h = kernels.encode(x, self.b_enc, self._blocks())
        r = F.relu(h)
        scores = r.detach() * self.rank_scale(dn).detach()
        acts = r * (scores > self._latent_thresholds())
        recon = self._decode_flat(acts)
        enc = _Encoded(acts=acts, counts=kernels.fire_counts(acts.detach(), torch.empty_like(scores)))
        if any_dead(dead_mask, x.device):
            sels = []
            for grp in self.structure.groups:
                best = scores[:, grp.latents].masked_fill_(~dead_mask[grp.latents], -math.inf)
                lat = best.topk(self._k_aux(), dim=-1, sorted=False).indices.flatten()
                k = self._k_aux()
                sels.append(Selection(kernels.token_rows(x.shape[0], k, x.device), lat,
                                      torch.arange(0, x.shape[0] * k, k, device=x.device)))
            tok, lat = self._global_pairs(sels)
            enc.aux = (r[tok, lat] * dead_mask[lat], sels, dead_mask)
        return enc, recon, {"sparsity": x.new_zeros(())}


def default_matryoshka_widths(width: int) -> list[int]:
    """Prefixes of 1/16 and 1/4 of the latents, then all of them (distinct and positive for any width)."""
    return sorted({max(1, width // 16), max(1, width // 4), width})


@register("matryoshka_batchtopk_crosscoder")
class MatryoshkaBatchTopKCrosscoder(BatchTopKCrosscoder):
    """BatchTopK whose latents are nested prefixes (Bussmann et al. 2025, "Learning multi-level features
    with Matryoshka SAEs"): the selection is BatchTopK's over all latents, and the loss adds the
    reconstruction error of each inner prefix (latents [0, w) of each group, for w in matryoshka_widths
    but the last, which is the whole group), so the first latents learn the most general features. Each
    prefix decodes sparsely: the selected pairs with weights zeroed outside the prefix (no host sync, no
    dense [batch, d_sae] decode). Inference and export are BatchTopK's."""

    hyperparameters = ("k", "matryoshka_widths", "topk_ranking", "k_aux", "aux_coefficient",
                       "batchtopk_threshold_momentum")
    saelens_imports = ()  # SAELens's matryoshka_batchtopk imports as batchtopk_crosscoder (same inference)

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        width, widths = structure_of(config).group_width, config.matryoshka_widths
        if widths is None:
            return  # the default prefixes, `prefix_widths`
        example = default_matryoshka_widths(width)
        if any(isinstance(w, bool) or not isinstance(w, int) for w in widths) or not widths or widths[0] <= 0 \
                or widths[-1] != width or any(b <= a for a, b in zip(widths, widths[1:])):
            raise ValueError(f"matryoshka_widths={widths} must increase strictly from a positive size and end at "
                             f"{width} (the latents per group), e.g. {example}.")

    def prefix_widths(self) -> list[int]:
        """The nested prefix sizes per group: matryoshka_widths, or by default width/16, width/4, width."""
        return self.config.matryoshka_widths or default_matryoshka_widths(self.structure.group_width)

    def card_rows(self) -> list[tuple[str, object]]:
        return [(n, self.prefix_widths() if n == "matryoshka_widths" else v) for n, v in super().card_rows()]

    def _extra_losses(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, y: Tensor,
                      dead_mask: Tensor | None) -> dict:
        losses = super()._extra_losses(enc, dec_norms, err, y, dead_mask)
        losses["matryoshka"] = self._prefix_losses(enc, y)
        return losses

    def _prefix_losses(self, enc: _Encoded, y: Tensor) -> Tensor:
        """sum over inner prefixes w of mean_b ||y - (b_dec + decode(latents < w))||^2."""
        if enc.selections is None:  # the inference gate: no training-time prefixes
            return y.new_zeros(())
        local = torch.cat([sel.lat for sel in enc.selections])
        recon, total = self.b_dec.flatten(), y.new_zeros(())
        previous = 0
        for w in self.prefix_widths()[:-1]:
            in_bucket = ((local >= previous) & (local < w)).to(enc.values.dtype)
            recon = recon + SparseDecode.apply(enc.values * in_bucket, self.W_dec, self.structure,
                                               enc.selections, self.config.d_out)
            total = total + (y - recon).pow(2).sum(-1).mean()
            previous = w
        return total
