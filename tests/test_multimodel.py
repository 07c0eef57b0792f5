"""Model diffing's config and paired harvest: several models on the same tokens, model-major layers."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer
from helpers import D_MODEL, N_LAYERS, make_documents, make_runner_config
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_crosscoder import (
    CacheActivationsRunner,
    CacheActivationsRunnerConfig,
    Crosscoder,
    CrosscoderConfig,
    LanguageModelCrosscoderTrainingRunner,
)
from hf_crosscoder.activations import ActivationsStore
from hf_crosscoder.cli import parse_runner_config
from hf_crosscoder.config import layer_labels
from hf_crosscoder.evals import evaluate
from hf_crosscoder.harvest import LMActivationSource
from hf_crosscoder.hooks import capture_activations
from hf_crosscoder.multimodel import MultiModelActivationSource
from hf_crosscoder.usage import feature_activations, spliced

HOOKS = dict(hook_names_in=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
             hook_names_out=["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"])


def save_tiny(path, tokenizer, seed=1, hidden=D_MODEL, weights=True) -> str:
    """A tiny GPT-NeoX like conftest's (another seed); without `weights` only its config and tokenizer."""
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                           intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    if weights:
        torch.manual_seed(seed)
        GPTNeoXForCausalLM(config).save_pretrained(path)
    else:  # loading its weights would fail: a check that passes on this folder ran before the weights
        path.mkdir(parents=True)
        config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, documents):
    return save_tiny(tmp_path_factory.mktemp("diff") / "chat", build_tokenizer(documents))


def diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, **overrides):
    kwargs = dict(model_names=[tiny_model_dir, chat_model_dir], output_path=str(tmp_path / "out"), **HOOKS)
    return make_runner_config(tiny_model_dir, text_dataset_path, **{**kwargs, **overrides})


# ------------------------------------------------------------------------------------------- config
def test_config_layer_axis_is_model_major(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path):
    cfg = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, d_sae=None)
    assert cfg.model_name == tiny_model_dir and cfg.d_sae == 4 * D_MODEL * 2 * 2
    cc = cfg.crosscoder_config()
    assert cc.model_names == [tiny_model_dir, chat_model_dir]
    assert (cc.n_in, cc.n_out, cc.d_in) == (4, 4, 4 * D_MODEL)
    a, b = tiny_model_dir, chat_model_dir
    assert layer_labels(cc, "out") == [f"{a}/blocks.1.hook_resid_post", f"{a}/blocks.3.hook_resid_post",
                                       f"{b}/blocks.1.hook_resid_post", f"{b}/blocks.3.hook_resid_post"]
    assert Crosscoder(cc).W_dec.shape == (cc.d_sae, 4, D_MODEL)


def test_old_config_json_loads_as_one_model(tmp_path):
    cc = Crosscoder(CrosscoderConfig(d_model=8, d_sae=16, **HOOKS))
    cc.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("model_names", "n_shared_latents", "shared_sparsity_scale"):  # keys of this version only
        saved.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    loaded = Crosscoder.from_pretrained(tmp_path).config
    assert loaded.model_names is None and loaded.n_in == 2 and layer_labels(loaded, "in") == HOOKS["hook_names_in"]


@pytest.mark.parametrize("overrides, message", [
    (dict(model_name="other/model"), "disagree"),
    (dict(model_names=["a"]), "two or more"),
    (dict(model_names=["a", "a"]), "twice"),
    (dict(model_devices=["cpu"]), "one device per entry"),
    (dict(model_names=None, model_devices=["cpu", "cpu"]), "give model_names"),
    (dict(layer_structure="per_layer"), "not supported with model_names"),
])
def test_config_errors(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, **overrides)


# ------------------------------------------------------------------------------------------- harvest
def test_each_models_rows_equal_its_own_single_model_harvest(tiny_model_dir, chat_model_dir, text_dataset_path,
                                                             tmp_path):
    cfg = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path)
    paired = MultiModelActivationSource(cfg, ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"], device="cpu")
    rows, special = paired.next_chunk()
    assert rows.shape[1:] == (4, D_MODEL) and paired.hook_names[2] == f"{chat_model_dir}/blocks.0.hook_resid_post"
    for m, name in enumerate(cfg.model_names):  # the same token stream, one model at a time
        single_cfg = make_runner_config(name, text_dataset_path, **HOOKS)
        single = LMActivationSource(single_cfg, ["blocks.0.hook_resid_post", "blocks.3.hook_resid_post"])
        expected, expected_special = single.next_chunk()
        assert torch.equal(rows[:, 2 * m:2 * m + 2], expected)
        assert torch.equal(special, expected_special)
    assert not torch.equal(rows[:, :2], rows[:, 2:])  # two different models


def test_store_scales_each_model_and_hook(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path):
    cfg = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path)
    store = ActivationsStore(cfg, device="cpu")
    acts_in, acts_out = store.next_batch()
    assert acts_in.shape == (cfg.train_batch_size_tokens, 4, D_MODEL) and acts_out.shape == acts_in.shape
    assert store.scale_in.shape == (4,) and store.scale_out.shape == (4,)
    # blocks.1 is read and written: stored once per model, the same scale on both sides
    assert torch.equal(store.scale_in[[1, 3]], store.scale_out[[0, 2]])
    tokens = store.next_tokens()
    held_in, _, keep = store.activations_from_tokens(tokens)
    assert held_in.shape == (tokens.numel(), 4, D_MODEL) and keep.dtype == torch.bool


def test_tokenizer_mismatch_refused_before_weights(tiny_model_dir, text_dataset_path, tmp_path):
    other = build_tokenizer(make_documents(seed=7)[:20])  # a smaller vocabulary
    bad = save_tiny(tmp_path / "bad", other, weights=False)
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, model_names=[tiny_model_dir, bad], **HOOKS)
    with pytest.raises(ValueError, match=f"tokenizer.*{tiny_model_dir} and {bad} differ: token '.*' has id"):
        ActivationsStore(cfg, device="cpu")


def test_special_token_mismatch_names_it(tiny_model_dir, documents, text_dataset_path, tmp_path):
    tokenizer = build_tokenizer(documents)
    tokenizer.pad_token = "<unk>"
    bad = save_tiny(tmp_path / "bad", tokenizer, weights=False)
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, model_names=[tiny_model_dir, bad], **HOOKS)
    with pytest.raises(ValueError, match="special token pad_token is '<pad>' in the first and '<unk>'"):
        ActivationsStore(cfg, device="cpu")


def test_d_model_mismatch_refused_before_weights(tiny_model_dir, documents, text_dataset_path, tmp_path):
    bad = save_tiny(tmp_path / "wide", build_tokenizer(documents), hidden=2 * D_MODEL, weights=False)
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, model_names=[tiny_model_dir, bad], **HOOKS)
    with pytest.raises(ValueError, match=f"{tiny_model_dir} has hidden size {D_MODEL} and {bad} has {2 * D_MODEL}"):
        ActivationsStore(cfg, device="cpu")


def _diff_cache(tiny_model_dir, chat_model_dir, text_dataset_path, path, model_names=None):
    cfg = CacheActivationsRunnerConfig(model_names=model_names or [tiny_model_dir, chat_model_dir], d_model=D_MODEL,
                                       dataset_path=text_dataset_path, new_cached_activations_path=str(path),
                                       context_size=32, store_batch_size_prompts=4, training_tokens=600,
                                       shard_size_tokens=256, device="cpu", **HOOKS)
    return CacheActivationsRunner(cfg).run()


def test_cache_holds_every_model_and_serves_the_live_rows(tiny_model_dir, chat_model_dir, text_dataset_path,
                                                          tmp_path):
    path = _diff_cache(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path / "c")
    meta = json.loads((path / "metadata.json").read_text())
    layers = [f"{m}/{h}" for m in (tiny_model_dir, chat_model_dir) for h in ["blocks.0.hook_resid_post",
                                                                            "blocks.1.hook_resid_post",
                                                                            "blocks.3.hook_resid_post"]]
    assert meta["model_names"] == [tiny_model_dir, chat_model_dir] and meta["hook_names"] == layers
    assert list(meta["mean_norms"]) == layers
    # the cache holds the dataset from its start: the live diff without a held-out slice reads the same rows
    live = ActivationsStore(diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path,
                                        normalize_activations="none", eval_holdout_sequences=0))
    cached = ActivationsStore(diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path,
                                          normalize_activations="none", cached_activations_path=str(path)))
    assert cached.hook_names == live.hook_names and cached.model is None
    for _ in range(6):
        assert all(torch.equal(a, b) for a, b in zip(cached.next_batch(), live.next_batch()))
    # a diff of the models in another order reads the same tensors by name
    swapped = ActivationsStore(diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path,
                                           model_name=chat_model_dir, model_names=[chat_model_dir, tiny_model_dir],
                                           normalize_activations="none", cached_activations_path=str(path)))
    a_in, _ = swapped.next_batch()
    b_in, _ = ActivationsStore(diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path,
                                           normalize_activations="none", cached_activations_path=str(path))).next_batch()
    assert torch.equal(a_in[:, :2], b_in[:, 2:]) and torch.equal(a_in[:, 2:], b_in[:, :2])


def test_diff_trains_from_its_cache(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path):
    path = _diff_cache(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path / "c")
    cfg = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, cached_activations_path=str(path),
                      architecture="topk_crosscoder", k=8, training_tokens=64 * 6)
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    reloaded = Crosscoder.from_pretrained(tmp_path / "out")
    assert reloaded.config.model_names == ["tiny_gpt_neox0", "chat"] and reloaded.config.n_in == 4
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert sum(v for k, v in metrics.items() if k.startswith("diff_latents/")) == cfg.d_sae
    assert all(0 <= metrics[f"fvu/{label}"] < 2 for label in layer_labels(reloaded.config, "out"))
    assert (tmp_path / "out" / "diff_beta_ratio.png").is_file()  # Latent Scaling on the cache's rows


def test_cache_of_another_model_set_is_refused(tiny_model_dir, chat_model_dir, documents, text_dataset_path,
                                               tmp_path):
    diff_cache = _diff_cache(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path / "diff")
    single_cache = CacheActivationsRunner(CacheActivationsRunnerConfig(
        model_name=tiny_model_dir, d_model=D_MODEL, dataset_path=text_dataset_path, context_size=32,
        store_batch_size_prompts=4, training_tokens=200, new_cached_activations_path=str(tmp_path / "one"),
        device="cpu", **HOOKS)).run()
    third = save_tiny(tmp_path / "third", build_tokenizer(documents), seed=3)
    cases = [(make_runner_config(tiny_model_dir, text_dataset_path, cached_activations_path=str(diff_cache), **HOOKS),
              "reads one model \\(no model_names\\)"),
             (diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path,
                          cached_activations_path=str(single_cache)), "holds one model"),
             (diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, model_names=[tiny_model_dir, third],
                          cached_activations_path=str(diff_cache)), "for the same model_names")]
    for cfg, message in cases:
        with pytest.raises(ValueError, match=message):
            ActivationsStore(cfg, device="cpu")


# ------------------------------------------------------------------------------------------- runner
def test_runner_trains_saves_and_reloads_a_diff(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path):
    cfg = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, architecture="topk_crosscoder",
                      k=8, training_tokens=64 * 12, n_checkpoints=1)
    trained = LanguageModelCrosscoderTrainingRunner(cfg).run()
    out = tmp_path / "out"
    names = ["tiny_gpt_neox0", "chat"]  # the folders' public names
    reloaded = Crosscoder.from_pretrained(out)
    assert reloaded.config.model_names == names and reloaded.config.n_out == 4
    metrics = json.loads((out / "metrics.json").read_text())
    for label in layer_labels(reloaded.config, "out"):
        assert 0 <= metrics[f"fvu/{label}"] < 2
        assert math.isfinite(metrics[f"ce_loss_score/{label}"]) and metrics[f"kl_div_with_sae/{label}"] >= 0
    counts = {key: value for key, value in metrics.items() if key.startswith("diff_latents/")}
    assert list(counts) == ["diff_latents/only tiny_gpt_neox0", "diff_latents/only chat", "diff_latents/shared"]
    assert sum(counts.values()) == cfg.d_sae
    card = (out / "README.md").read_text()
    assert "base_model:\n- tiny_gpt_neox0\n- chat\n" in card and "`chat/blocks.3.hook_resid_post`" in card
    assert "### Model diff" in card and f"| shared | {counts['diff_latents/shared']} |" in card
    for png in ("diff_relative_norm.png", "diff_decoder_cosine.png", "diff_beta_ratio.png"):
        assert (out / png).is_file() and png in card
    store = ActivationsStore(make_runner_config(tiny_model_dir, text_dataset_path, normalize_activations="none",
                                                model_names=cfg.model_names, **HOOKS), device="cpu")
    acts_in, _ = store.next_batch()
    torch.testing.assert_close(reloaded(acts_in).reconstruction, trained.eval()(acts_in).reconstruction)
    assert (out / "checkpoints" / "step_6").is_dir()


def test_example_config_and_flags_parse():
    example = Path(__file__).resolve().parents[1] / "examples" / "diffing_pythia.yaml"
    cfg = parse_runner_config(["--config", str(example)])
    assert cfg.model_names == ["EleutherAI/pythia-70m", "lomahony/eleuther-pythia70m-hh-sft"]
    assert cfg.model_name == "EleutherAI/pythia-70m" and cfg.crosscoder_config().n_in == 2
    flags = parse_runner_config(["--model_names", "a", "b", "--model_devices", "cpu", "cpu", "--hook_names_in", "h",
                                 "--hook_names_out", "h", "--n_shared_latents", "4", "--shared_sparsity_scale", "0.2"])
    assert (flags.model_names, flags.model_devices, flags.n_shared_latents) == (["a", "b"], ["cpu", "cpu"], 4)


def test_resume_of_a_diff_equals_uninterrupted(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path):
    common = dict(architecture="topk_crosscoder", k=8, training_tokens=64 * 8, n_checkpoints=1, n_shared_latents=16)
    diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, output_path=str(tmp_path / "a"), **common)
    LanguageModelCrosscoderTrainingRunner(diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path,
                                                      output_path=str(tmp_path / "a"), **common)).run()
    resumed = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, output_path=str(tmp_path / "b"),
                          resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "step_4"), **common)
    LanguageModelCrosscoderTrainingRunner(resumed).run()
    a, b = (Crosscoder.from_pretrained(tmp_path / name) for name in ("a", "b"))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    W = a.W_dec.detach() * torch.tensor(a.config.activation_scale_out)[None, :, None]  # back to training space
    torch.testing.assert_close(W[:16, :2], W[:16, 2:], rtol=1e-5, atol=0)  # shared latents tied (fold undone)
    assert not torch.allclose(W[16:, :2], W[16:, 2:], rtol=1e-2, atol=0)


def test_ce_evals_splice_each_model_with_its_own_reconstruction(tiny_model_dir, chat_model_dir, text_dataset_path,
                                                                 tmp_path):
    cfg = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path)
    torch.manual_seed(0)
    metrics = evaluate(Crosscoder(cfg.crosscoder_config()), ActivationsStore(cfg, device="cpu"), 2)
    for name in cfg.model_names:  # the clean CE of each model is its own single-model one
        single_cfg = make_runner_config(name, text_dataset_path, **HOOKS)
        single = evaluate(Crosscoder(single_cfg.crosscoder_config()), ActivationsStore(single_cfg, device="cpu"), 2)
        assert metrics[f"ce_loss_without_sae/{name}"] == pytest.approx(single["ce_loss_without_sae"], rel=1e-6)
        for hook in HOOKS["hook_names_out"]:
            zero = metrics[f"ce_loss_with_ablation/{name}/{hook}"]
            assert zero == pytest.approx(single[f"ce_loss_with_ablation/{hook}"], rel=1e-6)
            assert metrics[f"kl_div_with_sae/{name}/{hook}"] >= 0
    a, b = cfg.model_names
    assert metrics[f"ce_loss_without_sae/{a}"] != metrics[f"ce_loss_without_sae/{b}"]


def test_feature_activations_of_a_diff_read_every_model(tiny_model_dir, chat_model_dir, tiny_model_and_tokenizer):
    base, tokenizer = tiny_model_and_tokenizer
    chat = GPTNeoXForCausalLM.from_pretrained(chat_model_dir).eval()
    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(d_model=D_MODEL, d_sae=32, model_names=["base", "chat"], **HOOKS)).eval()
    [(tokens, acts)] = feature_activations(cc, [base, chat], tokenizer, texts=["the cat sees a red ball"])
    ids = torch.tensor([tokenizer("the cat sees a red ball")["input_ids"]])
    parts = [torch.stack([capture_activations(m, HOOKS["hook_names_in"], ids)[h][0] for h in HOOKS["hook_names_in"]], 1)
             for m in (base, chat)]
    torch.testing.assert_close(acts, cc.encode(torch.cat(parts, dim=1)))
    assert len(tokens) == ids.shape[1]
    with pytest.raises(ValueError, match="pass a list of 2 models"):
        feature_activations(cc, base, tokenizer, texts=["the cat"])
    with pytest.raises(ValueError, match="evaluate"), spliced(cc, base):
        pass


def test_diff_on_two_processes_writes_one_output_and_resumes_exactly(tiny_model_dir, chat_model_dir,
                                                                     text_dataset_path, tmp_path):
    from test_distributed import _runner_config_file, accelerate_launch

    common = dict(architecture="topk_crosscoder", k=8, training_tokens=64 * 8, n_checkpoints=1,
                  n_shared_latents=16, wandb_log_frequency=2)
    full = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, output_path=str(tmp_path / "a"),
                       **common)
    accelerate_launch("accelerate_configs/cpu_2proc.yaml", "scripts/train.py",
                      "--config", _runner_config_file(tmp_path / "a.json", full))
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and "diff_latents/shared" in metrics
    resumed = diff_config(tiny_model_dir, chat_model_dir, text_dataset_path, tmp_path, output_path=str(tmp_path / "b"),
                          resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "step_4"), **common)
    accelerate_launch("accelerate_configs/cpu_2proc.yaml", "scripts/train.py",
                      "--config", _runner_config_file(tmp_path / "b.json", resumed))
    a, b = (Crosscoder.from_pretrained(tmp_path / name) for name in ("a", "b"))
    assert all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())
    W = a.W_dec.detach() * torch.tensor(a.config.activation_scale_out)[None, :, None]
    torch.testing.assert_close(W[:16, :2], W[:16, 2:], rtol=1e-5, atol=0)  # tied under DDP too
