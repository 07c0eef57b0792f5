"""The crosscoder: a `PreTrainedModel` with one small base class and an architecture registry.

Shapes (layer axis explicit): W_enc [n_in, d_model, d_sae], b_enc [d_sae], W_dec [d_sae, n_out, d_model],
b_dec [n_out, d_model]. Matmuls use the free flat views W_enc [d_in, d_sae] and W_dec [d_sae, d_out].
Each architecture overrides only what its math changes: `_core` (encode, decode and the sparsity terms,
as fused autograd Functions) and its extra loss terms (`_extra_losses`); `skip_crosscoder` also adds a
linear skip path to the reconstruction.

Speed (bench/, BENCHMARKS.md): the training paths are custom autograd Functions with hand-written
backwards that never build a [batch, d_sae] temporary the math does not need. Scratch [batch, d_sae]
buffers are reused across steps (on CPU each fresh 256 MB tensor costs ~65k page faults, as much as the
arithmetic on it); TopK/BatchTopK rank and gather without autograd, decode with `embedding_bag`, and
have sparse weight gradients (only the selected latents of each token get one).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
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
    fire_counts: Tensor | None = None  # [d_sae] long: tokens of this batch on which each latent fired


@dataclass
class _Encoded:
    """Activations of one batch: dense `acts` [B, d_sae] (the public `feature_acts`), `counts` [d_sae]
    (tokens on which each latent fired), and for TopK/BatchTopK the AuxK selection of dead latents."""

    acts: Tensor
    counts: Tensor
    n_dead: int = 0
    aux: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # (values, token, latent, bag offsets)


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
        if x.shape[0] == 0:  # else a shape error deep inside the encoder
            raise ValueError(f"{name} has no rows (shape {tuple(x.shape)}); pass at least one token's activations.")
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

    def _core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        """(activations, reconstruction [B, d_out] without the skip path, {"sparsity": unscaled term, any
        other term}) of flat inputs x. ReLU: f = relu(h); sparsity = l1_coefficient * mean_b f @ dn."""
        f, recon, l1 = _ReLUCore.apply(x, self.W_enc.flatten(0, 1), self.b_enc, self.W_dec.flatten(1),
                                       self.b_dec.flatten(), dn, _workspace(self))
        enc = _Encoded(acts=f, counts=_fire_counts(f.detach(), _workspace(self).get("grad_h", f)))
        return enc, recon, {"sparsity": self.config.l1_coefficient * l1 / x.shape[0]}

    def encode(self, acts_in: Tensor) -> Tensor:
        """Feature activations [batch, d_sae]."""
        return self._core(self._flat_in(acts_in), self.decoder_norms(), None)[0].acts

    def _decode_flat(self, acts: Tensor) -> Tensor:
        return torch.addmm(self.b_dec.flatten(), acts, self.W_dec.flatten(1))

    def _skip(self, x_flat: Tensor) -> Tensor | None:
        return None

    def decode(self, feature_acts: Tensor, acts_in: Tensor | None = None) -> Tensor:
        """Reconstruction [batch, n_out, d_model] of `feature_acts`; the skip path needs `acts_in`."""
        out = self._decode_flat(feature_acts.to(self.W_dec.dtype))
        if acts_in is not None and (skip := self._skip(self._flat_in(acts_in))) is not None:
            out = out + skip
        return out.view(-1, self.config.n_out, self.config.d_model)

    # ---------------------------------------------------------------- losses
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
        losses.update(self._extra_losses(enc, dec_norms, err, dead_mask))
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


# ---------------------------------------------------------------------------------------------- kernels
class _Workspace:
    """Scratch buffers reused across steps, one per (name, device): only temporaries that never outlive
    the forward or backward that fills them (the backward's dL/dh, TopK's h and scores). Not copied by
    deepcopy/pickle. On CPU a fresh [4096, 16384] fp32 tensor costs ~65k page faults, as much as one
    pass of arithmetic over it; on CUDA the caching allocator already reuses memory and this is neutral."""

    def __init__(self) -> None:
        self._buffers: dict = {}

    def get(self, name: str, like: Tensor, shape=None) -> Tensor:
        shape = torch.Size(like.shape if shape is None else shape)
        key = (name, like.device)
        buf = self._buffers.get(key)
        if buf is None or buf.shape != shape or buf.dtype != like.dtype:
            self._buffers.pop(key, None)  # free the old one before allocating
            buf = self._buffers[key] = torch.empty(shape, dtype=like.dtype, device=like.device)
        return buf

    def __deepcopy__(self, memo) -> _Workspace:
        return _Workspace()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


def _workspace(model: nn.Module) -> _Workspace:
    ws = model.__dict__.get("_workspace")
    if ws is None:
        ws = model.__dict__["_workspace"] = _Workspace()
    return ws


def _rows(batch: int, k: int, device) -> Tensor:
    return torch.arange(batch, device=device).repeat_interleave(k)


def _fire_counts(f: Tensor, scratch: Tensor) -> Tensor:
    """Tokens on which each latent is active (f > 0): a 0/1 mask written into scratch, summed by a
    matvec (count_nonzero(dim=0) is ~7x slower on CPU: it widens a bool copy to int64). Under bf16
    autocast f is bf16: summed in fp32 instead (a bf16 matvec would round counts above 256)."""
    mask = torch.gt(f, 0, out=scratch)
    if f.dtype in (torch.float32, torch.float64):
        with torch.autocast(f.device.type, enabled=False):
            return (f.new_ones(f.shape[0]) @ mask).long()
    return mask.sum(0, dtype=torch.float32).long()


def _mask_relu_grad_(g: Tensor, f: Tensor) -> Tensor:
    """g *= (f > 0), in place."""
    return torch.ops.aten.threshold_backward.grad_input(g, f, 0, grad_input=g)


class _ReLUCore(torch.autograd.Function):
    """f = relu(x W_enc + b_enc); recon = f W_dec + b_dec; l1 = sum over the batch of f @ dn. Backward:
    dL/dh in a reused buffer (the L1 gradient g * dn rides on the decoder-input-gradient matmul as its
    broadcast bias), masked in place; the five dense matmuls and nothing else of size [B, d_sae] but
    one column sum."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, dn, ws):
        f = torch.addmm(b_enc, x, W_enc).relu_()
        recon = torch.addmm(b_dec, f, W_dec)
        col_sum = f.new_ones(f.shape[0]) @ f  # dl1/ddn; l1 = col_sum @ dn
        ctx.save_for_backward(x, W_enc, W_dec, dn, f, col_sum)
        ctx.ws = ws
        ctx.set_materialize_grads(False)
        return f, recon, col_sum @ dn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_recon, g_l1):
        x, W_enc, W_dec, dn, f, col_sum = ctx.saved_tensors
        need, dt = ctx.needs_input_grad, f.dtype  # dt: bf16 when the forward ran under autocast
        x, W_enc, W_dec = x.to(dt), W_enc.to(dt), W_dec.to(dt)
        grad_recon = grad_recon.to(dt) if grad_recon is not None else None
        g = ctx.ws.get("grad_h", f)
        bias = (dn * g_l1 if g_l1 is not None else dn.new_zeros(())).to(dt)
        if grad_recon is not None:
            torch.addmm(bias.expand(f.shape[1]), grad_recon, W_dec.t(), out=g)
        else:
            g.copy_(bias.expand_as(g))
        if grad_f is not None:
            g.add_(grad_f)
        _mask_relu_grad_(g, f)
        return (g @ W_enc.t() if need[0] else None,
                x.t() @ g if need[1] else None,
                g.sum(0) if need[2] else None,
                f.t() @ grad_recon if need[3] and grad_recon is not None else None,
                grad_recon.sum(0) if need[4] and grad_recon is not None else None,
                col_sum * g_l1 if need[5] and g_l1 is not None else None,
                None)


class _JumpReLUCore(torch.autograd.Function):
    """h = x W_enc + b_enc; f = h * H(h - t); recon = f W_dec + b_dec; batch sums l0 = sum H(h - t),
    tanh = sum tanh(c f dn) (when dn_tanh is given), pre = sum relu(t - h) w (when w is given); fire
    counts. Straight-through: df/dh = H(h - t), df/dt = -(t / eps) K, dl0/dt = -(1 / eps) K (nothing
    to h), K = 1 on |h - t| < eps / 2. Besides h and f, one reused [B, d_sae] buffer (dL/dh) and a
    [chunk, d_sae] scratch: the elementwise terms run over chunks of rows."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, t, W_dec, b_dec, dn_tanh, w, eps, c, ws):
        h = torch.addmm(b_enc, x, W_enc)
        f = torch.gt(h, t, out=torch.empty_like(h)).mul_(h)
        recon = torch.addmm(b_dec, f, W_dec)
        counts = _fire_counts(f, ws.get("grad_h", h))  # t = relu(theta) >= 0: f > 0 exactly where h > t
        l0 = counts.sum().to(h.dtype)
        tanh = pre = h.new_zeros(())
        for rows, tmp in _row_chunks(h, ws):
            if dn_tanh is not None:
                tanh = tanh + torch.mul(f[rows], dn_tanh * c, out=tmp).tanh_().sum()
            if w is not None:
                pre = pre + (torch.sub(t, h[rows], out=tmp).relu_() @ w).sum()
        ctx.save_for_backward(x, W_enc, t, W_dec, dn_tanh, w, h, f)
        ctx.eps, ctx.c, ctx.ws = eps, c, ws
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(counts)
        return f, recon, l0, tanh, pre, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_recon, g_l0, g_tanh, g_pre, _):
        x, W_enc, t, W_dec, dn_tanh, w, h, f = ctx.saved_tensors
        eps, c, need, dt = ctx.eps, ctx.c, ctx.needs_input_grad, h.dtype  # dt: bf16 under autocast
        x, W_enc, W_dec = x.to(dt), W_enc.to(dt), W_dec.to(dt)
        grad_recon = grad_recon.to(dt) if grad_recon is not None else None
        g = ctx.ws.get("grad_h", h)  # dL/df, then dL/dh
        if grad_recon is not None:
            torch.mm(grad_recon, W_dec.t(), out=g)
        else:
            g.zero_()
        if grad_f is not None:
            g.add_(grad_f)
        tanh = dn_tanh is not None and g_tanh is not None
        pre = w is not None and g_pre is not None
        cd = dn_tanh * c if tanh else None
        k_sum, kg_sum, zero = torch.zeros_like(t), torch.zeros_like(t), torch.zeros_like(t)
        grad_dn_tanh, grad_w, below_sum = (zero.clone() if tanh else None), (zero.clone() if pre else None), zero.clone()
        for rows, tmp in _row_chunks(h, ctx.ws):
            g_r, h_r, f_r = g[rows], h[rows], f[rows]
            if tanh:  # d tanh(c f dn) = c (1 - T^2) (dn df + f ddn)
                torch.mul(f_r, cd, out=tmp).tanh_()
                torch.addcmul(torch.ones((), dtype=h.dtype, device=h.device), tmp, tmp, value=-1, out=tmp)
                g_r.addcmul_(tmp, cd * g_tanh)
                grad_dn_tanh += tmp.mul_(f_r).sum(0, dtype=t.dtype)
            kernel = torch.lt(torch.sub(h_r, t, out=tmp).abs_(), eps / 2, out=tmp)
            k_sum += kernel.sum(0, dtype=t.dtype)
            kg_sum += kernel.mul_(g_r).sum(0, dtype=t.dtype)
            _mask_relu_grad_(g_r, f_r)  # H(h - t): f > 0 exactly there
            if pre:  # d relu(t - h) = H(t - h) (dt - dh)
                grad_w += torch.sub(t, h_r, out=tmp).relu_().sum(0, dtype=t.dtype)
                below = torch.gt(t, h_r, out=tmp)
                below_sum += below.sum(0, dtype=t.dtype)
                g_r.addcmul_(below, w * -g_pre)
        grad_t = (k_sum * g_l0 if g_l0 is not None else zero).add_(kg_sum * t).mul_(-1 / eps)
        if pre:
            grad_t += below_sum * w * g_pre
            grad_w *= g_pre
        if tanh:
            grad_dn_tanh *= c * g_tanh
        return (g @ W_enc.t() if need[0] else None,
                x.t() @ g if need[1] else None,
                g.sum(0) if need[2] else None,
                grad_t if need[3] else None,
                f.t() @ grad_recon if need[4] and grad_recon is not None else None,
                grad_recon.sum(0) if need[5] and grad_recon is not None else None,
                grad_dn_tanh, grad_w, None, None, None)


def _row_chunks(h: Tensor, ws: _Workspace):
    """(row slice, [rows, d_sae] scratch) over h in chunks of about 32 MiB."""
    chunk = _chunk_rows(*h.shape)
    buf = ws.get("chunk", h, (chunk, h.shape[1]))
    for i in range(0, h.shape[0], chunk):
        n = min(chunk, h.shape[0] - i)
        yield slice(i, i + n), buf[:n]


def _sparse(rows: Tensor, cols: Tensor, values: Tensor, shape) -> Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False)


def _csr(tok: Tensor, lat: Tensor, values: Tensor, offsets: Tensor, shape) -> Tensor:
    """The selected (token, latent) pairs as a CSR pattern; pairs are grouped by token, bags start at offsets."""
    crow = torch.cat([offsets, offsets.new_full((1,), lat.numel())])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, lat, values, shape, check_invariants=False)


class _GatheredPreActs(torch.autograd.Function):
    """h[tok, lat] = x[tok] . W_enc[:, lat] + b_enc[lat] for the selected pairs only (a sampled matmul).
    Sparse backward: dW_enc[:, lat] += x[tok] g as one sparse [d_sae, B] x dense [B, d_in] matmul (not a
    dense [d_in, B] x [B, d_sae] one), db_enc[lat] += g."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, tok, lat, offsets):
        ctx.save_for_backward(x, W_enc, tok, lat)
        pattern = _csr(tok, lat, b_enc[lat], offsets, (x.shape[0], W_enc.shape[1]))
        return torch.sparse.sampled_addmm(pattern, x, W_enc).values()

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, W_enc, tok, lat = ctx.saved_tensors
        (batch, _), d_sae = x.shape, W_enc.shape[1]
        need = ctx.needs_input_grad
        return (torch.sparse.mm(_sparse(tok, lat, g, (batch, d_sae)), W_enc.t()) if need[0] else None,
                torch.sparse.mm(_sparse(lat, tok, g, (d_sae, batch)), x).t().contiguous() if need[1] else None,
                g.new_zeros(d_sae).index_add_(0, lat, g) if need[2] else None,
                None, None, None)


class _SparseDecode(torch.autograd.Function):
    """Sum over each token's selected latents of vals * W_dec[lat] (embedding_bag; bags = tokens, in
    order, starting at `offsets`). Sparse backward: dW_dec = a sparse [d_sae, B] x dense [B, d_out]
    matmul; dvals = grad[tok] . W_dec[lat] at the selected pairs only (sampled_addmm)."""

    @staticmethod
    def forward(ctx, vals, W_dec, tok, lat, offsets):
        vals = vals.to(W_dec.dtype)  # the inference gate's AuxK gathers bf16 pre-activations under autocast
        ctx.save_for_backward(vals, W_dec, tok, lat, offsets)
        return F.embedding_bag(lat, W_dec, offsets, per_sample_weights=vals, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        vals, W_dec, tok, lat, offsets = ctx.saved_tensors
        batch, d_sae = g.shape[0], W_dec.shape[0]
        grad_vals = grad_W = None
        if ctx.needs_input_grad[1]:
            grad_W = torch.sparse.mm(_sparse(lat, tok, vals, (d_sae, batch)), g)
        if ctx.needs_input_grad[0]:
            pattern = _csr(tok, lat, vals, offsets, (batch, d_sae))
            grad_vals = torch.sparse.sampled_addmm(pattern, g, W_dec.t(), beta=0).values()
        return grad_vals, grad_W, None, None, None


def _chunk_rows(batch: int, d_sae: int) -> int:
    """Rows per chunk of the TopK ranking pass: a [chunk, d_sae] scratch buffer of about 32 MiB."""
    return max(1, min(batch, _CHUNK_ELEMENTS // d_sae))


_CHUNK_ELEMENTS = 1 << 23


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


@register("jumprelu_crosscoder")
class JumpReLUCrosscoder(Crosscoder):
    """JumpReLU with a raw fp32 threshold `theta`, used as relu(theta) (log-thresholds froze under Adam)."""

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        self.theta = nn.Parameter(torch.full((c.d_sae,), float(c.jumprelu_init_threshold)))

    def _reset_extra(self) -> None:
        self.theta.fill_(self.config.jumprelu_init_threshold)

    def threshold(self) -> Tensor:
        return F.relu(self.theta)

    def _core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        """f = h * H(h - relu(theta)); sparsity "step" = l1_coefficient * mean_b sum_s H(h - t), "tanh" =
        l1_coefficient * mean_b sum_s tanh(c f dn); pre_act = coefficient * mean_b relu(t - h) @ w with w = dn
        on all or on dead latents (skipped, exactly 0, when no latent is dead)."""
        c = self.config
        w = None
        if c.jumprelu_pre_act_latents == "all":
            w = dn
        elif c.jumprelu_pre_act_latents == "dead" and dead_mask is not None and bool(dead_mask.any()):
            w = dn * dead_mask.to(dn.dtype)
        dn_tanh = dn if c.jumprelu_sparsity == "tanh" else None
        f, recon, l0, tanh, pre, counts = _JumpReLUCore.apply(
            x, self.W_enc.flatten(0, 1), self.b_enc, self.threshold(), self.W_dec.flatten(1), self.b_dec.flatten(),
            dn_tanh, w, float(c.jumprelu_bandwidth), float(c.jumprelu_tanh_scale), _workspace(self))
        batch = x.shape[0]
        terms = {"sparsity": c.l1_coefficient * (tanh if dn_tanh is not None else l0) / batch,
                 "pre_act": c.jumprelu_pre_act_coefficient * pre / batch}
        return _Encoded(acts=f, counts=counts), recon, terms


@register("topk_crosscoder")
class TopKCrosscoder(Crosscoder):
    """k latents per token, ranked by decoder-scaled activation relu(h) * dn (raw h would drift with the
    decoder's scale), or by raw h with topk_ranking='pre_activation'; decoded by a sparse gather. No
    sparsity term; AuxK on dead latents."""

    def rank_scale(self, dn: Tensor) -> Tensor:
        """Per-latent factor of the ranking score relu(h) * factor: the decoder norms ('decoder_scaled'), or
        ones ('pre_activation': raw h, as SAELens with rescale_acts_by_decoder_norm=False and sparsify)."""
        return dn if self.config.topk_ranking == "decoder_scaled" else torch.ones_like(dn)

    def _select_rows(self, scores: Tensor):
        """This chunk of rows' part of the selection: the k best latents of each row."""
        return scores.topk(self.config.k, dim=-1, sorted=False).indices

    def _select(self, parts: list, x: Tensor, W_s: Tensor, b_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(token, latent, bag offsets) of the selected pairs, grouped by token."""
        batch, k = x.shape[0], self.config.k
        return _rows(batch, k, x.device), torch.cat(parts).flatten(), torch.arange(0, batch * k, k, device=x.device)

    def _gated(self) -> bool:
        return False

    def _core(self, x: Tensor, dn: Tensor, dead_mask: Tensor | None) -> tuple[_Encoded, Tensor, dict]:
        """Rank by relu(h) * dn = relu(x (W_enc dn) + b_enc dn) (dn >= 0), in chunks of rows into one small
        reused buffer, without autograd; the selected pre-activations come from a sampled matmul (sparse
        backward) and decode with embedding_bag (sparse backward). Ranking raw scores picks the same
        winners as ranking relu'd ones: a loser's value relu(h) is 0 either way. No [B, d_sae] tensor but
        the dense feature_acts output."""
        c, dev = self.config, x.device
        batch, W_enc, W_dec = x.shape[0], self.W_enc.flatten(0, 1), self.W_dec.flatten(1)
        dn = self.rank_scale(dn)
        n_dead = 0 if dead_mask is None else int(dead_mask.sum())
        k_aux = min(c.k_aux, n_dead)
        aux_parts = []
        if self._gated():  # BatchTopK at inference: a dense JumpReLU gate on relu(h) * dn
            h = torch.addmm(self.b_enc, x, W_enc)
            r = F.relu(h)
            scores = r.detach() * dn.detach()
            acts = r * (scores > self.threshold)
            recon = self._decode_flat(acts)
            enc = _Encoded(acts=acts, counts=_fire_counts(acts.detach(), torch.empty_like(scores)))
            if k_aux > 0:
                aux_parts.append(scores.masked_fill_(~dead_mask, -math.inf).topk(k_aux, dim=-1, sorted=False).indices)
        else:
            with torch.no_grad():
                W_s, b_s = W_enc * dn, self.b_enc * dn
                chunk = _chunk_rows(batch, c.d_sae)
                buf = _workspace(self).get("scores", x, (chunk, c.d_sae))
                parts = []
                for i in range(0, batch, chunk):
                    scores = torch.addmm(b_s, x[i:i + chunk], W_s, out=buf[:min(chunk, batch - i)])
                    parts.append(self._select_rows(scores))
                    if k_aux > 0:  # AuxK: the dead latents' top k_aux by the same score
                        aux_parts.append(scores.masked_fill_(~dead_mask, -math.inf).topk(k_aux, dim=-1, sorted=False).indices)
                tok, lat, offsets = self._select(parts, x, W_s, b_s)
            vals = F.relu(_GatheredPreActs.apply(x, W_enc, self.b_enc, tok, lat, offsets))
            acts = torch.zeros((batch, c.d_sae), dtype=x.dtype, device=dev).index_put_((tok, lat), vals)
            recon = _SparseDecode.apply(vals, W_dec, tok, lat, offsets) + self.b_dec.flatten()
            with torch.no_grad():
                enc = _Encoded(acts=acts, counts=torch.bincount(lat[vals > 0], minlength=c.d_sae))
        enc.n_dead = n_dead
        if k_aux > 0:  # -inf keeps live latents out; a dead one picked with a negative score has value 0
            lat_a, tok_a = torch.cat(aux_parts).flatten(), _rows(batch, k_aux, dev)
            offsets_a = torch.arange(0, batch * k_aux, k_aux, device=dev)
            pre = h[tok_a, lat_a] if self._gated() else _GatheredPreActs.apply(x, W_enc, self.b_enc, tok_a, lat_a, offsets_a)
            enc.aux = (F.relu(pre), tok_a, lat_a, offsets_a)
        return enc, recon, {"sparsity": x.new_zeros(())}

    def _extra_losses(self, enc: _Encoded, dec_norms: Tensor, err: Tensor, dead_mask: Tensor | None) -> dict:
        return {"aux": self._auxk(enc, err)}

    def _auxk(self, enc: _Encoded, err: Tensor) -> Tensor:
        """Dead latents' top k_aux reconstruct the detached residual error (decoded without bias)."""
        if enc.aux is None:
            return err.new_zeros(())
        e_hat = _SparseDecode.apply(enc.aux[0], self.W_dec.flatten(1), *enc.aux[1:])
        aux = (e_hat - err.detach()).pow(2).sum(-1).mean()
        return self.config.aux_coefficient * min(enc.n_dead / self.config.k_aux, 1.0) * aux


@register("batchtopk_crosscoder")
class BatchTopKCrosscoder(TopKCrosscoder):
    """k * batch latents over the whole batch in training; at inference a JumpReLU gate at `threshold`,
    an EMA of the smallest kept decoder-scaled activation (negative until the first training batch)."""

    def _add_parameters(self, c: CrosscoderConfig) -> None:
        self.register_buffer("threshold", torch.tensor(-1.0))

    def _reset_extra(self) -> None:
        self.threshold.fill_(-1.0)

    def _gated(self) -> bool:
        return not self.training and bool(self.threshold >= 0)

    def _select_rows(self, scores: Tensor):
        """Candidates: each row's 4k best (an exact pre-selection unless a row holds more winners)."""
        return scores.topk(min(scores.shape[1], 4 * self.config.k), dim=-1, sorted=False)

    def _select(self, parts: list, x: Tensor, W_s: Tensor, b_s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The k * batch best scores of the whole batch, exactly: from the rows' candidates when no row's
        smallest positive candidate beats the k * batch-th best (so no unseen score can), otherwise from all
        scores (recomputed). Grouped by token (ascending flat index)."""
        (batch, d_sae), k_total = (x.shape[0], W_s.shape[1]), min(self.config.k * x.shape[0], x.shape[0] * W_s.shape[1])
        values, indices = torch.cat([p.values for p in parts]), torch.cat([p.indices for p in parts])
        per_row = values.shape[1]
        top = values.flatten().topk(k_total, sorted=False)
        floor = values.min(-1).values  # every unseen score of a row is <= its floor
        if per_row == d_sae or bool(((floor < top.values.min()) | (floor <= 0)).all()):
            flat = torch.div(top.indices, per_row, rounding_mode="floor") * d_sae + indices.flatten()[top.indices]
        else:
            top = torch.addmm(b_s, x, W_s).flatten().topk(k_total, sorted=False)
            flat = top.indices
        order = flat.argsort()
        flat, kept = flat[order], top.values[order]
        if self.training:
            self._update_threshold(kept)
        tok = torch.div(flat, d_sae, rounding_mode="floor")
        return tok, flat % d_sae, torch.searchsorted(tok, torch.arange(batch, device=x.device))

    @torch.no_grad()
    def _update_threshold(self, kept_scores: Tensor) -> None:
        positive = kept_scores[kept_scores > 0]
        if positive.numel() == 0:
            return
        smallest = positive.min().to(self.threshold.dtype)
        m = self.config.batchtopk_threshold_momentum
        self.threshold.copy_(smallest if self.threshold < 0 else m * self.threshold + (1 - m) * smallest)
