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


def saelens_forward(folder, x: torch.Tensor) -> torch.Tensor:
    """SAELens 6.x inference (SAE.process_sae_in, *SAE.encode, *SAE.decode, SkipTranscoder.forward)."""
    cfg = json.loads((folder / "cfg.json").read_text())
    w = load_file(folder / "sae_weights.safetensors")
    arch = cfg["architecture"]
    sae_in = x - w["b_dec"] * cfg["apply_b_dec_to_input"] if "transcoder" not in arch else x
    h = sae_in @ w["W_enc"] + w["b_enc"]
    W_dec = w["W_dec"]
    if arch in ("standard", "transcoder", "skip_transcoder"):
        f = h.relu()
    elif arch == "jumprelu":
        f = h.relu() * (h > w["threshold"].relu())
    elif arch == "jumprelu_transcoder":
        f = h.relu() * (h > w["threshold"])
    elif arch == "topk":
        if cfg["rescale_acts_by_decoder_norm"]:
            h = h * W_dec.norm(dim=-1)
        top = h.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(h).scatter(-1, top.indices, top.values.relu())
        if cfg["rescale_acts_by_decoder_norm"]:
            f = f / W_dec.norm(dim=-1)
    else:
        raise AssertionError(arch)
    out = f @ W_dec + w["b_dec"]
    return out + x @ w["W_skip"].T if arch == "skip_transcoder" else out


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
    # float32 rounding of the folded b_dec (decoder rows of norm up to ~12 here): 1e-4
    torch.testing.assert_close(cc(x).reconstruction, saelens_forward(tmp_path, x), rtol=1e-4, atol=1e-4)
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
