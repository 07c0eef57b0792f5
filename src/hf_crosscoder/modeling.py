"""The crosscoder: a `PreTrainedModel` with one small base class and an architecture registry.

Shapes (layer axis explicit): W_enc [n_in, d_model, d_sae], b_enc [d_sae], W_dec [d_sae, n_out, d_model],
b_dec [n_out, d_model]. Matmuls use the free flat views W_enc [d_in, d_sae] and W_dec [d_sae, d_out].
Each architecture overrides only what its math changes: the activation (`_activate`) and its extra loss
terms (`_extra_losses`); `skip_crosscoder` also adds a linear skip path to the reconstruction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput

from .config import CrosscoderConfig

ARCHITECTURES: dict[str, type[Crosscoder]] = {}


def register(name: str):
    def wrap(cls: type[Crosscoder]) -> type[Crosscoder]:
        cls.architecture_name = name
        ARCHITECTURES[name] = cls
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


@dataclass
class _Encoded:
    """Activations of one batch: dense `acts` always; sparse `idx`/`vals` ([B, k]) when the architecture
    selects a fixed number per token, so decode can gather instead of multiplying by zeros."""

    acts: Tensor
    pre_acts: Tensor
    idx: Tensor | None = None
    vals: Tensor | None = None
    offsets: Tensor | None = None  # bag starts when idx is flat (a variable number per token)


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

    def __new__(cls, config: CrosscoderConfig | None = None, *args, **kwargs):
        if cls is Crosscoder and config is not None:  # (copy/pickle call __new__ without a config)
            cls = ARCHITECTURES[config.architecture]
        return super().__new__(cls)

    def __init__(self, config: CrosscoderConfig) -> None:
        super().__init__(config)
        c = config
        self.W_enc = nn.Parameter(torch.empty(c.n_in, c.d_model, c.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(c.d_sae))
        self.W_dec = nn.Parameter(torch.empty(c.d_sae, c.n_out, c.d_model))
        self.b_dec = nn.Parameter(torch.zeros(c.n_out, c.d_model))
        self._add_parameters(c)
        self.post_init()

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
        c = self.config
        dec = torch.randn(c.d_sae, c.n_out, c.d_model, device=self.W_dec.device)
        self.W_dec.copy_(dec / dec.norm(dim=-1, keepdim=True) * c.decoder_init_norm)
        if c.hook_names_in == c.hook_names_out:
            # same layers in and out: the encoder starts as the decoder's transpose (tied init)
            self.W_enc.copy_(self.W_dec.permute(1, 2, 0))
        else:
            # inputs and outputs differ, so a transpose has no meaning: Kaiming-uniform, independent
            bound = 1 / math.sqrt(c.d_in)
            self.W_enc.uniform_(-bound, bound)
        self.b_enc.zero_()
        self.b_dec.zero_()
        self._reset_extra()

    # ---------------------------------------------------------------- shapes
    def _as_3d(self, x: Tensor, n: int, name: str) -> Tensor:
        d = self.config.d_model
        if x.dim() == 2 and x.shape[1] == n * d:
            x = x.view(x.shape[0], n, d)
        if x.dim() != 3 or x.shape[1:] != (n, d):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected [batch, {n * d}] (flat) or "
                             f"[batch, {n}, {d}] for {n} hooks of d_model={d}.")
        return x.to(self.W_enc.dtype)

    def _flat_in(self, acts_in: Tensor) -> Tensor:
        return self._as_3d(acts_in, self.config.n_in, "acts_in").flatten(1)

    # ---------------------------------------------------------------- decoder norms
    def output_norm_weights(self) -> Tensor:
        """Per-output-layer weights that bring decoder norms back to normalized space after folding, so
        ranking and penalties do not change when the normalization is folded into W_dec."""
        scale = self.config.activation_scale_out if self.config.activation_norm_folded else None
        if scale is None:
            return torch.ones(self.config.n_out, device=self.W_dec.device, dtype=self.W_dec.dtype)
        return torch.tensor(scale, device=self.W_dec.device, dtype=self.W_dec.dtype)

    def decoder_norms(self) -> Tensor:
        """dn_s: sum over output layers of ||W_dec[s, l]|| ('sum'), or the norm of the concatenation."""
        w = self.output_norm_weights()
        if self.config.sparsity_decoder_norm == "concat":
            return (self.W_dec * w[:, None]).flatten(1).norm(dim=-1)
        return self.W_dec.norm(dim=-1) @ w

    # ---------------------------------------------------------------- encode / decode
    def pre_activations(self, acts_in: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, self._flat_in(acts_in), self.W_enc.flatten(0, 1))

    def _activate(self, h: Tensor, dec_norms: Tensor) -> _Encoded:
        return _Encoded(acts=F.relu(h), pre_acts=h)

    def _encode(self, acts_in: Tensor) -> _Encoded:
        h = self.pre_activations(acts_in)
        return self._activate(h, self.decoder_norms())

    def encode(self, acts_in: Tensor) -> Tensor:
        """Feature activations [batch, d_sae]."""
        return self._encode(acts_in).acts

    def _decode_flat(self, enc: _Encoded) -> Tensor:
        W = self.W_dec.flatten(1)
        b = self.b_dec.flatten()
        if enc.idx is not None:
            bags = F.embedding_bag(enc.idx, W, enc.offsets, per_sample_weights=enc.vals, mode="sum")
            return bags + b
        return torch.addmm(b, enc.acts, W)

    def _skip(self, x_flat: Tensor) -> Tensor | None:
        return None

    def decode(self, feature_acts: Tensor, acts_in: Tensor | None = None) -> Tensor:
        """Reconstruction [batch, n_out, d_model] of `feature_acts`; the skip path needs `acts_in`."""
        out = self._decode_flat(_Encoded(acts=feature_acts.to(self.W_dec.dtype), pre_acts=feature_acts))
        if acts_in is not None and (skip := self._skip(self._flat_in(acts_in))) is not None:
            out = out + skip
        return out.view(-1, self.config.n_out, self.config.d_model)

    # ---------------------------------------------------------------- losses
    def _sparsity(self, enc: _Encoded, dec_norms: Tensor) -> Tensor:
        """Decoder-norm-weighted L1, mean over tokens (a matvec: f @ dn)."""
        return self.config.l1_coefficient * (enc.acts @ dec_norms).mean()

    def _extra_losses(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, dead_mask: Tensor | None) -> dict:
        return {}

    def forward(
        self,
        acts_in: Tensor,
        acts_out: Tensor | None = None,
        dead_mask: Tensor | None = None,
        sparsity_scale: float = 1.0,
        return_dict: bool = True,
    ) -> CrosscoderOutput:
        """Encode `acts_in`, decode to the output hooks, and with `acts_out` compute the training loss.

        acts_in: [batch, d_in] or [batch, n_in, d_model]; the reconstruction comes back in the same layout.
        dead_mask: [d_sae] bool, latents counted dead by the trainer (AuxK / pre-activation losses).
        sparsity_scale: multiplier of the sparsity coefficient (the trainer's warmup ramp).
        """
        flat_layout = acts_in.dim() == 2
        x = self._flat_in(acts_in)
        dec_norms = self.decoder_norms()
        enc = self._activate(torch.addmm(self.b_enc, x, self.W_enc.flatten(0, 1)), dec_norms)
        recon = self._decode_flat(enc)
        if (skip := self._skip(x)) is not None:
            recon = recon + skip
        fired = _fired(enc)
        out_shape = (x.shape[0], -1) if flat_layout else (x.shape[0], self.config.n_out, self.config.d_model)
        if acts_out is None:
            return CrosscoderOutput(feature_acts=enc.acts, reconstruction=recon.view(out_shape), fired=fired)
        y = self._as_3d(acts_out, self.config.n_out, "acts_out").flatten(1)
        err = y - recon
        mse_per_layer = err.view(err.shape[0], self.config.n_out, -1).pow(2).sum(-1).mean(0)
        losses = {"mse": mse_per_layer.sum(), "sparsity": sparsity_scale * self._sparsity(enc, dec_norms)}
        losses.update(self._extra_losses(enc, dec_norms, err, dead_mask))
        loss = sum(losses.values())
        losses["mse_per_layer"] = mse_per_layer.detach()
        return CrosscoderOutput(loss=loss, feature_acts=enc.acts, reconstruction=recon.view(out_shape),
                                losses=losses, fired=fired)

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
        self.W_enc.mul_(s_in[:, None, None])
        self.W_dec.div_(s_out[None, :, None])
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


def _fired(enc: _Encoded) -> Tensor:
    if enc.idx is not None:
        fired = torch.zeros(enc.acts.shape[1], dtype=torch.bool, device=enc.acts.device)
        return fired.index_fill_(0, enc.idx[enc.vals > 0].flatten(), True)
    return (enc.acts > 0).any(0)


AutoConfig.register("crosscoder", CrosscoderConfig)
AutoModel.register(CrosscoderConfig, Crosscoder)


register("crosscoder")(Crosscoder)


@register("skip_crosscoder")
class SkipCrosscoder(Crosscoder):
    """Adds a learnable linear map of the inputs to the reconstruction (a skip transcoder)."""

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        self.W_skip = nn.Parameter(torch.zeros(c.d_in, c.d_out))

    def _reset_extra(self) -> None:
        self.W_skip.zero_()  # starts as a plain crosscoder; the skip learns only what latents miss

    def _skip(self, x_flat: Tensor) -> Tensor:
        return x_flat @ self.W_skip

    def _fold_skip(self, s_in: Tensor, s_out: Tensor) -> None:
        c = self.config
        blocks = self.W_skip.view(c.n_in, c.d_model, c.n_out, c.d_model)
        blocks.mul_(s_in[:, None, None, None] / s_out[None, None, :, None])


class _JumpReLU(torch.autograd.Function):
    """f = h * H(h - t); straight-through: df/dh = H(h - t), df/dt = -(t / eps) K((h - t) / eps)."""

    @staticmethod
    def forward(ctx, h: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(h, t)
        ctx.eps = eps
        return h * (h > t)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, t = ctx.saved_tensors
        kernel = ((h - t).abs() < ctx.eps / 2).to(g.dtype)  # rectangle K((h - t) / eps)
        grad_t = -(t / ctx.eps) * (g * kernel).sum(0)
        return g * (h > t), grad_t, None


class _Step(torch.autograd.Function):
    """H(h - t); gets d/dt = -(1 / eps) K((h - t) / eps) and nothing to h."""

    @staticmethod
    def forward(ctx, h: Tensor, t: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(h, t)
        ctx.eps = eps
        return (h > t).to(h.dtype)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, t = ctx.saved_tensors
        kernel = ((h - t).abs() < ctx.eps / 2).to(g.dtype)
        return None, -(g * kernel).sum(0) / ctx.eps, None


@register("jumprelu_crosscoder")
class JumpReLUCrosscoder(Crosscoder):
    """JumpReLU with a raw fp32 threshold `theta`, used as relu(theta) (log-thresholds froze under Adam)."""

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        self.theta = nn.Parameter(torch.full((c.d_sae,), float(c.jumprelu_init_threshold)))

    def _reset_extra(self) -> None:
        self.theta.fill_(self.config.jumprelu_init_threshold)

    def threshold(self) -> Tensor:
        return F.relu(self.theta)

    def _activate(self, h: Tensor, dec_norms: Tensor) -> _Encoded:
        return _Encoded(acts=_JumpReLU.apply(h, self.threshold(), self.config.jumprelu_bandwidth), pre_acts=h)

    def _sparsity(self, enc: _Encoded, dec_norms: Tensor) -> Tensor:
        c = self.config
        if c.jumprelu_sparsity == "tanh":
            return c.l1_coefficient * torch.tanh(c.jumprelu_tanh_scale * enc.acts * dec_norms).sum(-1).mean()
        l0 = _Step.apply(enc.pre_acts, self.threshold(), c.jumprelu_bandwidth).sum(-1).mean()
        return c.l1_coefficient * l0

    def _extra_losses(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, dead_mask: Tensor | None) -> dict:
        c = self.config
        weights = dec_norms
        if c.jumprelu_pre_act_latents == "none" or (c.jumprelu_pre_act_latents == "dead" and dead_mask is None):
            weights = torch.zeros_like(dec_norms)
        elif c.jumprelu_pre_act_latents == "dead":
            weights = dec_norms * dead_mask.to(dec_norms.dtype)
        # relu(theta - h) * dn summed over latents = a matvec, no [batch, d_sae] product temporary
        pre_act = (F.relu(self.threshold() - enc.pre_acts) @ weights).mean()
        return {"pre_act": c.jumprelu_pre_act_coefficient * pre_act}


@register("topk_crosscoder")
class TopKCrosscoder(Crosscoder):
    """k latents per token, ranked by decoder-scaled activation relu(h) * dn (raw h would drift with the
    decoder's scale); decoded by a sparse gather. No sparsity term; AuxK on dead latents."""

    def _activate(self, h: Tensor, dec_norms: Tensor) -> _Encoded:
        r = F.relu(h)
        idx = (r * dec_norms).topk(self.config.k, dim=-1, sorted=False).indices
        vals = r.gather(-1, idx)
        return _Encoded(acts=torch.zeros_like(r).scatter_(-1, idx, vals), pre_acts=h, idx=idx, vals=vals)

    def _sparsity(self, enc: _Encoded, dec_norms: Tensor) -> Tensor:
        return enc.pre_acts.new_zeros(())

    def _extra_losses(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, dead_mask: Tensor | None) -> dict:
        return {"aux": self._auxk(enc, dec_norms, err, dead_mask)}

    def _auxk(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, dead_mask: Tensor | None) -> Tensor:
        """Dead latents' top k_aux reconstruct the detached residual error (decoded without bias)."""
        n_dead = 0 if dead_mask is None else int(dead_mask.sum())
        if n_dead == 0:
            return enc.pre_acts.new_zeros(())
        k_aux = min(self.config.k_aux, n_dead)
        r = F.relu(enc.pre_acts)
        scores = (r * dec_norms).masked_fill_(~dead_mask, -1.0)  # below any dead latent's score (>= 0)
        idx = scores.topk(k_aux, dim=-1, sorted=False).indices
        e_hat = F.embedding_bag(idx, self.W_dec.flatten(1), per_sample_weights=r.gather(-1, idx), mode="sum")
        aux = (e_hat - err.detach()).pow(2).sum(-1).mean()
        return self.config.aux_coefficient * min(n_dead / self.config.k_aux, 1.0) * aux


@register("batchtopk_crosscoder")
class BatchTopKCrosscoder(TopKCrosscoder):
    """k * batch latents over the whole batch in training; at inference a JumpReLU gate at `threshold`,
    an EMA of the smallest kept decoder-scaled activation (negative until the first training batch)."""

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        self.register_buffer("threshold", torch.tensor(-1.0))

    def _reset_extra(self) -> None:
        self.threshold.fill_(-1.0)

    def _activate(self, h: Tensor, dec_norms: Tensor) -> _Encoded:
        r = F.relu(h)
        scores = r * dec_norms
        if not self.training and self.threshold >= 0:
            return _Encoded(acts=r * (scores > self.threshold), pre_acts=h)
        batch, d_sae = r.shape
        top = scores.flatten().topk(min(self.config.k * batch, scores.numel()), sorted=False)
        flat_idx = top.indices.sort().values  # row-major order: rows become contiguous bags
        vals = r.flatten()[flat_idx]
        if self.training:
            self._update_threshold(top.values)
        rows = torch.div(flat_idx, d_sae, rounding_mode="floor")
        offsets = torch.searchsorted(rows, torch.arange(batch, device=rows.device))
        acts = torch.zeros_like(r).flatten().scatter_(0, flat_idx, vals).view_as(r)
        return _Encoded(acts=acts, pre_acts=h, idx=flat_idx % d_sae, vals=vals, offsets=offsets)

    @torch.no_grad()
    def _update_threshold(self, kept_scores: Tensor) -> None:
        positive = kept_scores[kept_scores > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        m = self.config.batchtopk_threshold_momentum
        self.threshold.copy_(smallest if self.threshold < 0 else m * self.threshold + (1 - m) * smallest)
