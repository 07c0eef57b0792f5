"""The crosscoder's fused training kernels: autograd Functions with hand-written backward passes.

Every Function works on *blocks* (`Block`): a group of latents with the input columns it reads and the
output columns it writes, and views of its encoder [d_in_g, G] and decoder [G, d_out_g] weights. A dense
crosscoder is one block (all inputs -> all latents -> all outputs); a layer structure (structures.py)
splits the latents into groups, e.g. a cross-layer transcoder's group i reads input hook i and writes
output hooks i..L-1. The blocks tile the weight tensors exactly (no structural zeros), so gradients are
written block by block into one tensor per parameter.

Speed (bench/, BENCHMARKS.md): nothing of size [batch, d_sae] is built that the math does not need.
Scratch [batch, d_sae] buffers are reused across steps (`Workspace`: on CPU each fresh 256 MB tensor costs
~65k page faults, as much as the arithmetic on it); TopK families rank and gather without autograd, decode
with `embedding_bag` and get sparse weight gradients (only the selected latents of each token get one).
Under bf16 autocast the dense matmuls run in bf16 and each backward computes in the forward's dtype.

Gradient references that share no code with this module: tests/test_kernels.py.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

CHUNK_ELEMENTS = 1 << 23  # elementwise passes over [batch, d_sae] run in row chunks of ~32 MiB (fp32)


@dataclass(frozen=True)
class Block:
    """A group of latents as the kernels see it: latent columns of h / f, input columns of the flat x,
    output columns of the flat reconstruction, and views of its weights: W_enc [d_in_g, G], W_dec [G, d_out_g]."""

    latents: slice
    inputs: slice
    outputs: slice
    W_enc: Tensor
    W_dec: Tensor


class _Everything:
    latents = inputs = outputs = slice(None)


class WholeLayout:
    """The layout of plain 2D weights (W_enc [d_in, d_sae], W_dec [d_sae, d_out]): one block of everything,
    for calling the kernels outside a Crosscoder (benchmarks, tests)."""

    groups = (_Everything(),)

    @staticmethod
    def encoder_views(W_enc: Tensor) -> list[Tensor]:
        return [W_enc]

    @staticmethod
    def decoder_views(W_dec: Tensor) -> list[Tensor]:
        return [W_dec]


def is_whole(blocks: list[Block]) -> bool:
    """One block reading and writing everything (a dense crosscoder): the plain-matmul fast path."""
    return len(blocks) == 1 and blocks[0].latents == slice(None) and blocks[0].outputs == slice(None)


# ---------------------------------------------------------------------------------------------- scratch
class Workspace:
    """Scratch buffers reused across steps, one per (name, device): only temporaries that never outlive
    the forward or backward that fills them (the backward's dL/dh, TopK's scores). Not copied by
    deepcopy/pickle. On CUDA the caching allocator already reuses memory and this is neutral."""

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

    def __deepcopy__(self, memo) -> Workspace:
        return Workspace()

    def __getstate__(self) -> dict:
        return {"_buffers": {}}


def workspace(model: nn.Module) -> Workspace:
    """The model's workspace (kept out of its state and parameters)."""
    ws = model.__dict__.get("_workspace")
    if ws is None:
        ws = model.__dict__["_workspace"] = Workspace()
    return ws


def chunk_rows(batch: int, d_sae: int) -> int:
    """Rows per chunk of an elementwise pass: a [chunk, d_sae] scratch buffer of about 32 MiB."""
    return max(1, min(batch, CHUNK_ELEMENTS // d_sae))


def row_chunks(h: Tensor, ws: Workspace):
    """(row slice, [rows, d_sae] scratch) over h in chunks of about 32 MiB."""
    chunk = chunk_rows(*h.shape)
    buf = ws.get("chunk", h, (chunk, h.shape[1]))
    for i in range(0, h.shape[0], chunk):
        n = min(chunk, h.shape[0] - i)
        yield slice(i, i + n), buf[:n]


def fire_counts(f: Tensor, scratch: Tensor) -> Tensor:
    """Tokens on which each latent is active (f > 0): a 0/1 mask written into scratch, summed by a
    matvec (count_nonzero(dim=0) is ~7x slower on CPU: it widens a bool copy to int64). Under bf16
    autocast f is bf16: summed in fp32 instead (a bf16 matvec would round counts above 256)."""
    mask = torch.gt(f, 0, out=scratch)
    if f.dtype in (torch.float32, torch.float64):
        with torch.autocast(f.device.type, enabled=False):
            return (f.new_ones(f.shape[0]) @ mask).long()
    return mask.sum(0, dtype=torch.float32).long()


def mask_relu_grad_(g: Tensor, f: Tensor) -> Tensor:
    """g *= (f > 0), in place."""
    return torch.ops.aten.threshold_backward.grad_input(g, f, 0, grad_input=g)


def host_reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor value on the host (bool(), int(), .item()) costs nothing: on CPU it does
    not wait for anything, so data-dependent shortcuts pay; on an accelerator it stalls the step, so the
    code takes the branch-free path there."""
    return device.type == "cpu"


def token_rows(batch: int, k: int, device) -> Tensor:
    """0, 0, ..., 1, 1, ...: the token of each of k selected latents per token."""
    return torch.arange(batch, device=device).repeat_interleave(k)


# ---------------------------------------------------------------------------------------------- dense block matmuls
def encode(x: Tensor, b_enc: Tensor, blocks: list[Block]) -> Tensor:
    """h [B, d_sae] = per block x[:, inputs] @ W_enc_g + b_enc[latents]."""
    if is_whole(blocks):
        return torch.addmm(b_enc, x[:, blocks[0].inputs], blocks[0].W_enc)
    h = None
    for blk in blocks:
        part = torch.addmm(b_enc[blk.latents], x[:, blk.inputs], blk.W_enc)
        if h is None:
            h = part.new_empty(x.shape[0], b_enc.shape[0])
        h[:, blk.latents] = part
    return h


def decode(f: Tensor, b_dec: Tensor, blocks: list[Block]) -> Tensor:
    """recon [B, d_out] = b_dec + sum over blocks of f[:, latents] @ W_dec_g into the block's outputs."""
    if is_whole(blocks):
        return torch.addmm(b_dec, f, blocks[0].W_dec)
    out = None
    for blk in blocks:
        part = torch.mm(f[:, blk.latents], blk.W_dec)  # under autocast: bf16, like the whole-block addmm
        if out is None:
            out = b_dec.to(part.dtype).expand(f.shape[0], -1).clone()
        out[:, blk.outputs] += part
    return out


def decode_grad_input(grad_recon: Tensor, blocks: list[Block], bias: Tensor, out: Tensor) -> Tensor:
    """out [B, d_sae] = dL/df = grad_recon @ W_dec^T per block, plus a per-latent `bias` ([d_sae] or a scalar
    broadcast) that rides on the matmul (the L1 term's dn * g_l1)."""
    bias = bias.expand(out.shape[1])
    for blk in blocks:
        torch.addmm(bias[blk.latents], grad_recon[:, blk.outputs], blk.W_dec.t(), out=out[:, blk.latents])
    return out


def blocks(layout, W_enc: Tensor, W_dec: Tensor) -> list[Block]:
    """The layout's groups with views of these weights (`layout`: a structures.LayerStructure, duck-typed:
    `groups` with latents / inputs / outputs slices, `encoder_views(W_enc)`, `decoder_views(W_dec)`)."""
    return [Block(g.latents, g.inputs, g.outputs, e, d) for g, e, d in
            zip(layout.groups, layout.encoder_views(W_enc), layout.decoder_views(W_dec))]


def encoder_weight_grad(layout, x: Tensor, g: Tensor, like: Tensor) -> Tensor:
    """dL/dW_enc: per group x[:, inputs]^T @ g[:, latents], written into that group's view of one tensor
    shaped like the parameter (the views tile it, so every entry is written)."""
    grad = torch.empty_like(like, dtype=g.dtype)
    for grp, view in zip(layout.groups, layout.encoder_views(grad)):
        torch.mm(x[:, grp.inputs].t(), g[:, grp.latents], out=view)
    return grad


def decoder_weight_grad(layout, f: Tensor, grad_recon: Tensor, like: Tensor) -> Tensor:
    """dL/dW_dec: per group f[:, latents]^T @ grad_recon[:, outputs], into that group's view."""
    grad = torch.empty_like(like, dtype=grad_recon.dtype)
    for grp, view in zip(layout.groups, layout.decoder_views(grad)):
        torch.mm(f[:, grp.latents].t(), grad_recon[:, grp.outputs], out=view)
    return grad


def input_grad(layout, g: Tensor, W_enc: Tensor, n_inputs: int) -> Tensor:
    """dL/dx (only when a caller asks for it: activations are data): per group g[:, latents] @ W_enc_g^T."""
    grad = g.new_zeros(g.shape[0], n_inputs)
    for grp, view in zip(layout.groups, layout.encoder_views(W_enc)):
        grad[:, grp.inputs] += g[:, grp.latents] @ view.t()
    return grad


# ---------------------------------------------------------------------------------------------- ReLU
class ReLUCore(torch.autograd.Function):
    """f = relu(x W_enc + b_enc); recon = f W_dec + b_dec; l1 = sum over the batch of f @ dn.

    Backward: dL/dh in a reused buffer (the L1 gradient g_l1 * dn rides on the decoder-input-gradient
    matmul as its broadcast bias), masked in place; the five dense matmuls and nothing else of size
    [B, d_sae] but one column sum."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, W_dec, b_dec, dn, layout, ws):
        parts = blocks(layout, W_enc, W_dec)
        f = encode(x, b_enc, parts).relu_()
        recon = decode(f, b_dec, parts)
        col_sum = f.new_ones(f.shape[0]) @ f  # dl1/ddn; l1 = col_sum @ dn
        ctx.save_for_backward(x, W_enc, W_dec, dn, f, col_sum)
        ctx.layout, ctx.ws = layout, ws
        ctx.set_materialize_grads(False)
        return f, recon, col_sum @ dn

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_recon, g_l1):
        x, W_enc, W_dec, dn, f, col_sum = ctx.saved_tensors
        layout, need, dt = ctx.layout, ctx.needs_input_grad, f.dtype  # dt: bf16 when the forward ran under autocast
        x, W_enc, W_dec = x.to(dt), W_enc.to(dt), W_dec.to(dt)
        grad_recon = grad_recon.to(dt) if grad_recon is not None else None
        # dL/df = grad_recon @ W_dec^T + g_l1 * dn (+ grad_f), then dL/dh = dL/df * (f > 0)
        g = ctx.ws.get("grad_h", f)
        bias = (dn * g_l1 if g_l1 is not None else dn.new_zeros(())).to(dt)
        if grad_recon is not None:
            decode_grad_input(grad_recon, blocks(layout, W_enc, W_dec), bias, out=g)
        else:
            g.copy_(bias.expand_as(g))
        if grad_f is not None:
            g.add_(grad_f)
        mask_relu_grad_(g, f)
        return (input_grad(layout, g, W_enc, x.shape[1]) if need[0] else None,
                # encoder: dW_enc = x^T dL/dh, db_enc = sum_b dL/dh
                encoder_weight_grad(layout, x, g, W_enc) if need[1] else None,
                g.sum(0) if need[2] else None,
                # decoder: dW_dec = f^T grad_recon, db_dec = sum_b grad_recon
                decoder_weight_grad(layout, f, grad_recon, W_dec) if need[3] and grad_recon is not None else None,
                grad_recon.sum(0) if need[4] and grad_recon is not None else None,
                # decoder norms: dl1/ddn = sum_b f (autograd carries it on to W_dec)
                col_sum * g_l1 if need[5] and g_l1 is not None else None,
                None, None)


# ---------------------------------------------------------------------------------------------- JumpReLU
class JumpReLUCore(torch.autograd.Function):
    """h = x W_enc + b_enc; f = h * H(h - t); recon = f W_dec + b_dec; batch sums l0 = sum H(h - t),
    tanh = sum tanh(c f dn) (when dn_tanh is given), pre = sum relu(t - h) w (when w is given); fire
    counts. Straight-through: df/dh = H(h - t), df/dt = -(t / eps) K, dl0/dt = -(1 / eps) K (nothing
    to h), K = 1 on |h - t| < eps / 2. Besides h and f, one reused [B, d_sae] buffer (dL/dh) and a
    [chunk, d_sae] scratch: the elementwise terms run over chunks of rows."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, t, W_dec, b_dec, dn_tanh, w, eps, c, layout, ws):
        parts = blocks(layout, W_enc, W_dec)
        h = encode(x, b_enc, parts)
        f = torch.gt(h, t, out=torch.empty_like(h)).mul_(h)
        recon = decode(f, b_dec, parts)
        counts = fire_counts(f, ws.get("grad_h", h))  # t = relu(theta) >= 0: f > 0 exactly where h > t
        l0 = counts.sum().to(h.dtype)
        tanh = pre = h.new_zeros(())
        for rows, tmp in row_chunks(h, ws):
            if dn_tanh is not None:
                tanh = tanh + torch.mul(f[rows], dn_tanh * c, out=tmp).tanh_().sum()
            if w is not None:
                pre = pre + (torch.sub(t, h[rows], out=tmp).relu_() @ w).sum()
        ctx.save_for_backward(x, W_enc, t, W_dec, dn_tanh, w, h, f)
        ctx.eps, ctx.c, ctx.layout, ctx.ws = eps, c, layout, ws
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(counts)
        return f, recon, l0, tanh, pre, counts

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_f, grad_recon, g_l0, g_tanh, g_pre, _):
        x, W_enc, t, W_dec, dn_tanh, w, h, f = ctx.saved_tensors
        layout, need, dt = ctx.layout, ctx.needs_input_grad, h.dtype  # dt: bf16 under autocast
        x, W_enc, W_dec = x.to(dt), W_enc.to(dt), W_dec.to(dt)
        grad_recon = grad_recon.to(dt) if grad_recon is not None else None
        g = ctx.ws.get("grad_h", h)  # dL/df (reconstruction and grad_f), then dL/dh
        if grad_recon is not None:
            decode_grad_input(grad_recon, blocks(layout, W_enc, W_dec), h.new_zeros(()), out=g)
        else:
            g.zero_()
        if grad_f is not None:
            g.add_(grad_f)
        grad_t, grad_dn_tanh, grad_w = _jumprelu_elementwise_grads(ctx, g, h, f, t, dn_tanh, w, g_l0, g_tanh, g_pre)
        return (input_grad(layout, g, W_enc, x.shape[1]) if need[0] else None,
                # encoder: dW_enc = x^T dL/dh, db_enc = sum_b dL/dh
                encoder_weight_grad(layout, x, g, W_enc) if need[1] else None,
                g.sum(0) if need[2] else None,
                grad_t if need[3] else None,
                # decoder: dW_dec = f^T grad_recon, db_dec = sum_b grad_recon
                decoder_weight_grad(layout, f, grad_recon, W_dec) if need[4] and grad_recon is not None else None,
                grad_recon.sum(0) if need[5] and grad_recon is not None else None,
                grad_dn_tanh, grad_w, None, None, None, None)


def _jumprelu_elementwise_grads(ctx, g, h, f, t, dn_tanh, w, g_l0, g_tanh, g_pre):
    """Turn g = dL/df into dL/dh in place (adding the tanh and pre-activation terms' own dL/dh) and
    return (dL/dt, dL/d dn_tanh, dL/dw), over chunks of rows."""
    eps, c = ctx.eps, ctx.c
    tanh = dn_tanh is not None and g_tanh is not None
    pre = w is not None and g_pre is not None
    cd = dn_tanh * c if tanh else None
    k_sum, kg_sum, zero = torch.zeros_like(t), torch.zeros_like(t), torch.zeros_like(t)
    grad_dn_tanh, grad_w, below_sum = (zero.clone() if tanh else None), (zero.clone() if pre else None), zero.clone()
    for rows, tmp in row_chunks(h, ctx.ws):
        g_r, h_r, f_r = g[rows], h[rows], f[rows]
        if tanh:  # tanh penalty: d tanh(c f dn) = c (1 - T^2) (dn df + f ddn)
            torch.mul(f_r, cd, out=tmp).tanh_()
            torch.addcmul(torch.ones((), dtype=h.dtype, device=h.device), tmp, tmp, value=-1, out=tmp)
            g_r.addcmul_(tmp, cd * g_tanh)
            grad_dn_tanh += tmp.mul_(f_r).sum(0, dtype=t.dtype)
        # threshold, straight-through: the kernel K = 1 on |h - t| < eps / 2 carries dL/df * (-t / eps) and
        # the L0 term's -1 / eps
        kernel = torch.lt(torch.sub(h_r, t, out=tmp).abs_(), eps / 2, out=tmp)
        k_sum += kernel.sum(0, dtype=t.dtype)
        kg_sum += kernel.mul_(g_r).sum(0, dtype=t.dtype)
        mask_relu_grad_(g_r, f_r)  # pre-activation: df/dh = H(h - t), and f > 0 exactly there
        if pre:  # pre-activation loss: d relu(t - h) w = H(t - h) w (dt - dh), and relu(t - h) to w
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
    return grad_t, grad_dn_tanh, grad_w


# ---------------------------------------------------------------------------------------------- sparse (TopK families)
@dataclass
class Selection:
    """The (token, latent) pairs one group selected, grouped by token: bag i = pairs offsets[i]..offsets[i+1]
    (the last bag ends at len(lat)); `lat` counts within the group."""

    tok: Tensor
    lat: Tensor
    offsets: Tensor

    def __len__(self) -> int:
        return self.lat.numel()


def _sparse(rows: Tensor, cols: Tensor, values: Tensor, shape) -> Tensor:
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), values, shape, check_invariants=False)


def _sparse_mm(sparse: Tensor, dense: Tensor) -> Tensor:
    """sparse @ dense in the operands' dtype, also when a backward runs inside autocast (which would cast
    to bf16, for which CPU has no CSR matmul)."""
    with torch.autocast(dense.device.type, enabled=False):
        return torch.sparse.mm(sparse, dense)


def _by_latent(sel: Selection, values: Tensor, n_latents: int, n_tokens: int) -> Tensor:
    """The selected pairs as a CSR matrix [latents, tokens] (rows sorted by a stable argsort, row starts by
    searchsorted): the weight gradients' sparse operand. A COO matrix would be coalesced, which waits for
    the device on CUDA and is ~1.8x slower on CPU (bench: 0.23 vs 0.13 s at 4096 x 32 pairs, d 1536)."""
    order = sel.lat.argsort(stable=True)
    rows = sel.lat[order]
    crow = torch.searchsorted(rows, torch.arange(n_latents + 1, device=rows.device, dtype=rows.dtype))
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, sel.tok[order], values[order], (n_latents, n_tokens),
                                       check_invariants=False)


def _csr(sel: Selection, values: Tensor, shape) -> Tensor:
    """The selected pairs as a CSR pattern [tokens, latents]."""
    crow = torch.cat([sel.offsets, sel.offsets.new_full((1,), len(sel))])
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(crow, sel.lat, values, shape, check_invariants=False)


def _split(values: Tensor, selections: list[Selection]) -> list[Tensor]:
    return list(values.split([len(s) for s in selections]))


class GatheredPreActs(torch.autograd.Function):
    """h[tok, lat] = x[tok, inputs] . W_enc_g[:, lat] + b_enc[lat] for each group's selected pairs only (a
    sampled matmul), concatenated over groups. Sparse backward: dW_enc_g[:, lat] += x[tok] g as one sparse
    [G, B] x dense [B, d_in_g] matmul (not a dense [d_in_g, B] x [B, G] one), db_enc[lat] += g."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, layout, selections):
        ctx.save_for_backward(x, W_enc)
        ctx.layout, ctx.selections, ctx.d_sae = layout, selections, b_enc.shape[0]
        out = []
        for grp, W_g, sel in zip(layout.groups, layout.encoder_views(W_enc), selections):
            pattern = _csr(sel, b_enc[grp.latents][sel.lat], (x.shape[0], W_g.shape[1]))
            out.append(torch.sparse.sampled_addmm(pattern, x[:, grp.inputs].contiguous(), W_g).values())
        return torch.cat(out) if len(out) > 1 else out[0]

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        x, W_enc = ctx.saved_tensors
        layout, selections, need = ctx.layout, ctx.selections, ctx.needs_input_grad
        batch = x.shape[0]
        grad_x = x.new_zeros(x.shape) if need[0] else None
        grad_W = torch.empty_like(W_enc) if need[1] else None
        grad_b = g.new_zeros(ctx.d_sae) if need[2] else None
        grad_views = layout.encoder_views(grad_W) if need[1] else [None] * len(selections)
        for grp, W_g, view, sel, g_s in zip(layout.groups, layout.encoder_views(W_enc), grad_views, selections,
                                            _split(g, selections)):
            n_lat = W_g.shape[1]
            if need[0]:  # dL/dx[tok] = g W_enc_g[:, lat]^T
                grad_x[:, grp.inputs] += torch.sparse.mm(_sparse(sel.tok, sel.lat, g_s, (batch, n_lat)), W_g.t())
            if need[1]:  # dW_enc_g[:, lat] = sum over the latent's pairs of x[tok] g (in x's dtype: no bf16 CSR)
                view.copy_(_sparse_mm(_by_latent(sel, g_s.to(x.dtype), n_lat, batch), x[:, grp.inputs]).t())
            if need[2]:  # db_enc[lat] = sum over the latent's pairs of g
                grad_b[grp.latents].index_add_(0, sel.lat, g_s)
        return grad_x, grad_W, grad_b, None, None


def is_whole_layout(layout) -> bool:
    return len(layout.groups) == 1


class SparseDecode(torch.autograd.Function):
    """Per group, the sum over each token's selected latents of vals * W_dec_g[lat] (embedding_bag; bags =
    tokens), added into the group's output columns; no bias. Sparse backward: dW_dec_g = a sparse [G, B] x
    dense [B, d_out_g] matmul; dvals = grad[tok, outputs] . W_dec_g[lat] at the selected pairs only."""

    @staticmethod
    def forward(ctx, vals, W_dec, layout, selections, d_out):
        vals = vals.to(W_dec.dtype)  # the BatchTopK gate's AuxK gathers bf16 pre-activations under autocast
        ctx.save_for_backward(vals, W_dec)
        ctx.layout, ctx.selections = layout, selections
        parts = zip(layout.groups, layout.decoder_views(W_dec), selections, _split(vals, selections))
        if is_whole_layout(layout):
            _, W_g, sel, v = next(parts)
            return F.embedding_bag(sel.lat, W_g, sel.offsets, per_sample_weights=v, mode="sum")
        out = vals.new_zeros(selections[0].offsets.shape[0], d_out)
        for grp, W_g, sel, v in parts:
            out[:, grp.outputs] += F.embedding_bag(sel.lat, W_g, sel.offsets, per_sample_weights=v, mode="sum")
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        vals, W_dec = ctx.saved_tensors
        layout, selections, need = ctx.layout, ctx.selections, ctx.needs_input_grad
        batch = g.shape[0]
        grad_W = torch.empty_like(W_dec) if need[1] else None
        grad_views = layout.decoder_views(grad_W) if need[1] else [None] * len(selections)
        grad_vals = []
        for grp, W_g, view, sel, v in zip(layout.groups, layout.decoder_views(W_dec), grad_views, selections,
                                          _split(vals, selections)):
            g_out = g[:, grp.outputs].to(W_g.dtype)  # fp32 decode (no bf16 CSR matmul on CPU)
            if need[1]:  # dW_dec_g[lat] = sum over the latent's pairs of vals * grad[tok]
                view.copy_(_sparse_mm(_by_latent(sel, v, W_g.shape[0], batch), g_out))
            if need[0]:  # dvals = grad[tok] . W_dec_g[lat], a sampled matmul at the selected pairs
                pattern = _csr(sel, v, (batch, W_g.shape[0]))
                grad_vals.append(torch.sparse.sampled_addmm(pattern, g_out.contiguous(), W_g.t(), beta=0).values())
        return (torch.cat(grad_vals) if need[0] else None), grad_W, None, None, None
