"""SAELens interop without sae-lens: export -> import round trips, and the exported folders checked
against a re-statement of SAELens 6.x's inference math (sae_lens/saes/*.py: encode / decode)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hf_crosscoder import Crosscoder, CrosscoderConfig
from hf_crosscoder.saelens import export_to_saelens, import_from_saelens

D, S = 16, 64
# what SAE.save_model writes; SAE.load_from_disk raises KeyError without architecture, d_in, d_sae or dtype
SAE_CFG_KEYS = {"architecture", "d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input",
                "normalize_activations", "reshape_activations", "metadata"}


def trained_like(architecture: str, hook_out: str = "blocks.0.hook_resid_post", seed: int = 0) -> Crosscoder:
    """A crosscoder with non-trivial weights, biases, thresholds and a folded normalization."""
    torch.manual_seed(seed)
    cc = Crosscoder(CrosscoderConfig(architecture=architecture, d_model=D, d_sae=S, k=4,
                                     hook_names_in=["blocks.0.hook_resid_post"], hook_names_out=[hook_out],
                                     model_name="EleutherAI/pythia-70m"))
    with torch.no_grad():
        for p in cc.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if architecture == "jumprelu_crosscoder":
            cc.theta.uniform_(-0.05, 0.3)  # some negative: used as relu(theta)
    cc.fold_activation_norm_scaling([2.0], [0.5])
    if architecture == "batchtopk_crosscoder":
        cc.train()
        cc(torch.randn(64, D))  # sets the inference threshold
    return cc.eval()


def saelens_encode(cfg: dict, w: dict, x: torch.Tensor, batch: bool = False) -> torch.Tensor:
    """SAELens 6.54 feature activations (SAE.process_sae_in, *SAE.encode; BatchTopK training SAEs
    encode by top k * batch over the batch when `batch`)."""
    arch = cfg["architecture"]
    sae_in = x - w["b_dec"] * cfg.get("apply_b_dec_to_input", True) if "transcoder" not in arch else x
    h = sae_in @ w["W_enc"] + w["b_enc"]
    if arch in ("standard", "transcoder", "skip_transcoder"):
        return h.relu()
    if arch in ("jumprelu", "jumprelu_transcoder"):  # mask on the raw threshold, not relu'd
        return h.relu() * (h > w["threshold"])
    if cfg["rescale_acts_by_decoder_norm"]:
        h = h * w["W_dec"].norm(dim=-1)
    if arch == "topk":
        top = h.topk(cfg["k"], dim=-1)
        return torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
    assert arch in ("batchtopk", "matryoshka_batchtopk") and batch, arch
    top = h.relu().flatten().topk(int(cfg["k"] * h.shape[0]))
    return torch.zeros_like(h).flatten().scatter(-1, top.indices, top.values).view(h.shape)


def saelens_forward(folder, x: torch.Tensor, batch: bool = False) -> torch.Tensor:
    """SAELens 6.54 inference (*SAE.encode, *SAE.decode, SkipTranscoder.forward) on a saved folder."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae_weights.safetensors")
    f = saelens_encode(cfg, w, x, batch)
    if cfg.get("rescale_acts_by_decoder_norm"):
        f = f / w["W_dec"].norm(dim=-1)
    out = f @ w["W_dec"] + w["b_dec"]
    return out + x @ w["W_skip"].T if cfg["architecture"] == "skip_transcoder" else out


def save_saelens(folder, cfg: dict, weights: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps(cfg))


def random_saelens_weights(seed: int, **extra) -> dict:
    """Weights as training leaves them: decoder rows of very unequal norm, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(D, S, generator=g) * 0.4, "b_enc": torch.randn(S, generator=g) * 0.1,
         "W_dec": torch.randn(S, D, generator=g) / D ** 0.5 * (torch.rand(S, 1, generator=g) * 2.8 + 0.2),
         "b_dec": torch.randn(D, generator=g) * 0.5}
    return {**w, **extra}


def fold_for_inference(w: dict) -> dict:
    """BatchTopKTrainingSAE.save_inference_model with rescale_acts_by_decoder_norm (topk_sae.py
    _fold_norm_topk, batchtopk_sae.py): decoder rows to unit norm, the norms into W_enc and b_enc, and
    topk_threshold as the JumpReLU threshold of every latent."""
    dn = w["W_dec"].norm(dim=-1)
    return {"W_enc": w["W_enc"] * dn, "b_enc": w["b_enc"] * dn, "W_dec": w["W_dec"] / dn[:, None],
            "b_dec": w["b_dec"], "threshold": torch.full((S,), float(w["topk_threshold"]))}


@pytest.mark.parametrize("architecture,saelens_arch", [
    ("crosscoder", "standard"), ("jumprelu_crosscoder", "jumprelu"), ("topk_crosscoder", "topk"),
    ("skip_crosscoder", "skip_transcoder"), ("batchtopk_crosscoder", "jumprelu")])
def test_round_trip_identical_and_matches_saelens_math(tmp_path, architecture, saelens_arch):
    cc = trained_like(architecture)
    export_to_saelens(cc, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == saelens_arch and SAE_CFG_KEYS <= set(cfg)
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["metadata"]["model_name"] == "EleutherAI/pythia-70m"
    assert cfg["metadata"]["sae_lens_version"] >= "6" and cfg["normalize_activations"] == "none"
    weights = load_file(tmp_path / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (D, S) and weights["W_dec"].shape == (S, D)
    assert weights["b_enc"].shape == (S,) and weights["b_dec"].shape == (D,)

    x = torch.randn(200, D) * 3
    expected = cc(x)
    torch.testing.assert_close(saelens_forward(tmp_path, x), expected.reconstruction, rtol=1e-5, atol=1e-5)
    back = import_from_saelens(tmp_path).eval()
    out = back(x)
    if architecture != "batchtopk_crosscoder":  # batchtopk comes back as its JumpReLU equivalent
        assert back.config.architecture == architecture
        assert torch.equal(out.reconstruction, expected.reconstruction)
        assert torch.equal(out.feature_acts, expected.feature_acts)
    else:
        assert back.config.architecture == "jumprelu_crosscoder"
        torch.testing.assert_close(out.reconstruction, expected.reconstruction, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("architecture,saelens_arch", [
    ("crosscoder", "transcoder"), ("jumprelu_crosscoder", "jumprelu_transcoder")])
def test_transcoder_round_trip(tmp_path, architecture, saelens_arch):
    cc = trained_like(architecture, hook_out="blocks.0.hook_mlp_out")
    export_to_saelens(cc, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == saelens_arch and cfg["d_out"] == D
    assert cfg["metadata"]["hook_name_out"] == cfg["hook_name_out"] == "blocks.0.hook_mlp_out"
    x = torch.randn(100, D)
    torch.testing.assert_close(saelens_forward(tmp_path, x), cc(x).reconstruction, rtol=1e-5, atol=1e-5)
    back = import_from_saelens(tmp_path)
    assert back.config.hook_names_out == ["blocks.0.hook_mlp_out"]
    assert torch.equal(back(x).reconstruction, cc(x).reconstruction)


def test_import_folds_apply_b_dec_to_input(tmp_path):
    """A SAELens-trained standard SAE subtracts b_dec before encoding; the import folds it into b_enc."""
    torch.manual_seed(1)
    weights = {"W_enc": torch.randn(D, S) * 0.2, "W_dec": torch.randn(S, D) * 0.2, "b_enc": torch.randn(S) * 0.1,
               "b_dec": torch.randn(D)}
    save_file(weights, tmp_path / "sae_weights.safetensors")
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.5.0", "hook_name": "blocks.3.hook_resid_pre", "model_name": "gpt2"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cc = import_from_saelens(tmp_path)
    assert cc.config.hook_names_in == ["blocks.3.hook_resid_pre"] and cc.config.model_name == "gpt2"
    x = torch.randn(50, D)
    torch.testing.assert_close(cc(x).reconstruction, saelens_forward(tmp_path, x), rtol=1e-5, atol=1e-5)


def test_import_saelens_default_topk_ranks_raw_pre_activations(tmp_path):
    """SAELens's own TopK training writes rescale_acts_by_decoder_norm=False and decoder rows of unequal
    norm: it imports as topk_ranking='pre_activation' with identical outputs."""
    torch.manual_seed(2)
    W_dec = torch.randn(S, D) * torch.linspace(0.1, 3.0, S)[:, None]  # very unequal row norms
    save_file({"W_enc": torch.randn(D, S), "W_dec": W_dec, "b_enc": torch.randn(S) * 0.1, "b_dec": torch.randn(D)},
              tmp_path / "sae_weights.safetensors")
    cfg = {"architecture": "topk", "d_in": D, "d_sae": S, "k": 4, "rescale_acts_by_decoder_norm": False,
           "apply_b_dec_to_input": True, "metadata": {"sae_lens_version": "6.1.0", "hook_name": "blocks.0.hook_mlp_out"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cc = import_from_saelens(tmp_path)
    assert cc.config.topk_ranking == "pre_activation"
    x = torch.randn(200, D)
    # the b_dec fold is done in float64 (one rounding), so decoder rows of norm up to ~12 still give 1e-5
    torch.testing.assert_close(cc(x).reconstruction, saelens_forward(tmp_path, x), rtol=1e-5, atol=1e-5)
    # and the ranking matters here: decoder-scaled ranking picks other latents
    other = import_from_saelens(tmp_path)
    other.config.topk_ranking = "decoder_scaled"
    assert not torch.equal(other(x).feature_acts != 0, cc(x).feature_acts != 0)


def test_pre_activation_topk_exports_without_rescaling(tmp_path):
    torch.manual_seed(3)
    cc = Crosscoder(CrosscoderConfig(architecture="topk_crosscoder", topk_ranking="pre_activation", d_model=D,
                                     d_sae=S, k=4, hook_names_in=["blocks.0.hook_resid_post"],
                                     hook_names_out=["blocks.0.hook_resid_post"]))
    with torch.no_grad():
        cc.W_dec.mul_(torch.linspace(0.1, 3.0, S)[:, None, None])
    export_to_saelens(cc.eval(), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["rescale_acts_by_decoder_norm"] is False
    x = torch.randn(100, D)
    torch.testing.assert_close(saelens_forward(tmp_path, x), cc(x).reconstruction, rtol=1e-5, atol=1e-5)
    back = import_from_saelens(tmp_path)
    assert back.config.topk_ranking == "pre_activation"
    assert torch.equal(back(x).reconstruction, cc(x).reconstruction)


def test_multi_hook_and_unfolded_export_refused(tmp_path):
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    cc = Crosscoder(CrosscoderConfig(d_model=D, d_sae=S, hook_names_in=hooks, hook_names_out=hooks))
    with pytest.raises(ValueError, match="one input and one output hook"):
        export_to_saelens(cc, tmp_path)
    sae = Crosscoder(CrosscoderConfig(d_model=D, d_sae=S, hook_names_in=hooks[:1], hook_names_out=hooks[:1],
                                      activation_scale_in=[2.0], activation_scale_out=[2.0]))
    with pytest.raises(ValueError, match="fold_activation_norm_scaling"):
        export_to_saelens(sae, tmp_path)
    topk_transcoder = trained_like("topk_crosscoder", hook_out="blocks.0.hook_mlp_out")
    with pytest.raises(ValueError, match="no transcoder"):
        export_to_saelens(topk_transcoder, tmp_path)


def test_import_refuses_runtime_normalization(tmp_path):
    export_to_saelens(trained_like("crosscoder"), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="normalize_activations"):
        import_from_saelens(tmp_path)
    with pytest.raises(ValueError, match="not a SAELens SAE folder"):
        import_from_saelens(tmp_path / "missing")


def test_import_jumprelu_with_negative_thresholds(tmp_path):
    """SAELens 6.54's JumpReLUSAE masks on `hidden_pre > threshold` (raw, possibly negative) times relu:
    the same as our relu(theta) gate."""
    w = random_saelens_weights(4, threshold=torch.linspace(-0.5, 1.0, S))
    cfg = {"architecture": "jumprelu", "d_in": D, "d_sae": S, "dtype": "float32", "apply_b_dec_to_input": True,
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.hook_resid_post"}}
    save_saelens(tmp_path, cfg, w)
    cc = import_from_saelens(tmp_path)
    x = torch.randn(200, D) * 2
    out = cc(x)
    torch.testing.assert_close(out.feature_acts, saelens_encode(cfg, w, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reconstruction, saelens_forward(tmp_path, x), rtol=1e-5, atol=1e-5)


def test_pre_6_topk_config_imports_as_topk(tmp_path):
    """SAELens < 6 wrote TopK as architecture 'standard' + activation_fn_str 'topk' + activation_fn_kwargs.k,
    flat (hook_point, no sae_lens_version); SAELens 6 loads that as topk, rescale_acts_by_decoder_norm=False."""
    w = random_saelens_weights(5)
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "dtype": "float32", "device": "cpu",
           "model_name": "gpt2", "hook_point": "blocks.2.hook_resid_pre", "hook_point_head_index": None,
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "normalize_activations": "none", "sae_lens_training_version": "3.13.0"}
    save_saelens(tmp_path, cfg, w)
    cc = import_from_saelens(tmp_path)
    assert (cc.config.architecture, cc.config.topk_ranking, cc.config.k) == ("topk_crosscoder", "pre_activation", 3)
    assert cc.config.hook_names_in == ["blocks.2.hook_resid_pre"]
    x = torch.randn(200, D) * 2
    as_topk = {**cfg, "architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": False}
    torch.testing.assert_close(cc(x).feature_acts, saelens_encode(as_topk, w, x), rtol=1e-5, atol=1e-5)
    # the same file with a 6.x version is what it says: a ReLU SAE (activation_fn is not a 6.x field)
    save_saelens(tmp_path, {**cfg, "metadata": {"sae_lens_version": "6.0.0"}}, w)
    assert import_from_saelens(tmp_path).config.architecture == "crosscoder"


@pytest.mark.parametrize("saelens_arch", ["batchtopk", "matryoshka_batchtopk"])
@pytest.mark.parametrize("rescale", [True, False])
def test_import_batchtopk_training_checkpoint(tmp_path, saelens_arch, rescale):
    """A SAELens trainer checkpoint (save_model of BatchTopKTrainingSAE / MatryoshkaBatchTopKTrainingSAE:
    k a float, topk_threshold a float64 scalar buffer in units of the ranked score, rescale by default)
    runs as batchtopk_crosscoder: batch top-k in training mode, and at inference the JumpReLU that
    SAELens's save_inference_model makes of it (the matryoshka nesting only adds training losses)."""
    w = random_saelens_weights(6)
    cfg = {"architecture": saelens_arch, "d_in": D, "d_sae": S, "dtype": "float32", "k": 4.0,
           "rescale_acts_by_decoder_norm": rescale, "apply_b_dec_to_input": True, "topk_threshold_lr": 0.01,
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.hook_resid_post",
                        "training_architecture": saelens_arch}}
    if saelens_arch == "matryoshka_batchtopk":
        cfg["matryoshka_widths"] = [16, S]
    x = torch.randn(256, D) * 2
    scores = saelens_encode({**cfg, "architecture": "topk", "k": S}, w, x)  # relu(h) (* ||W_dec||)
    w["topk_threshold"] = torch.tensor(float(scores.flatten().quantile(1 - 4 / S)), dtype=torch.float64)
    save_saelens(tmp_path / "ckpt", cfg, w)
    cc = import_from_saelens(tmp_path / "ckpt")
    ranking = "decoder_scaled" if rescale else "pre_activation"
    assert (cc.config.architecture, cc.config.topk_ranking, cc.config.k) == ("batchtopk_crosscoder", ranking, 4)
    dn = w["W_dec"].norm(dim=-1) if rescale else torch.ones(S)
    with torch.no_grad():
        trained = cc.train()(x)
        torch.testing.assert_close(trained.reconstruction, saelens_forward(tmp_path / "ckpt", x, batch=True),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(trained.feature_acts * dn, saelens_encode(cfg, w, x, batch=True),
                                   rtol=1e-5, atol=1e-5)
        inference = fold_for_inference(w) if rescale else {**{k: w[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")},
                                                           "threshold": torch.full((S,), float(w["topk_threshold"]))}
        save_saelens(tmp_path / "inference", {**cfg, "architecture": "jumprelu"}, inference)
        gated = cc.eval()(x)
        torch.testing.assert_close(gated.reconstruction, saelens_forward(tmp_path / "inference", x),
                                   rtol=1e-5, atol=1e-5)
        assert 2 < (gated.feature_acts > 0).sum(-1).float().mean() < 8  # the threshold gates ~k per token


@pytest.mark.parametrize("saelens_arch", ["gated", "abstopk", "jumprelu_skip_transcoder", "temporal"])
def test_import_refuses_saelens_architectures_we_lack(tmp_path, saelens_arch):
    cfg = {"architecture": saelens_arch, "d_in": D, "d_sae": S, "k": 4, "apply_b_dec_to_input": False,
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.0.hook_resid_post"}}
    save_saelens(tmp_path, cfg, random_saelens_weights(7))
    with pytest.raises(ValueError, match=f"'{saelens_arch}' has no hf_crosscoder equivalent"):
        import_from_saelens(tmp_path)


def test_import_refuses_pre_6_per_head_sae(tmp_path):
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "hook_point": "blocks.0.attn.hook_z",
           "hook_point_head_index": 3}
    save_saelens(tmp_path, cfg, random_saelens_weights(8))
    with pytest.raises(ValueError, match="per-head"):
        import_from_saelens(tmp_path)


def test_import_pre_6_finetuning_scaling_factor(tmp_path):
    """SAELens < 6 saved `scaling_factor` [d_sae] and, with cfg finetuning_scaling_factor=True, scaled the
    features by it before decoding (SAELens 6's loader renames it finetuning_scaling_factor; unused
    otherwise). The import folds it into W_dec."""
    sf = torch.linspace(0.5, 2.0, S)
    w = random_saelens_weights(9, scaling_factor=sf)
    cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "hook_point": "blocks.1.hook_resid_pre",
           "apply_b_dec_to_input": False, "finetuning_scaling_factor": True}
    save_saelens(tmp_path, cfg, w)
    x = torch.randn(50, D)
    expected = (x @ w["W_enc"] + w["b_enc"]).relu() * sf @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(import_from_saelens(tmp_path)(x).reconstruction, expected, rtol=1e-5, atol=1e-5)
    save_saelens(tmp_path, {**cfg, "finetuning_scaling_factor": False}, {**w, "scaling_factor": torch.ones(S)})
    torch.testing.assert_close(import_from_saelens(tmp_path)(x).reconstruction, saelens_forward(tmp_path, x),
                               rtol=1e-5, atol=1e-5)
