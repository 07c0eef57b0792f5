"""Evals against float64 references computed by SAEBench's definitions on the same batch."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_runner_config

from hf_crosscoder import ActivationsStore, Crosscoder, evals
from hf_crosscoder.evals import evaluate, feature_stats, json_metrics, max_cosine_sim
from hf_crosscoder.hooks import splice


def _setup(tiny_model_dir, text_dataset_path, **overrides):
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, **overrides)
    torch.manual_seed(0)
    crosscoder = Crosscoder(cfg.crosscoder_config()).eval()
    return cfg, crosscoder


def _close(value, reference, tol=1e-6):
    assert abs(value - float(reference)) <= tol * max(1.0, abs(float(reference))), (value, float(reference))


def _naive_max_cos(vectors):
    vectors = vectors.detach().double()
    unit = vectors / vectors.norm(dim=-1, keepdim=True)
    sims = unit @ unit.T
    sims.fill_diagonal_(-math.inf)
    return sims.max(1).values


def _eval_batch(cfg, cc):
    store = ActivationsStore(cfg, device="cpu")  # same seed: the same eval batch as evaluate's
    tokens = store.next_eval_tokens()
    acts_in, acts_out, keep = store.activations_from_tokens(tokens)
    with torch.no_grad():
        f = cc.encode(acts_in[keep]).double()
        r = cc.decode(f.float()).double().view_as(acts_out[keep])
    return store, tokens, acts_out, keep, acts_out[keep].double(), f, r


def _check_reconstruction(metrics, cfg, store, y, f, r):
    for j, hook in enumerate(cfg.hook_names_out):
        yj, rj, s = y[:, j], r[:, j], store.scale_out[j].double()
        sse, sst = ((yj - rj) ** 2).sum(), ((yj - yj.mean(0)) ** 2).sum()
        _close(metrics[f"explained_variance/{hook}"], 1 - sse / sst)
        _close(metrics[f"mse/{hook}"], ((yj / s - rj / s) ** 2).sum(-1).mean())  # raw scale
        _close(metrics[f"mse_normalized/{hook}"], ((yj - rj) ** 2).sum(-1).mean())
        _close(metrics[f"cossim/{hook}"], F.cosine_similarity(yj, rj, dim=-1).mean())
        _close(metrics[f"l2_ratio/{hook}"], (rj.norm(dim=-1) / yj.norm(dim=-1)).mean())
        _close(metrics[f"relative_reconstruction_bias/{hook}"],
               (rj.norm(dim=-1) ** 2).mean() / (yj * rj).sum(-1).mean())
    _close(metrics["explained_variance"], 1 - ((y - r) ** 2).sum() / ((y - y.mean(0)) ** 2).sum())
    _close(metrics["l0"], (f != 0).sum(-1).double().mean())
    _close(metrics["l1"], f.sum(-1).mean())
    density = (f > 0).double().mean(0)
    _close(metrics["frac_alive"], (density > 0).double().mean())
    _close(metrics["freq_over_1_percent"], (density > 0.01).double().mean())
    _close(metrics["freq_over_10_percent"], (density > 0.1).double().mean())
    assert torch.allclose(metrics["feature_density"].double(), density)


def _check_ce(metrics, cfg, cc, store, tokens, acts_out, keep, f):
    model, hook = store.model, cfg.hook_names_out[0]
    counted = keep.view(tokens.shape)[:, :-1].double()  # positions whose input token is not special
    with torch.no_grad():
        recon_all = torch.zeros_like(acts_out)
        recon_all[keep] = cc.decode(f.float()).view_as(acts_out[keep]).float()
        raw = (recon_all[:, 0] / store.scale_out[0]).view(*tokens.shape, -1)
        mask = keep.view(*tokens.shape, 1)
        clean = model(tokens).logits.double()
        with splice(model, {hook: lambda a: torch.where(mask, raw, a)}):
            spliced = model(tokens).logits.double()
        with splice(model, {hook: torch.zeros_like}):
            zero = model(tokens).logits.double()

    def ce(logits):
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
        return (losses.view_as(counted) * counted).sum() / counted.sum()

    def kl(logits):
        p = F.log_softmax(clean[:, :-1], -1)
        per_position = (p.exp() * (p - F.log_softmax(logits[:, :-1], -1))).sum(-1)
        return (per_position * counted).sum() / counted.sum()

    tol = 1e-5
    _close(metrics["ce_loss_without_sae"], ce(clean), tol)
    _close(metrics[f"ce_loss_with_sae/{hook}"], ce(spliced), tol)
    _close(metrics[f"ce_loss_with_ablation/{hook}"], ce(zero), tol)
    _close(metrics[f"ce_loss_score/{hook}"], (ce(zero) - ce(spliced)) / (ce(zero) - ce(clean)), 1e-4)
    _close(metrics[f"kl_div_with_sae/{hook}"], kl(spliced), tol)
    _close(metrics[f"kl_div_with_ablation/{hook}"], kl(zero), tol)
    _close(metrics[f"kl_div_score/{hook}"], (kl(zero) - kl(spliced)) / kl(zero), 1e-4)


@pytest.mark.parametrize("one_prompt_per_forward", [False, True])
def test_metrics_match_float64_references(tiny_model_dir, text_dataset_path, monkeypatch, one_prompt_per_forward):
    # CE evals run the LM over groups of prompts (bounded logits); one prompt per group must give the
    # same sums as the whole batch at once
    if one_prompt_per_forward:
        monkeypatch.setattr(evals, "LOGITS_CHUNK_ELEMENTS", 1)
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, n_eval_batches=1)
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1)
    store, tokens, acts_out, keep, y, f, r = _eval_batch(cfg, cc)
    assert metrics["n_eval_tokens"] == len(y) and not keep.all()  # BOS positions are left out
    _check_reconstruction(metrics, cfg, store, y, f, r)
    _check_ce(metrics, cfg, cc, store, tokens, acts_out, keep, f)
    enc, dec = _naive_max_cos(cc.W_enc.flatten(0, 1).T), _naive_max_cos(cc.W_dec.flatten(1))
    _close(metrics["average_max_encoder_cosine_sim"], enc.mean())
    _close(metrics["average_max_decoder_cosine_sim"], dec.mean())
    assert torch.allclose(metrics["max_encoder_cosine_sim"].double(), enc, atol=1e-6)
    for j, hook in enumerate(cfg.hook_names_out):
        _close(metrics[f"average_max_decoder_cosine_sim/{hook}"], _naive_max_cos(cc.W_dec[:, j]).mean())


def test_json_metrics_hold_numbers_or_null_and_stats_are_tensors(tiny_model_dir, text_dataset_path):
    cfg, cc = _setup(tiny_model_dir, text_dataset_path)
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1)
    metrics["undefined"] = math.nan
    plain = json_metrics(metrics)
    assert plain["undefined"] is None and "feature_density" not in plain
    assert all(v is None or isinstance(v, (int, float)) for v in plain.values())
    stats = feature_stats(metrics)
    assert set(stats) == {"feature_density", "max_encoder_cosine_sim", "max_decoder_cosine_sim",
                          *(f"max_decoder_cosine_sim/{h}" for h in cfg.hook_names_out)}
    assert all(t.shape == (cfg.d_sae,) for t in stats.values())


def test_max_cosine_sim_in_blocks_and_cross_layer_vectors(tiny_model_dir, text_dataset_path):
    torch.manual_seed(1)
    v = torch.randn(37, 5)
    assert torch.allclose(max_cosine_sim(v, chunk=8).double(), _naive_max_cos(v), atol=1e-6)
    # cross_layer: group i reads input hook i only and writes output hooks i..; its encoder vectors are zero
    # outside its own hook, and a hook's decoder statistic only counts the latents that write it
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(2)]
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, layer_structure="cross_layer", hook_names_in=hooks,
                     hook_names_out=hooks)
    enc = evals.encoder_vectors(cc)
    G, d = cfg.d_sae // 2, cfg.d_model
    assert torch.equal(enc[:G, :d], cc.W_enc[0].T) and (enc[:G, d:] == 0).all() and (enc[G:, :d] == 0).all()
    m = evals.cosine_metrics(cc)
    later = cc.structure.decoder_vectors(cc.W_dec)[:, 0]
    _close(m[f"average_max_decoder_cosine_sim/{hooks[0]}"], _naive_max_cos(later[:G]).mean())
    assert torch.isnan(m[f"max_decoder_cosine_sim/{hooks[0]}"][G:]).all()  # group 1 does not write hook 0


def test_perfect_reconstruction_scores_one(tiny_model_dir, text_dataset_path):
    """A skip crosscoder with identity skip and no latents reconstructs exactly: EV 1, CE and KL scores 1."""
    hooks = ["blocks.1.hook_resid_post"]
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, architecture="skip_crosscoder",
                     hook_names_in=hooks, hook_names_out=hooks)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_skip.copy_(torch.eye(cfg.d_model))
        cc.b_enc.fill_(-1e6)  # no latent fires
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1, weight_metrics=False)
    assert abs(metrics["explained_variance"] - 1) < 1e-10 and abs(metrics[f"cossim/{hooks[0]}"] - 1) < 1e-6
    assert abs(metrics[f"l2_ratio/{hooks[0]}"] - 1) < 1e-6
    assert abs(metrics[f"relative_reconstruction_bias/{hooks[0]}"] - 1) < 1e-6
    assert abs(metrics[f"ce_loss_score/{hooks[0]}"] - 1) < 1e-5 and abs(metrics[f"kl_div_score/{hooks[0]}"] - 1) < 1e-5
    assert metrics[f"kl_div_with_sae/{hooks[0]}"] < 1e-6
    assert metrics["frac_alive"] == 0.0 and metrics["l0"] == 0 and metrics["l1"] == 0
    assert "average_max_encoder_cosine_sim" not in metrics


def test_causal_lm_detection_covers_gpt2_and_excludes_encoders():
    # GPT-2's LM class is GPT2LMHeadModel, not *ForCausalLM: it still gets CE metrics; BERT does not
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    assert evals.is_causal_lm(GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=32)))
    assert not evals.is_causal_lm(BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                       intermediate_size=32, vocab_size=32)))
    assert not evals.is_causal_lm(None)


def _ce(logits, tokens, keep=None):
    """Mean next-token CE over the predicted positions whose input token the evals count (`keep`)."""
    per = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    counted = torch.ones_like(per) if keep is None else keep.view(*tokens.shape)[:, :-1].flatten().double()
    return ((per * counted).sum() / counted.sum()).item()


def test_all_output_hooks_spliced_at_once_match_a_naive_splice(tiny_model_dir, text_dataset_path):
    """The replacement model's CE: every output hook replaced in one forward, against a hand-made splice."""
    hooks = ["blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out"]
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, hook_names_in=["blocks.1.ln2.hook_normalized",
                     "blocks.2.ln2.hook_normalized"], hook_names_out=hooks, layer_structure="per_layer")
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1)
    store = ActivationsStore(cfg, device="cpu")  # the same held-out eval batch
    tokens = store.next_eval_tokens()
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
    assert abs(metrics["ce_loss_with_sae_all"] - _ce(spliced, tokens, keep)) < 1e-4
    assert abs(metrics["ce_loss_with_ablation_all"] - _ce(zero, tokens, keep)) < 1e-4
    counted = keep.view(*tokens.shape)[:, :-1, None].float()  # predictions from non-special input tokens
    kl = (F.kl_div(F.log_softmax(spliced[:, :-1], -1), F.log_softmax(clean[:, :-1], -1), log_target=True,
                   reduction="none") * counted).sum().item() / counted.sum().item()
    assert abs(metrics["kl_div_with_sae_all"] - kl) < 1e-4
    # replacing both hooks is not replacing either one
    assert metrics["kl_div_with_sae_all"] > max(metrics[f"kl_div_with_sae/{h}"] for h in hooks) + 1e-3
    score = (metrics["ce_loss_with_ablation_all"] - metrics["ce_loss_with_sae_all"]) / (
        metrics["ce_loss_with_ablation_all"] - metrics["ce_loss_without_sae"])
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
        assert abs(metrics["ce_loss_with_sae_all"] - metrics["ce_loss_without_sae"]) < 1e-5
        assert metrics["kl_div_with_sae_all"] < 1e-6 and abs(metrics["ce_loss_score_all"] - 1) < 1e-5
    else:
        assert abs(metrics["ce_loss_with_sae_all"] - metrics["ce_loss_with_ablation_all"]) < 1e-6
        assert abs(metrics["ce_loss_score_all"]) < 1e-5
    assert abs(metrics["ce_loss_with_ablation_all"] - metrics["ce_loss_without_sae"]) > 1e-3  # ablating all matters


@pytest.mark.parametrize("structure", ["cross_layer", "per_layer"])
def test_closed_loop_replacement_model_equals_the_fixed_point_of_open_loop_splices(tiny_model_dir, text_dataset_path,
                                                                                 structure):
    """The closed-loop replacement model (each output rebuilt from the same forward's spliced inputs) against a
    naive reference: open-loop splices iterated, each pass's reconstructions from the previous pass's inputs;
    with L layers the inputs stop changing after L passes (layer i's input depends on outputs < i only)."""
    L = 3
    hooks_in = [f"blocks.{i}.ln2.hook_normalized" for i in range(L)]
    hooks_out = [f"blocks.{i}.hook_mlp_out" for i in range(L)]
    cfg, cc = _setup(tiny_model_dir, text_dataset_path, hook_names_in=hooks_in, hook_names_out=hooks_out,
                     layer_structure=structure, d_sae=L * 16, architecture="topk_crosscoder", k=4)
    with torch.no_grad():
        cc.W_dec.mul_(20.0)  # reconstructions far from the truth, so that the loop visibly compounds
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1, weight_metrics=False)
    store = ActivationsStore(cfg, device="cpu")
    tokens = store.next_eval_tokens()
    _, _, keep = store.activations_from_tokens(tokens)
    mask, model = keep.view(*tokens.shape, 1), store.model
    with torch.no_grad():
        def inputs_of(replacements):
            seen = {}
            capture = {h: (lambda a, h=h: seen.setdefault(h, a)) for h in hooks_in}
            with splice(model, {**replacements, **capture}):
                logits = model(tokens).logits
            return torch.stack([seen[h] for h in hooks_in], 2).flatten(0, 1), logits

        def outputs_from(x_raw):
            recon = cc(x_raw * store.scale_in[:, None]).reconstruction / store.scale_out[:, None]
            return {h: (lambda a, j=j: torch.where(mask, recon[:, j].view_as(a), a)) for j, h in enumerate(hooks_out)}

        x, clean = inputs_of({})
        for _ in range(L + 1):
            x, logits = inputs_of(outputs_from(x))
    assert abs(metrics["ce_loss_with_sae_replacement"] - _ce(logits, tokens, keep)) < 1e-4
    # open loop (clean inputs) is another number: the loop compounds the errors
    assert abs(metrics["ce_loss_with_sae_replacement"] - metrics["ce_loss_with_sae_all"]) > 1e-3
    assert metrics["ce_loss_with_ablation_replacement"] == metrics["ce_loss_with_ablation_all"]


def test_no_replacement_model_for_dense_or_shared_hooks(tiny_model_dir, text_dataset_path):
    cfg, cc = _setup(tiny_model_dir, text_dataset_path)
    metrics = evaluate(cc, ActivationsStore(cfg, device="cpu"), n_batches=1, weight_metrics=False)
    assert "ce_loss_with_sae_all" in metrics and "ce_loss_with_sae_replacement" not in metrics
