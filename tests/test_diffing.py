"""hf_crosscoder.diffing: decoder-norm shares, cosines, classes, Latent Scaling against float64 references."""

import pytest
import torch

from hf_crosscoder import Crosscoder, CrosscoderConfig
from hf_crosscoder.diffing import (
    classify_latents,
    decoder_cosines,
    decoder_norm_shares,
    draw_diffing_plots,
    latent_scaling,
    relative_norms,
)

D = 6
HOOKS = dict(hook_names_in=["blocks.0.hook_resid_post"], hook_names_out=["blocks.0.hook_resid_post",
                                                                          "blocks.1.hook_resid_post"])


def diff_crosscoder(seed=0, models=("base", "chat"), d_sae=10, **kw):
    torch.manual_seed(seed)
    cc = Crosscoder(CrosscoderConfig(d_model=D, d_sae=d_sae, model_names=list(models), **HOOKS, **kw)).double()
    with torch.no_grad():
        cc.W_dec.normal_()
        cc.b_enc.uniform_(0.0, 0.5)  # most latents fire on most tokens
    return cc


def test_shares_and_cosines_match_a_naive_loop():
    cc = diff_crosscoder()
    with torch.no_grad():
        cc.W_dec[0, 2:] = 0  # latent 0: only base; latent 1: only chat
        cc.W_dec[1, :2] = 0
    shares, cosines = decoder_norm_shares(cc), decoder_cosines(cc)
    W = cc.W_dec.detach()
    for j in range(cc.config.d_sae):
        per_model = [W[j, 0].norm() + W[j, 1].norm(), W[j, 2].norm() + W[j, 3].norm()]
        total = sum(per_model)
        torch.testing.assert_close(shares[j], torch.stack(per_model) / total)
        a, b = W[j, :2].flatten(), W[j, 2:].flatten()
        expected = a @ b / (a.norm() * b.norm()) if a.norm() * b.norm() > 0 else torch.tensor(0.0).double()
        torch.testing.assert_close(cosines[j], expected)
    torch.testing.assert_close(shares.sum(1), torch.ones(cc.config.d_sae).double())
    torch.testing.assert_close(relative_norms(cc), shares[:, 1])
    classes = classify_latents(cc)
    assert classes.names == ["only base", "only chat", "shared"]
    assert classes.labels[0] == 0 and classes.labels[1] == 1
    assert sum(classes.counts.values()) == cc.config.d_sae
    expected_labels = torch.where(shares[:, 1] > 0.9, 1, torch.where(shares[:, 1] < 0.1, 0, 2))
    assert torch.equal(classes.labels, expected_labels)


def test_shares_undo_the_folded_normalization():
    cc = diff_crosscoder()
    before = decoder_norm_shares(cc)
    cc.fold_activation_norm_scaling([1.0, 1.0], [0.5, 2.0, 4.0, 0.25])
    torch.testing.assert_close(decoder_norm_shares(cc), before)


def test_three_models_give_a_cosine_matrix():
    cc = diff_crosscoder(models=("a", "b", "c"))
    assert decoder_norm_shares(cc).shape == (10, 3) and decoder_cosines(cc).shape == (10, 3, 3)
    assert classify_latents(cc).names == ["only a", "only b", "only c", "shared"]


def test_one_model_and_bad_thresholds_are_refused():
    one = Crosscoder(CrosscoderConfig(d_model=D, d_sae=4, **HOOKS))
    with pytest.raises(ValueError, match="two or more models"):
        decoder_norm_shares(one)
    with pytest.raises(ValueError, match="low = 1 - high"):
        classify_latents(diff_crosscoder(), low=0.2, high=0.9)


def naive_beta(f, target, d):
    """argmin_b sum_t ||target_t - b f_t d||^2 by least squares on the stacked vectors (float64)."""
    design = (f[:, None] * d[None, :]).reshape(-1, 1)
    return torch.linalg.lstsq(design, target.reshape(-1, 1)).solution.item()


@pytest.mark.parametrize("decoder_model", [None, 1])
@pytest.mark.parametrize("folded", [False, True])
def test_latent_scaling_equals_least_squares_per_latent(decoder_model, folded):
    cc = diff_crosscoder(seed=1, d_sae=5)
    torch.manual_seed(2)
    batches = [(torch.randn(7, 2, D).double(), torch.randn(7, 4, D).double()) for _ in range(3)]
    scale = torch.tensor([1.0, 2.0, 0.5, 3.0]).double()
    if folded:  # a saved model on raw activations: the betas are those of the normalized space
        cc.fold_activation_norm_scaling([1.0, 1.0], scale.tolist())
    result = latent_scaling(cc, batches, decoder_model=decoder_model)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    f = cc.encode(x).detach()
    recon = cc.decode(f, x).detach()
    s = scale[:, None] if folded else torch.ones(4, 1).double()
    W = cc.W_dec.detach() * s  # normalized-space decoder
    y_n, err_n = y * s, (y - recon) * s
    for j in range(5):
        assert result.fired_tokens[j] > 0
        for m, rows in enumerate((slice(0, 2), slice(2, 4))):
            own = W[j, rows].flatten()
            k_rows = rows if decoder_model is None else (slice(0, 2), slice(2, 4))[decoder_model]
            d = W[j, k_rows].flatten()
            target_err = err_n[:, rows].flatten(1) + f[:, j:j + 1] * own  # own contribution added back
            torch.testing.assert_close(result.beta_activations[j, m].item(), naive_beta(f[:, j], y_n[:, rows].flatten(1), d))
            torch.testing.assert_close(result.beta_error[j, m].item(), naive_beta(f[:, j], target_err, d))
    torch.testing.assert_close(result.ratios("error"), result.beta_error[:, 0] / result.beta_error[:, 1])


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    cc = diff_crosscoder()
    scaling = latent_scaling(cc, [(torch.randn(9, 2, D).double(), torch.randn(9, 4, D).double())])
    written = draw_diffing_plots(tmp_path, cc, scaling)
    assert [p.name for p in written] == ["diff_relative_norm.png", "diff_decoder_cosine.png", "diff_beta_ratio.png"]
    assert all(p.stat().st_size > 1000 for p in written)
