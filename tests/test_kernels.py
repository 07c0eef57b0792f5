"""The hand-written backward passes (kernels.py's fused autograd Functions, as the architectures call them) against an independent gradient
reference, per architecture and per loss term; finite differences where the gradient is exact.

The reference is written from DESIGN.md "The math" as plain vectorized float64 autograd: dense pre-activations,
dense masks for the TopK/BatchTopK selections (ranked without gradient), dense decodes. Custom Functions appear
only where the math itself defines a surrogate gradient: JumpReLU's straight-through estimators. It imports
nothing from modeling.py but the model under test; hyper-parameters are read from the model's config, the
folded per-hook output scales from this file's own constants.

Every case compares, for the total loss and for each term of `out.losses` on its own (`torch.autograd.grad`),
the gradient of every parameter, at float64 tolerance. Each case also asserts that it is not vacuous: the
JumpReLU kernel window holds tokens, selections select, dead latents feed AuxK, every term that should be
non-zero is, every parameter gets a gradient from the total loss.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from hf_crosscoder import ARCHITECTURES, Crosscoder, CrosscoderConfig

F64 = torch.float64
D_MODEL, D_SAE, BATCH = 4, 12, 8
HOOKS_IN = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
HOOKS_OUT = {"same": HOOKS_IN,  # in == out hooks: an acausal crosscoder
             "diff": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]}
SCALE_IN = [0.7, 1.9]  # per-hook normalization scales folded into the weights (all different)
SCALE_OUT = [1.3, 0.45, 2.2]
K, K_AUX = 3, 4
N_DEAD = {"none": 0, "few": 2, "many": 7}  # few < k_aux (AuxK scaled by n_dead / k_aux), many > k_aux
MATRYOSHKA = "matryoshka_batchtopk_crosscoder"
MATRYOSHKA_WIDTHS = [3, 7, D_SAE]
HYPER = {"k": K, "k_aux": K_AUX, "l1_coefficient": 0.3, "aux_coefficient": 0.5, "jumprelu_bandwidth": 0.5,
         "jumprelu_tanh_scale": 0.5, "jumprelu_pre_act_coefficient": 0.7}  # tanh scale 0.5: not saturated
GRAD_RTOL = 1e-10
GAP = 1e-9  # no pre-activation, threshold or selection boundary closer than this: both sides agree on it


# ---------------------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    arch: str
    layout: str = "3d"       # "flat" [B, n_in * d] or "3d" [B, n_in, d] (targets in the same layout)
    hooks: str = "diff"      # "same": in == out hooks; "diff": 2 in, 3 out
    norm: str = "sum"        # sparsity_decoder_norm
    folded: bool = False     # fold_activation_norm_scaling(SCALE_IN, SCALE_OUT) applied
    scale: float = 1.0       # sparsity_scale
    dead: str = "none"       # key of N_DEAD
    opts: tuple = ()         # architecture-specific config fields (and "mode" for the BatchTopK family)
    seed: int = 0

    @property
    def opt(self) -> dict:
        return dict(self.opts)

    def __str__(self) -> str:
        parts = [self.arch, self.layout, self.hooks, self.norm, "folded" if self.folded else "raw",
                 f"scale{self.scale}", f"dead-{self.dead}", *(str(v) for _, v in self.opts)]
        return "-".join(parts)


# architecture-specific axes; the generic ones (layout, hooks, norm, folded) are crossed with them below
_BATCH_AXES = {"topk_ranking": ("decoder_scaled", "pre_activation"), "dead": tuple(N_DEAD), "mode": ("train", "gate")}
AXES = {
    "crosscoder": {},
    "skip_crosscoder": {},
    "jumprelu_crosscoder": {"jumprelu_sparsity": ("step", "tanh"),
                            "jumprelu_pre_act_latents": ("dead", "all", "none"), "dead": tuple(N_DEAD)},
    "topk_crosscoder": {"topk_ranking": ("decoder_scaled", "pre_activation"), "dead": tuple(N_DEAD)},
    "batchtopk_crosscoder": _BATCH_AXES,
    MATRYOSHKA: _BATCH_AXES,
}
GENERIC = list(itertools.product(("same", "diff"), ("sum", "concat"), (False, True)))  # hooks, norm, folded


def cases_for(arch: str) -> list[Case]:
    """Every combination of the architecture's own axes with both layouts and every (hooks, norm, folded);
    sparsity_scale is 0.37 in a third of the cases (spread over all the others)."""
    axes = AXES[arch]
    out = []
    for values in itertools.product(*axes.values()):
        opts = dict(zip(axes, values))
        dead = opts.pop("dead", "none")
        for layout, (hooks, norm, folded) in itertools.product(("flat", "3d"), GENERIC):
            out.append(Case(arch, layout, hooks, norm, folded, 0.37 if len(out) % 3 == 1 else 1.0, dead,
                            tuple(sorted(opts.items())), seed=len(out)))
    return out


CASES = [case for arch in ARCHITECTURES if arch in AXES for case in cases_for(arch)]


def build(case: Case):
    """(float64 model with non-trivial random parameters, x, y in the case's layout, dead mask)."""
    opt = case.opt
    mode = opt.pop("mode", "train")
    extra = {"matryoshka_widths": MATRYOSHKA_WIDTHS} if case.arch == MATRYOSHKA else {}
    cfg = CrosscoderConfig(architecture=case.arch, d_model=D_MODEL, d_sae=D_SAE, hook_names_in=HOOKS_IN,
                           hook_names_out=HOOKS_OUT[case.hooks], sparsity_decoder_norm=case.norm,
                           **HYPER, **opt, **extra)
    torch.manual_seed(case.seed)
    m = Crosscoder(cfg).double()
    g = torch.Generator().manual_seed(1000 + case.seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            scale = {"W_enc": 0.5, "b_enc": 0.3, "W_dec": 0.3, "b_dec": 1.0, "W_skip": 0.2}.get(name)
            if name == "theta":  # most positive, three negative (used as relu(theta) = 0)
                p.copy_(torch.rand(p.shape, generator=g, dtype=F64) * 1.6 + 0.05)
                p[torch.randperm(D_SAE, generator=g)[:3]] *= -0.25
            else:
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64) * scale)
    if case.folded:
        m.fold_activation_norm_scaling(SCALE_IN[:cfg.n_in], SCALE_OUT[:cfg.n_out])
    x = torch.randn(BATCH, cfg.n_in, D_MODEL, generator=g, dtype=F64)
    y = torch.randn(BATCH, cfg.n_out, D_MODEL, generator=g, dtype=F64)
    dead = None
    if case.dead != "none":
        dead = torch.zeros(D_SAE, dtype=torch.bool)
        dead[torch.randperm(D_SAE, generator=g)[:N_DEAD[case.dead]]] = True
    m.train(mode == "train")
    if mode == "gate":  # eval with a threshold among the scores: the JumpReLU gate of BatchTopK
        score = ref_scores(leaves(m), x.flatten(1), case, cfg)
        ranked = score[score > 0].sort().values
        i = int(0.6 * len(ranked))
        with torch.no_grad():  # midway between two scores, so no score sits on the threshold
            m.threshold.fill_(float(ranked[i] + ranked[i + 1]) / 2)
    if case.layout == "flat":
        x, y = x.flatten(1), y.flatten(1)
    return m, x, y, dead


# ---------------------------------------------------------------------------------------------- reference
def rect(u: torch.Tensor) -> torch.Tensor:
    """The rectangle kernel K(u) = 1 on |u| < 1/2."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpSTE(torch.autograd.Function):
    """f = h H(h - t). Straight-through: df/dh = H(h - t), df/dt = -(t / eps) K((h - t) / eps)."""

    @staticmethod
    def forward(ctx, h, t, eps):
        ctx.save_for_backward(h, t)
        ctx.eps = eps
        return h * (h > t).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, t = ctx.saved_tensors
        return g * (h > t).to(h.dtype), (g * -(t / ctx.eps) * rect((h - t) / ctx.eps)).sum(0), None


class StepSTE(torch.autograd.Function):
    """H(h - t). Straight-through: d/dt = -(1 / eps) K((h - t) / eps), nothing to h."""

    @staticmethod
    def forward(ctx, h, t, eps):
        ctx.save_for_backward(h, t)
        ctx.eps = eps
        return (h > t).to(h.dtype)

    @staticmethod
    def backward(ctx, g):
        h, t = ctx.saved_tensors
        return None, (g * -(1 / ctx.eps) * rect((h - t) / ctx.eps)).sum(0), None


def leaves(m: Crosscoder) -> dict:
    """Fresh float64 leaf copies of the model's parameters: the reference's own autograd graph."""
    return {name: p.detach().clone().requires_grad_() for name, p in m.named_parameters()}


def ref_pre(p: dict, x: torch.Tensor) -> torch.Tensor:
    """h = x_flat @ W_enc[n_in * d_model, d_sae] + b_enc."""
    return x @ p["W_enc"].reshape(-1, p["W_enc"].shape[-1]) + p["b_enc"]


def ref_dn(p: dict, case: Case, cfg) -> torch.Tensor:
    """Decoder norms in normalized space: the folded W_dec[:, l] is W_norm[:, l] / s_out[l]."""
    s_out = torch.tensor(SCALE_OUT[:cfg.n_out] if case.folded else [1.0] * cfg.n_out, dtype=F64)
    W = p["W_dec"] * s_out[None, :, None]
    if case.norm == "sum":
        return W.pow(2).sum(-1).sqrt().sum(-1)  # sum over output layers of per-layer L2 norms
    return W.pow(2).sum((1, 2)).sqrt()  # L2 norm of the concatenation


def ref_decode(f: torch.Tensor, p: dict, bias: bool = True) -> torch.Tensor:
    out = f @ p["W_dec"][:f.shape[1]].reshape(f.shape[1], -1)
    return out + p["b_dec"].reshape(-1) if bias else out


def sq_err(y: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """mean over tokens of the squared L2 error summed over output layers."""
    return (y - recon).pow(2).sum(1).mean()


def ref_relu(p, x, y, dead, case, cfg):
    h = ref_pre(p, x)
    f = F.relu(h)
    recon = ref_decode(f, p)
    if "W_skip" in p:
        recon = recon + x @ p["W_skip"]
    # L1 weighted by decoder norms: gradient reaches W_dec through dn as well as through the decode
    sparsity = case.scale * cfg.l1_coefficient * (f * ref_dn(p, case, cfg)).sum(1).mean()
    return {"mse": sq_err(y, recon), "sparsity": sparsity}, {"h": h, "f": f, "recon": recon}


def ref_jumprelu(p, x, y, dead, case, cfg):
    h, dn, eps = ref_pre(p, x), ref_dn(p, case, cfg), cfg.jumprelu_bandwidth
    t = F.relu(p["theta"])
    f = JumpSTE.apply(h, t, eps)
    recon = ref_decode(f, p)
    if cfg.jumprelu_sparsity == "step":
        penalty = StepSTE.apply(h, t, eps).sum(1).mean()
    else:
        penalty = torch.tanh(cfg.jumprelu_tanh_scale * f * dn).sum(1).mean()
    which = {"all": torch.ones(D_SAE, dtype=torch.bool),
             "dead": dead if dead is not None else torch.zeros(D_SAE, dtype=torch.bool),
             "none": torch.zeros(D_SAE, dtype=torch.bool)}[cfg.jumprelu_pre_act_latents]
    pre_act = (F.relu(t - h) * dn * which.to(F64)).sum(1).mean()
    terms = {"mse": sq_err(y, recon), "sparsity": case.scale * cfg.l1_coefficient * penalty,
             "pre_act": cfg.jumprelu_pre_act_coefficient * pre_act}
    window = rect((h - t) / eps).bool() & (p["theta"] > 0)
    diag = {"h": h, "f": f, "recon": recon, "t": t, "kernel_hits": int(window.sum()),
            "below": int(((t > h) & which).sum()), "pre_act_on": bool(which.any())}
    return terms, diag


def ref_scores(p, x, case, cfg) -> torch.Tensor:
    """TopK ranking scores relu(h) * dn (or relu(h)), without gradient: selection is not differentiated."""
    with torch.no_grad():
        a = F.relu(ref_pre(p, x))
        return a * ref_dn(p, case, cfg) if cfg.topk_ranking == "decoder_scaled" else a


def top_mask(score: torch.Tensor, k: int, dim_all: bool = False) -> torch.Tensor:
    """Boolean mask of each row's k best scores, or of the k best of the whole matrix."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if dim_all:
        mask.view(-1)[score.flatten().topk(k).indices] = True
    else:
        mask.scatter_(1, score.topk(k, dim=1).indices, True)
    return mask


def ref_selection(score, case, cfg, threshold) -> torch.Tensor:
    if case.arch == "topk_crosscoder":
        return top_mask(score, cfg.k)
    if case.opt.get("mode") == "gate":
        return score > threshold
    return top_mask(score, min(cfg.k * score.shape[0], score.numel()), dim_all=True)


def ref_auxk(p, a, score, err, dead, cfg):
    """Dead latents' top k_aux (capped by n_dead) by the same score, decoded without b_dec, fit the detached
    residual error; scaled by aux_coefficient * min(n_dead / k_aux, 1)."""
    n_dead = 0 if dead is None else int(dead.sum())
    if n_dead == 0:
        return torch.zeros((), dtype=F64), torch.zeros_like(score, dtype=torch.bool)
    mask = top_mask(score.masked_fill(~dead, -math.inf), min(cfg.k_aux, n_dead)) & dead
    e_hat = ref_decode(a * mask, p, bias=False)
    aux = cfg.aux_coefficient * min(n_dead / cfg.k_aux, 1.0) * sq_err(err.detach(), e_hat)
    return aux, mask


def ref_topk(p, x, y, dead, case, cfg, threshold=None):
    """TopK, BatchTopK (training selection or the eval gate) and Matryoshka BatchTopK."""
    h = ref_pre(p, x)
    a = F.relu(h)
    score = ref_scores(p, x, case, cfg)
    mask = ref_selection(score, case, cfg, threshold)
    f = a * mask
    recon = ref_decode(f, p)
    aux, aux_mask = ref_auxk(p, a, score, y - recon, dead, cfg)
    terms = {"mse": sq_err(y, recon), "sparsity": torch.zeros((), dtype=F64), "aux": aux}
    if case.arch == MATRYOSHKA:  # every inner nested prefix of latents reconstructs on its own (training)
        inner = cfg.matryoshka_widths[:-1] if case.opt.get("mode") != "gate" else []
        terms["matryoshka"] = sum((sq_err(y, ref_decode(f[:, :w], p)) for w in inner), torch.zeros((), dtype=F64))
    diag = {"h": h, "f": f, "recon": recon, "score": score, "mask": mask, "aux_mask": aux_mask}
    return terms, diag


REFERENCES = {
    "crosscoder": ref_relu,
    "skip_crosscoder": ref_relu,
    "jumprelu_crosscoder": ref_jumprelu,
    "topk_crosscoder": ref_topk,
    "batchtopk_crosscoder": ref_topk,
    MATRYOSHKA: ref_topk,
}


def reference(m, x, y, dead, case):
    """(reference leaves, terms, diagnostics) on flat inputs."""
    p = leaves(m)
    kw = {"threshold": float(m.threshold)} if case.opt.get("mode") == "gate" else {}
    terms, diag = REFERENCES[case.arch](p, x.flatten(1), y.flatten(1), dead, case, m.config, **kw)
    return p, terms, diag


# ---------------------------------------------------------------------------------------------- comparison
def grads_of(value: torch.Tensor, params: dict) -> dict:
    """{name: d value / d param}, zeros where the value does not depend on it (or is a constant)."""
    names = list(params)
    if not value.requires_grad:
        return {n: torch.zeros_like(params[n]) for n in names}
    gs = torch.autograd.grad(value, [params[n] for n in names], retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(params[n]) if g is None else g for n, g in zip(names, gs)}


def assert_grad_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    tol = GRAD_RTOL * float(want.abs().max()) + 1e-13
    err = float((got - want).abs().max())
    assert err <= tol, f"{what}: max |model - reference| = {err:.3e} > {tol:.3e} (max |reference| {float(want.abs().max()):.3e})"


def active_terms(case: Case, dead) -> set:
    """The terms that must be non-zero (with a non-zero gradient) in this case."""
    if case.arch in ("crosscoder", "skip_crosscoder"):
        return {"mse", "sparsity"}
    if case.arch == "jumprelu_crosscoder":
        pre = case.opt["jumprelu_pre_act_latents"]
        return {"mse", "sparsity"} | ({"pre_act"} if pre == "all" or (pre == "dead" and dead is not None) else set())
    inner = {"matryoshka"} if case.arch == MATRYOSHKA and case.opt.get("mode") != "gate" else set()
    return {"mse"} | inner | ({"aux"} if dead is not None else set())


def selection_gap(score: torch.Tensor, mask: torch.Tensor, rows: bool) -> float:
    """Smallest kept positive score minus the largest score left out (per row or over the matrix)."""
    kept = score.masked_fill(~mask | (score <= 0), math.inf)
    left = score.masked_fill(mask, -math.inf)
    if not rows:
        kept, left = kept.flatten()[None], left.flatten()[None]
    has = torch.isfinite(kept.min(1).values)
    return float((kept.min(1).values - left.max(1).values)[has].min()) if has.any() else math.inf


def check_nondegenerate(case, m, dead, terms, diag) -> None:
    """The case exercises what it claims: nothing on a boundary, every path non-trivially used."""
    diag = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in diag.items()}
    assert float(diag["h"].abs().min()) > GAP  # no pre-activation at the ReLU kink
    assert (diag["f"] > 0).any() and (diag["f"] == 0).any()
    if dead is not None:
        assert (int(dead.sum()) < K_AUX) == (case.dead == "few")
    if case.arch == "jumprelu_crosscoder":
        d = (diag["h"] - diag["t"]).abs()
        assert float(d.min()) > GAP and float((d - m.config.jumprelu_bandwidth / 2).abs().min()) > GAP
        assert diag["kernel_hits"] > 0 and (m.theta < 0).any()  # the STE window and relu(theta)'s flat part
        assert not diag["pre_act_on"] or diag["below"] > 0
    if "score" in diag:
        mode = case.opt.get("mode", "train")
        if mode == "gate":
            assert float((diag["score"] - float(m.threshold)).abs().min()) > GAP
        else:
            assert selection_gap(diag["score"], diag["mask"], rows=case.arch == "topk_crosscoder") > GAP
        per_token = diag["mask"].sum(1)
        assert case.arch == "topk_crosscoder" or len(set(per_token.tolist())) > 1  # a batch-level selection
        if dead is not None:
            assert selection_gap(diag["score"].masked_fill(~dead, -1.0), diag["aux_mask"], rows=True) > GAP
            assert (diag["aux_mask"] & (diag["score"] > 0)).any()
    for name in active_terms(case, dead):
        assert float(terms[name].detach()) != 0, name
    for name, term in terms.items():
        if name not in active_terms(case, dead):
            assert float(term.detach()) == 0, name


def model_terms(out) -> dict:
    return {name: v for name, v in out.losses.items() if name != "mse_per_layer"}


# ---------------------------------------------------------------------------------------------- tests
def test_every_architecture_has_a_reference():
    missing = [a for a in ARCHITECTURES if a not in REFERENCES or a not in AXES]
    assert not missing, (f"add a reference for {missing} to tests/test_kernels.py (REFERENCES and AXES): "
                         "no independent gradient check covers it")
    for arch in ARCHITECTURES:
        cases = [c for c in CASES if c.arch == arch]
        for attr, values in (("layout", {"flat", "3d"}), ("hooks", {"same", "diff"}), ("norm", {"sum", "concat"}),
                             ("folded", {False, True}), ("scale", {1.0, 0.37})):
            assert {getattr(c, attr) for c in cases} == values, (arch, attr)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_gradients_match_reference(case):
    m, x, y, dead = build(case)
    out = m(x, y, dead_mask=dead, sparsity_scale=case.scale)
    p, ref, diag = reference(m, x, y, dead, case)
    check_nondegenerate(case, m, dead, ref, diag)
    assert out.reconstruction.shape == y.shape
    torch.testing.assert_close(out.reconstruction.flatten(1), diag["recon"].detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.feature_acts, diag["f"].detach(), rtol=1e-12, atol=1e-12)
    got = model_terms(out)
    assert set(got) == set(ref), f"loss terms {sorted(got)} != reference {sorted(ref)}: update the reference"
    params = dict(m.named_parameters())
    assert set(params) == set(p)
    total = sum(ref.values())
    for name, value in [*ref.items(), ("loss", total)]:
        model_value = out.loss if name == "loss" else got[name]
        torch.testing.assert_close(model_value.detach(), value.detach(), rtol=1e-12, atol=1e-14)
        want, have = grads_of(value, p), grads_of(model_value, params)
        if name == "loss":  # every parameter is trained by the total loss
            assert all(g.abs().max() > 0 for g in want.values()), {n: float(g.abs().max()) for n, g in want.items()}
        if name in active_terms(case, dead):
            assert any(g.abs().max() > 0 for g in want.values()), name
        for pname in params:
            assert_grad_close(have[pname], want[pname], f"{case} d{name}/d{pname}")


# a deliberately wrong reference (decoder norms detached in a penalty: no gradient through dn into W_dec)
# must be caught by the comparison above, i.e. that gradient path carries a non-negligible share
MUTANTS = [
    (Case("crosscoder", norm="sum"), "sparsity"),
    (Case("skip_crosscoder", norm="concat", folded=True), "sparsity"),
    (Case("jumprelu_crosscoder", opts=(("jumprelu_pre_act_latents", "none"), ("jumprelu_sparsity", "tanh"))), "sparsity"),
    (Case("jumprelu_crosscoder", opts=(("jumprelu_pre_act_latents", "all"), ("jumprelu_sparsity", "step"))), "pre_act"),
]


@pytest.mark.parametrize("case,term", MUTANTS, ids=[f"{c}-{t}" for c, t in MUTANTS])
def test_a_reference_without_the_decoder_norm_gradient_would_fail(case, term, monkeypatch):
    m, x, y, dead = build(case)
    out = m(x, y, dead_mask=dead)
    have = grads_of(model_terms(out)[term], dict(m.named_parameters()))["W_dec"]
    exact = ref_dn
    monkeypatch.setitem(globals(), "ref_dn", lambda p, c, cfg: exact(p, c, cfg).detach())
    p, wrong, _ = reference(m, x, y, dead, case)
    want = grads_of(wrong[term], p)["W_dec"]
    gap = float((have - want).abs().max())
    assert gap > 1e3 * (GRAD_RTOL * float(want.abs().max()) + 1e-13), gap  # far outside the tolerance
    assert gap > 1e-2 * float(have.abs().max())  # a real share of the gradient, not a rounding-level term


# ---------------------------------------------------------------------------------------------- finite differences
# ReLU and skip gradients are exact (no straight-through surrogate, no selection): away from the kinks the
# model's gradient is the derivative of its own loss, checked by central differences on random entries
FD_EPS = 1e-6
FD_CASES = [Case("crosscoder", "3d", "diff", "sum", False, 0.37), Case("crosscoder", "flat", "same", "concat", True),
            Case("skip_crosscoder", "flat", "diff", "sum", True, 0.37), Case("skip_crosscoder", "3d", "same", "concat")]


def model_losses(m, x, y, scale: float) -> dict:
    with torch.no_grad():
        out = m(x, y, sparsity_scale=scale)
    return {"loss": float(out.loss), **{n: float(v) for n, v in model_terms(out).items()}}


@pytest.mark.parametrize("case", FD_CASES, ids=str)
def test_relu_and_skip_gradients_match_finite_differences(case):
    m, x, y, _ = build(case)
    p = leaves(m)
    h = ref_pre(p, x.flatten(1)).detach()
    # a perturbation of W_enc or b_enc by FD_EPS moves h by at most FD_EPS * max|x|: no h crosses 0, and
    # no decoder block is near the norm's kink at 0
    assert float(h.abs().min()) > 100 * FD_EPS * max(1.0, float(x.abs().max()))
    assert float(p["W_dec"].detach().norm(dim=-1).min()) > 1e-3
    out = m(x, y, sparsity_scale=case.scale)
    params = dict(m.named_parameters())
    analytic = {name: grads_of(v, params) for name, v in [("loss", out.loss), *model_terms(out).items()]}
    g = torch.Generator().manual_seed(7)
    moved = 0
    for pname, param in params.items():
        assert float(analytic["loss"][pname].abs().max()) > 0, pname
        flat = param.data.view(-1)
        for idx in torch.randperm(flat.numel(), generator=g)[:4].tolist():
            orig = float(flat[idx])
            flat[idx] = orig + FD_EPS
            plus = model_losses(m, x, y, case.scale)
            flat[idx] = orig - FD_EPS
            minus = model_losses(m, x, y, case.scale)
            flat[idx] = orig
            for term, grads in analytic.items():
                fd = (plus[term] - minus[term]) / (2 * FD_EPS)
                want = float(grads[pname].view(-1)[idx])
                assert abs(fd - want) <= 1e-6 * (1 + abs(want)), (term, pname, idx, fd, want)
                moved += term == "loss" and abs(want) > 1e-3
    assert moved >= len(params)  # the entries checked carry real gradient, about one per parameter at least
