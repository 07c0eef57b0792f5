"""Evals against a naive recomputation on the same batch."""

import pytest
import torch
import torch.nn.functional as F
from helpers import make_runner_config

from hf_crosscoder import ActivationsStore, Crosscoder, evals
from hf_crosscoder.evals import evaluate
from hf_crosscoder.hooks import splice


def _setup(tiny_model_dir, text_dataset_path, **overrides):
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, **overrides)
    torch.manual_seed(0)
    crosscoder = Crosscoder(cfg.crosscoder_config()).eval()
    return cfg, crosscoder


@pytest.mark.parametrize("one_prompt_per_forward", [False, True])
def test_metrics_match_naive_recomputation(tiny_model_dir, text_dataset_path, monkeypatch, one_prompt_per_forward):
    # CE evals run the LM over groups of prompts (bounded logits); one prompt per group must give the
    # same sums as the whole batch at once
    if one_prompt_per_forward:
        monkeypatch.setattr(evals, "LOGITS_CHUNK_ELEMENTS", 1)
    cfg, cc = _setup(tiny_model_dir, text_dataset_path)
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1)

    store = ActivationsStore(cfg, device="cpu")  # same seed: the same eval batch
    tokens = store.next_tokens()
    acts_in, acts_out, keep = store.activations_from_tokens(tokens)
    y = acts_out[keep].double()
    with torch.no_grad():
        f = cc.encode(acts_in[keep])
        r = cc.decode(f).double()
    for j, hook in enumerate(cfg.hook_names_out):
        sse = ((y[:, j] - r[:, j]) ** 2).sum()
        sst = ((y[:, j] - y[:, j].mean(0)) ** 2).sum()
        assert abs(metrics[f"fvu_normalized/{hook}"] - (sse / sst).item()) < 1e-6
    sse_all = ((y - r) ** 2).sum()
    sst_all = ((y - y.mean(0)) ** 2).sum()
    assert abs(metrics["fvu_normalized"] - (sse_all / sst_all).item()) < 1e-6
    assert abs(metrics["l0"] - (f > 0).sum(-1).double().mean().item()) < 1e-6
    density = (f > 0).double().mean(0)
    assert abs(metrics["dead_fraction"] - (density == 0).double().mean().item()) < 1e-9
    assert abs(metrics["dense_fraction"] - (density > 0.1).double().mean().item()) < 1e-9

    model = store.model
    with torch.no_grad():
        clean = model(tokens).logits
        ce_clean = F.cross_entropy(clean[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        assert abs(metrics["ce_loss_clean"] - ce_clean.item()) < 1e-4
        hook = cfg.hook_names_out[0]
        recon_all = torch.zeros_like(acts_out)
        recon_all[keep] = cc.decode(f).float()
        raw = (recon_all[:, 0] / store.scale_out[0]).view(*tokens.shape, -1)
        mask = keep.view(*tokens.shape, 1)
        with splice(model, {hook: lambda a: torch.where(mask, raw, a)}):
            spliced = model(tokens).logits
        with splice(model, {hook: torch.zeros_like}):
            zero = model(tokens).logits
    ce = lambda logits: F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()  # noqa: E731
    assert abs(metrics[f"ce_loss_spliced/{hook}"] - ce(spliced)) < 1e-4
    assert abs(metrics[f"ce_loss_zero_ablated/{hook}"] - ce(zero)) < 1e-4
    score = (ce(zero) - ce(spliced)) / (ce(zero) - ce_clean.item())
    assert abs(metrics[f"ce_loss_score/{hook}"] - score) < 1e-4
    kl = F.kl_div(F.log_softmax(spliced[:, :-1], -1), F.log_softmax(clean[:, :-1], -1), log_target=True,
                  reduction="sum")
    assert abs(metrics[f"kl_div/{hook}"] - kl.item() / (tokens.shape[0] * (tokens.shape[1] - 1))) < 1e-4


def test_perfect_reconstruction_scores_one(tiny_model_dir, text_dataset_path):
    """A skip crosscoder with identity skip and no latents reconstructs exactly: FVU 0, CE score 1."""
    hooks = ["blocks.1.hook_resid_post"]
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, architecture="skip_crosscoder",
                     hook_names_in=hooks, hook_names_out=hooks)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_skip.copy_(torch.eye(cfg.d_model))
        cc.b_enc.fill_(-1e6)  # no latent fires
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1)
    assert metrics["fvu_normalized"] < 1e-10
    assert abs(metrics[f"ce_loss_score/{hooks[0]}"] - 1) < 1e-5
    assert metrics[f"kl_div/{hooks[0]}"] < 1e-6
    assert metrics["dead_fraction"] == 1.0 and metrics["l0"] == 0


def test_causal_lm_detection_covers_gpt2_and_excludes_encoders():
    # GPT-2's LM class is GPT2LMHeadModel, not *ForCausalLM: it still gets CE metrics; BERT does not
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    assert evals.is_causal_lm(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)))
    assert not evals.is_causal_lm(BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, vocab_size=32)))
    assert not evals.is_causal_lm(None)


def _ce(logits, tokens):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).item()


def test_all_output_hooks_spliced_at_once_match_a_naive_splice(tiny_model_dir, text_dataset_path):
    """The replacement model's CE: every output hook replaced in one forward, against a hand-made splice."""
    hooks = ["blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, hook_names_in=["blocks.1.ln2.hook_normalized",
                     "blocks.2.ln2.hook_normalized"], hook_names_out=hooks, layer_structure="per_layer")
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1)
    store = ActivationsStore(cfg, device="cpu")  # same seed: the same eval batch
    tokens = store.next_tokens()
    acts_in, acts_out, keep = store.activations_from_tokens(tokens)
    recon = torch.zeros_like(acts_out)
    with torch.no_grad():
        recon[keep] = cc(acts_in[keep]).reconstruction.view_as(acts_out[keep])
        mask = keep.view(*tokens.shape, 1)
        raws = [(recon[:, j] / store.scale_out[j]).view(*tokens.shape, -1) for j in range(2)]
        with splice(store.model, {hooks[0]: lambda a: torch.where(mask, raws[0], a),
                                  hooks[1]: lambda a: torch.where(mask, raws[1], a)}):
            spliced = store.model(tokens).logits
        with splice(store.model, {hooks[0]: torch.zeros_like, hooks[1]: torch.zeros_like}):
            zero = store.model(tokens).logits
        clean = store.model(tokens).logits
    assert abs(metrics["ce_loss_spliced_all"] - _ce(spliced, tokens)) < 1e-4
    assert abs(metrics["ce_loss_zero_ablated_all"] - _ce(zero, tokens)) < 1e-4
    kl = F.kl_div(F.log_softmax(spliced[:, :-1], -1), F.log_softmax(clean[:, :-1], -1), log_target=True,
                  reduction="sum").item() / (tokens.shape[0] * (tokens.shape[1] - 1))
    assert abs(metrics["kl_div_all"] - kl) < 1e-4
    # replacing both hooks is not replacing either one
    assert metrics["kl_div_all"] > max(metrics[f"kl_div/{h}"] for h in hooks) + 1e-3
    score = (metrics["ce_loss_zero_ablated_all"] - metrics["ce_loss_spliced_all"]) / (
        metrics["ce_loss_zero_ablated_all"] - metrics["ce_loss_clean"])
    assert abs(metrics["ce_loss_score_all"] - score) < 1e-9


@pytest.mark.parametrize("exact", [True, False], ids=["identity", "zero"])
def test_all_at_once_splice_of_an_exact_and_a_zero_reconstruction(tiny_model_dir, text_dataset_path, exact):
    """Per-layer identity skips and no latents: the replacement model is the model (CE clean, KL 0, score
    1); all-zero outputs: it is the zero ablation of every hook at once (score 0)."""
    hooks = ["blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out", "blocks.3.hook_mlp_out"]
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, architecture="skip_crosscoder", hook_names_in=hooks,
                     hook_names_out=hooks, layer_structure="per_layer", d_sae=3 * 16,
                     exclude_special_tokens=False)  # every position spliced, as the zero ablation
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.b_enc.fill_(-1e6)  # no latent fires
        cc.W_skip.copy_(torch.eye(cfg.d_model).expand(3, -1, -1) if exact else torch.zeros_like(cc.W_skip))
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1)
    if exact:
        assert abs(metrics["ce_loss_spliced_all"] - metrics["ce_loss_clean"]) < 1e-5
        assert metrics["kl_div_all"] < 1e-6 and abs(metrics["ce_loss_score_all"] - 1) < 1e-5
    else:
        assert abs(metrics["ce_loss_spliced_all"] - metrics["ce_loss_zero_ablated_all"]) < 1e-6
        assert abs(metrics["ce_loss_score_all"]) < 1e-5
    assert abs(metrics["ce_loss_zero_ablated_all"] - metrics["ce_loss_clean"]) > 1e-3  # ablating all matters
