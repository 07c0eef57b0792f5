"""Layer structures (cross_layer CLTs, per_layer sets) against naive float64 loops written from the layout
documented in structures.py, and a per-layer set against L separately trained single-layer crosscoders."""

from __future__ import annotations

import math

import pytest
import torch

from hf_crosscoder import Crosscoder, CrosscoderConfig

F64 = torch.float64
L, D, G, B = 3, 6, 8, 16
HOOKS_IN = [f"blocks.{i}.ln2.hook_normalized" for i in range(L)]
HOOKS_OUT = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
FAMILIES = {  # architecture: extra config (TopK ranked by the raw pre-activation, which the loop can rank)
    "crosscoder": {},
    "skip_crosscoder": {},
    "topk_crosscoder": {"k": 3, "topk_ranking": "pre_activation"},
    "batchtopk_crosscoder": {"k": 3, "topk_ranking": "pre_activation"},
    "jumprelu_crosscoder": {"jumprelu_init_threshold": 0.3},
    "matryoshka_batchtopk_crosscoder": {"k": 3, "topk_ranking": "pre_activation", "matryoshka_widths": [2, 5, 8]},
}
MATRYOSHKA = "matryoshka_batchtopk_crosscoder"


def make(structure: str, arch: str, seed: int = 0, **kw) -> Crosscoder:
    torch.manual_seed(seed)
    cfg = CrosscoderConfig(d_model=D, hook_names_in=HOOKS_IN, hook_names_out=HOOKS_OUT, d_sae=L * G,
                           architecture=arch, layer_structure=structure, **{**FAMILIES.get(arch, {}), **kw})
    cc = Crosscoder(cfg).double()
    with torch.no_grad():  # nonzero biases and skips, so that every term is exercised
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_(0, 0.1)
        if hasattr(cc, "W_skip"):
            cc.W_skip.normal_(0, 0.1)
    return cc


def targets(structure: str, i: int) -> list[int]:
    return list(range(i, L)) if structure == "cross_layer" else [i]


def decoder_row(structure: str, i: int, s: int, t: int) -> int:
    """Row of W_dec (flattened to [rows, d_model]) holding group i's latent s for its t-th target layer:
    cross_layer packs the groups' [G, L - i, d_model] blocks one after another; per_layer is [d_sae, 1, d]."""
    if structure == "per_layer":
        return i * G + s
    offset = G * sum(L - g for g in range(i))
    return offset + s * (L - i) + t


def naive(cc: Crosscoder, structure: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(feature acts [B, d_sae], reconstruction [B, L, D]) by loops over groups, latents and targets."""
    arch = cc.config.architecture
    W_dec = cc.W_dec.reshape(-1, D)
    acts = []
    for i in range(L):
        h = x[:, i] @ cc.W_enc[i] + cc.b_enc[i * G:(i + 1) * G]
        f = torch.relu(h)
        if arch == "topk_crosscoder":  # per group: the k largest pre-activations, kept if positive
            keep = torch.zeros_like(f).scatter_(1, h.topk(cc.config.k, dim=1).indices, 1.0)
            f = f * keep
        elif arch in ("batchtopk_crosscoder", MATRYOSHKA):  # training: per group, the k * batch largest over the batch
            flat = f.flatten()
            keep = torch.zeros_like(flat).scatter_(0, flat.topk(cc.config.k * len(x)).indices, 1.0)
            f = f * keep.view_as(f)
        elif arch == "jumprelu_crosscoder":  # f = h where h > relu(theta)
            f = h * (h > torch.relu(cc.theta[i * G:(i + 1) * G])).to(h.dtype)
        acts.append(f)
    recon = cc.b_dec.expand(len(x), L, D).clone()
    for i in range(L):
        for t, j in enumerate(targets(structure, i)):
            for s in range(G):
                recon[:, j] = recon[:, j] + acts[i][:, s:s + 1] * W_dec[decoder_row(structure, i, s, t)]
        if arch == "skip_crosscoder":
            recon[:, i] = recon[:, i] + x[:, i] @ cc.W_skip[i]
    return torch.cat(acts, 1), recon


@pytest.mark.parametrize("structure", ["cross_layer", "per_layer"])
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_forward_and_mse_gradients_match_a_naive_loop(structure, arch):
    cc = make(structure, arch)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(B, L, D, generator=g, dtype=F64), torch.randn(B, L, D, generator=g, dtype=F64)
    want_acts, want_recon = naive(cc, structure, x)
    out = cc(x, y)
    torch.testing.assert_close(out.feature_acts, want_acts, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.reconstruction, want_recon, rtol=1e-10, atol=1e-12)
    # the gradients of the reconstruction loss (sum over layers of the batch-mean squared error)
    params = [p for p in cc.parameters() if p.requires_grad]
    want_mse = (y - want_recon).pow(2).sum((0, 2)).div(B).sum()
    want = torch.autograd.grad(want_mse, params, allow_unused=True)
    got = torch.autograd.grad(out.losses["mse"], params, allow_unused=True)
    torch.testing.assert_close(out.losses["mse"], want_mse, rtol=1e-10, atol=0)
    for a, b in zip(got, want):
        if b is None:
            continue
        torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, rtol=1e-9, atol=1e-11)


def test_a_clt_has_no_structural_zeros_and_the_right_shapes():
    cc = make("cross_layer", "skip_crosscoder")
    assert tuple(cc.W_enc.shape) == (L, D, G)
    assert cc.W_dec.numel() == G * L * (L + 1) // 2 * D  # group i writes L - i layers only
    assert tuple(cc.W_skip.shape) == (L, D, D)
    shares = cc.decoder_norms_per_layer()
    for i in range(L):  # group i writes nothing below layer i
        assert torch.all(shares[i * G:(i + 1) * G, :i] == 0) and torch.all(shares[i * G:(i + 1) * G, i:] > 0)


def _single(per: Crosscoder, i: int, arch: str) -> Crosscoder:
    """Layer i of a per_layer set as a dense one-hook crosscoder with the same weights."""
    torch.manual_seed(0)
    one = Crosscoder(CrosscoderConfig(d_model=D, hook_names_in=[HOOKS_IN[i]], hook_names_out=[HOOKS_OUT[i]],
                                      d_sae=G, architecture=arch, **FAMILIES.get(arch, {}))).double()
    with torch.no_grad():
        one.W_enc.copy_(per.W_enc[i:i + 1])
        one.b_enc.copy_(per.b_enc[i * G:(i + 1) * G])
        one.W_dec.copy_(per.W_dec[i * G:(i + 1) * G])
        one.b_dec.copy_(per.b_dec[i:i + 1])
        if hasattr(one, "W_skip"):
            one.W_skip.copy_(per.W_skip[i])
    return one


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_per_layer_trains_like_l_separate_single_layer_crosscoders(arch):
    """Same batches, same Adam: a per_layer set and L separately trained one-hook crosscoders stay equal,
    weight for weight (its loss is the sum of theirs, and no weight is shared between layers)."""
    per = make("per_layer", arch)
    singles = [_single(per, i, arch) for i in range(L)]
    opt = torch.optim.Adam(per.parameters(), lr=1e-2)
    opts = [torch.optim.Adam(s.parameters(), lr=1e-2) for s in singles]
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x, y = torch.randn(B, L, D, generator=g, dtype=F64), torch.randn(B, L, D, generator=g, dtype=F64)
        opt.zero_grad()
        per(x, y).loss.backward()
        opt.step()
        for i, (one, o) in enumerate(zip(singles, opts)):
            o.zero_grad()
            one(x[:, i:i + 1], y[:, i:i + 1]).loss.backward()
            o.step()
    for i, one in enumerate(singles):
        torch.testing.assert_close(one.W_enc[0], per.W_enc[i], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(one.W_dec, per.W_dec[i * G:(i + 1) * G], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(one.b_enc, per.b_enc[i * G:(i + 1) * G], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(one.b_dec[0], per.b_dec[i], rtol=1e-9, atol=1e-12)


def test_a_clt_recovers_planted_features_that_write_to_several_later_layers():
    """Synthetic CLT data: each of F features per source layer i reads one direction of input layer i and
    writes a direction to every output layer j >= i. A TopK CLT trained on it recovers >= 90% of them: a
    latent of group i whose decoder (concatenated over the target layers) has cos >= 0.9 with the feature's."""
    torch.manual_seed(0)
    d, n_feat, k = 16, 6, 2  # per source layer
    u = torch.nn.functional.normalize(torch.randn(L, n_feat, d), dim=-1)  # input directions
    v = torch.nn.functional.normalize(torch.randn(L, n_feat, L, d), dim=-1)  # output directions per target
    for i in range(L):
        v[i, :, :i] = 0  # a feature of layer i writes layers i..L-1 only

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        a = (torch.rand(n, L, n_feat) < 0.15) * (0.5 + torch.rand(n, L, n_feat))
        x = torch.einsum("bif,ifd->bid", a, u)
        y = torch.einsum("bif,ifjd->bjd", a, v)
        return x, y

    cfg = CrosscoderConfig(d_model=d, hook_names_in=HOOKS_IN, hook_names_out=HOOKS_OUT, d_sae=L * 4 * n_feat,
                           architecture="topk_crosscoder", k=k, layer_structure="cross_layer")
    cc = Crosscoder(cfg)
    opt = torch.optim.Adam(cc.parameters(), lr=3e-3)
    for _ in range(600):
        x, y = batch(256)
        loss = cc(x, y).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    G4 = 4 * n_feat
    dec = cc.structure.decoder_vectors(cc.W_dec).detach()  # [d_sae, L, d]
    found = 0
    for i in range(L):
        group_dec = torch.nn.functional.normalize(dec[i * G4:(i + 1) * G4].flatten(1), dim=-1)
        planted = torch.nn.functional.normalize(v[i].flatten(1), dim=-1)
        found += int(((planted @ group_dec.T).max(1).values >= 0.9).sum())  # [n_feat, G4] cosines
    assert found >= 0.9 * L * n_feat, f"recovered {found} of {L * n_feat}"


@pytest.mark.parametrize("structure", ["cross_layer", "per_layer"])
@pytest.mark.parametrize("arch", ["crosscoder", "skip_crosscoder"])
def test_relu_loss_with_the_decoder_norm_penalty_summed_over_the_layers_a_latent_writes(structure, arch):
    """The CLT decoder-norm L1 (Ameisen et al.): l1 * mean_b sum_s f_s * sum_{j written by s} ||W_dec[s, j]||,
    and the gradient of the whole loss, against the naive loop."""
    cc = make(structure, arch, l1_coefficient=0.7)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(B, L, D, generator=g, dtype=F64), torch.randn(B, L, D, generator=g, dtype=F64)
    acts, recon = naive(cc, structure, x)
    W_dec = cc.W_dec.reshape(-1, D)
    dn = torch.stack([sum(W_dec[decoder_row(structure, i, s, t)].norm() for t in range(len(targets(structure, i))))
                      for i in range(L) for s in range(G)])
    want_sparsity = 0.7 * (acts * dn).sum(1).mean()
    want_loss = (y - recon).pow(2).sum((0, 2)).div(B).sum() + want_sparsity
    out = cc(x, y)
    torch.testing.assert_close(out.losses["sparsity"], want_sparsity, rtol=1e-10, atol=0)
    params = list(cc.parameters())
    for a, b in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(want_loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------------------------------------- whole losses
# Every sparsity family's whole training loss on both structures, term by term with every parameter's
# gradient, against a loop over groups written from the layout and DESIGN.md's math: JumpReLU step and
# tanh with the pre-activation loss on dead and on all latents, and the TopK family with dead latents feeding
# AuxK (per group: the dead latents' top k_aux, the scale n_dead / (k_aux * L) capped at 1) and Matryoshka's
# nested prefixes (latents [0, w) of every group).
LOSS_CASES = [
    ("jumprelu_crosscoder", {"jumprelu_sparsity": "step", "jumprelu_pre_act_latents": "dead"}),
    ("jumprelu_crosscoder", {"jumprelu_sparsity": "tanh", "jumprelu_pre_act_latents": "all"}),
    ("topk_crosscoder", {}),
    ("batchtopk_crosscoder", {}),
    (MATRYOSHKA, {}),
]
LOSS_HYPER = {"jumprelu_crosscoder": {"l1_coefficient": 0.4, "jumprelu_bandwidth": 0.5, "jumprelu_tanh_scale": 0.5,
                                      "jumprelu_pre_act_coefficient": 0.7},
              "topk": {"k_aux": 2, "aux_coefficient": 0.5}}


def naive_terms(cc: Crosscoder, structure: str, x: torch.Tensor, y: torch.Tensor, dead: torch.Tensor) -> dict:
    from test_kernels import JumpSTE, StepSTE  # the dense reference's straight-through estimators

    c, arch = cc.config, cc.config.architecture
    W_dec = cc.W_dec.reshape(-1, D)
    dn = torch.stack([sum(W_dec[decoder_row(structure, i, s, t)].norm() for t in range(len(targets(structure, i))))
                      for i in range(L) for s in range(G)])

    def decode(acts: list[torch.Tensor], bias: bool = True) -> torch.Tensor:
        out = cc.b_dec.expand(len(x), L, D).clone() if bias else x.new_zeros(len(x), L, D)
        for i in range(L):
            for t, j in enumerate(targets(structure, i)):
                for s in range(G):
                    out[:, j] = out[:, j] + acts[i][:, s:s + 1] * W_dec[decoder_row(structure, i, s, t)]
        return out

    def sq(target: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        return (target - recon).pow(2).sum((1, 2)).mean()

    hs = [x[:, i] @ cc.W_enc[i] + cc.b_enc[i * G:(i + 1) * G] for i in range(L)]
    lat = [slice(i * G, (i + 1) * G) for i in range(L)]
    if arch == "jumprelu_crosscoder":
        eps, theta = c.jumprelu_bandwidth, [torch.relu(cc.theta[g]) for g in lat]
        acts = [JumpSTE.apply(h, t, eps) for h, t in zip(hs, theta)]
        if c.jumprelu_sparsity == "step":
            penalty = sum(StepSTE.apply(h, t, eps).sum(1) for h, t in zip(hs, theta)).mean()
        else:
            penalty = sum(torch.tanh(c.jumprelu_tanh_scale * f * dn[g]).sum(1) for f, g in zip(acts, lat)).mean()
        which = dead if c.jumprelu_pre_act_latents == "dead" else torch.ones_like(dead)
        pre = sum((torch.relu(t - h) * dn[g] * which[g].to(F64)).sum(1) for h, t, g in zip(hs, theta, lat)).mean()
        return {"mse": sq(y, decode(acts)), "sparsity": c.l1_coefficient * penalty,
                "pre_act": c.jumprelu_pre_act_coefficient * pre}
    acts = []
    for h in hs:  # ranked by the raw pre-activation (topk_ranking="pre_activation")
        a = torch.relu(h)
        if arch == "topk_crosscoder":
            keep = torch.zeros_like(a).scatter_(1, h.topk(c.k, dim=1).indices, 1.0)
        else:  # the BatchTopK family in training: the group's k * batch best over the batch
            keep = torch.zeros_like(a).flatten().scatter_(0, a.flatten().topk(c.k * len(x)).indices, 1.0).view_as(a)
        acts.append(a * keep)
    recon = decode(acts)
    err = (y - recon).detach()
    aux_acts = []
    for h, g in zip(hs, lat):
        best = torch.relu(h).masked_fill(~dead[g], -math.inf)
        keep = torch.zeros_like(h).scatter_(1, best.topk(c.k_aux, dim=1).indices, 1.0) * dead[g].to(F64)
        aux_acts.append(torch.relu(h) * keep)
    scale = min(int(dead.sum()) / (c.k_aux * L), 1.0)
    terms = {"mse": sq(y, recon), "sparsity": x.new_zeros(()),
             "aux": c.aux_coefficient * scale * sq(err, decode(aux_acts, bias=False))}
    if arch == MATRYOSHKA:
        terms["matryoshka"] = sum(sq(y, decode([f * (torch.arange(G) < w).to(F64) for f in acts]))
                                  for w in c.matryoshka_widths[:-1])
    return terms


@pytest.mark.parametrize("structure", ["cross_layer", "per_layer"])
@pytest.mark.parametrize("arch,opts", LOSS_CASES, ids=[f"{a}-{'-'.join(map(str, o.values()))}" for a, o in LOSS_CASES])
def test_every_family_s_whole_loss_and_gradients_match_a_naive_loop(structure, arch, opts):
    cc = make(structure, arch, **LOSS_HYPER.get(arch, LOSS_HYPER["topk"]), **opts)
    g = torch.Generator().manual_seed(5)
    if arch == "jumprelu_crosscoder":  # thresholds in the pre-activations' range, three at relu's flat part
        with torch.no_grad():
            cc.theta.copy_(torch.rand(L * G, generator=g, dtype=F64) * 1.2 + 0.05)
            cc.theta[torch.randperm(L * G, generator=g)[:3]] *= -0.25
    x, y = torch.randn(B, L, D, generator=g, dtype=F64), torch.randn(B, L, D, generator=g, dtype=F64)
    dead = torch.zeros(L * G, dtype=torch.bool)
    dead[torch.randperm(L * G, generator=g)[:5]] = True  # spread over the groups, fewer than k_aux in some
    out = cc(x, y, dead_mask=dead)
    want = naive_terms(cc, structure, x, y, dead)
    got = {name: value for name, value in out.losses.items() if name != "mse_per_layer"}
    assert set(got) == set(want)
    params = list(cc.parameters())
    for name in [*want, "loss"]:
        w, h = (sum(want.values()), out.loss) if name == "loss" else (want[name], got[name])
        torch.testing.assert_close(h, w, rtol=1e-10, atol=1e-14)
        assert name == "sparsity" and arch != "jumprelu_crosscoder" or float(w.detach()) != 0, name  # each term is live
        if not w.requires_grad:
            continue
        wants = torch.autograd.grad(w, params, retain_graph=True, allow_unused=True)
        if name == "loss":  # every parameter (JumpReLU's theta through the STE window too) is trained
            assert all(b is not None and float(b.abs().max()) > 0 for b in wants)
        for a, b in zip(torch.autograd.grad(h, params, retain_graph=True, allow_unused=True), wants):
            if b is None:
                assert a is None or float(a.abs().max()) == 0, name
            else:
                torch.testing.assert_close(a if a is not None else torch.zeros_like(b), b, rtol=1e-9, atol=1e-11)
