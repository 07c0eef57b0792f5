"""CrosscoderConfig / LanguageModelCrosscoderRunnerConfig: derived fields, provenance, and every bad value
raising a ValueError that names the fix."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoConfig

from hf_crosscoder import (
    ARCHITECTURES,
    CrosscoderArgs,
    CrosscoderConfig,
    LanguageModelCrosscoderRunnerConfig,
)

HOOKS_IN = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
HOOKS_OUT = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post", "blocks.3.hook_resid_post"]


def cfg(**kw) -> CrosscoderConfig:
    return CrosscoderConfig(**{"d_model": 8, "hook_names_in": HOOKS_IN, "hook_names_out": HOOKS_OUT,
                               "d_sae": 32, **kw})


def runner(**kw) -> LanguageModelCrosscoderRunnerConfig:
    return LanguageModelCrosscoderRunnerConfig(**{"d_model": 8, "hook_names_in": HOOKS_IN,
                                                  "hook_names_out": HOOKS_OUT, **kw})


# ------------------------------------------------------------------ CrosscoderConfig
def test_derived_sizes_and_defaults():
    c = cfg()
    assert (c.n_in, c.n_out, c.d_in, c.d_out) == (2, 3, 16, 24)
    assert c.architecture == "crosscoder" and c.model_type == "crosscoder"
    assert c.k_aux == 3 * (8 // 2)  # default: d_model // 2 per output layer
    assert cfg(d_sae=5).k_aux == 5  # capped at d_sae
    assert cfg(k_aux=7).k_aux == 7
    assert cfg(d_model=1).k_aux == 1  # never 0 (AuxK divides by it)
    # a model diff: per output hook, not per (model, hook): the latents write every model at once
    diff = cfg(model_names=["a", "b"])
    assert diff.n_out == 6 and diff.k_aux == 3 * (8 // 2)
    assert cfg(d_in=16, d_out=24).d_in == 16  # consistent values are accepted
    assert c.activation_norm_folded is False and c.config_version == 1
    for f in dataclasses.fields(CrosscoderArgs):  # every hyper-parameter lives on the config
        assert hasattr(c, f.name)


def test_config_json_round_trip_with_provenance(tmp_path):
    c = cfg(architecture="batchtopk_crosscoder", k=4, model_name="EleutherAI/pythia-70m",
            dataset_path="roneneldan/TinyStories", context_size=64, training_tokens=1000,
            activation_scale_in=[0.5, 2.0], activation_scale_out=[1.0, 3.0, 9.0], activation_norm_folded=True)
    c.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    expected = {"model_name": "EleutherAI/pythia-70m", "dataset_path": "roneneldan/TinyStories",
                "context_size": 64, "training_tokens": 1000, "activation_scale_in": [0.5, 2.0],
                "activation_scale_out": [1.0, 3.0, 9.0], "activation_norm_folded": True, "config_version": 1,
                "d_in": 16, "d_out": 24, "architecture": "batchtopk_crosscoder", "k": 4,
                "hook_names_in": HOOKS_IN, "hook_names_out": HOOKS_OUT, "d_sae": 32, "d_model": 8,
                "l1_coefficient": 1.0, "sparsity_decoder_norm": "sum"}  # defaults are written too
    for key, value in expected.items():
        assert saved[key] == value, key
    for loaded in (CrosscoderConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is CrosscoderConfig
        for key, value in expected.items():
            assert getattr(loaded, key) == value, key


@pytest.mark.parametrize("kw,match", [
    ({"architecture": "sae"}, "valid architectures: " + ", ".join(ARCHITECTURES)),
    ({"d_sae": 0}, "d_sae must be a positive"),
    ({"d_sae": -3}, "d_sae must be a positive"),
    ({"d_model": 0}, "d_model must be a positive"),
    ({"hook_names_in": []}, r"hook_names_in must be a non-empty list .*e\.g\. \['blocks\.0\.hook_resid_post'\]"),
    ({"hook_names_out": []}, "hook_names_out must be a non-empty list"),
    ({"hook_names_in": "blocks.0.hook_resid_post"}, "hook_names_in must be a non-empty list"),
    ({"hook_names_out": ["a", "a"]}, "lists a hook twice.*list each hook once"),
    ({"architecture": "topk_crosscoder", "k": 33}, "k=33 must be between 1 and d_sae=32; lower k or raise d_sae"),
    ({"architecture": "batchtopk_crosscoder", "k": 0}, "k=0 must be between 1 and d_sae=32"),
    ({"architecture": "topk_crosscoder", "k_aux": 0}, "k_aux must be positive"),
    ({"d_in": 15}, r"d_in=15 does not match d_model \* len\(hook_names_in\) = 16.*drop d_in"),
    ({"d_out": 16}, r"d_out=16 does not match d_model \* len\(hook_names_out\) = 24.*drop d_out"),
    ({"jumprelu_sparsity": "l1"}, "jumprelu_sparsity='l1' is not valid; use one of step, tanh"),
    ({"sparsity_decoder_norm": "max"}, "sparsity_decoder_norm='max' is not valid; use one of sum, concat"),
    ({"jumprelu_pre_act_latents": "some"}, "use one of dead, all, none"),
    ({"l1_coefficient": -1.0}, "l1_coefficient must be >= 0"),
    ({"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth must be > 0"),
    ({"batchtopk_threshold_momentum": 1.0}, r"batchtopk_threshold_momentum must be in \[0, 1\)"),
    ({"d_model": 8.5}, "d_model must be a positive integer"),
    ({"d_sae": 10.5}, "d_sae must be a positive"),
    ({"decoder_init_norm": 0.0}, "decoder_init_norm must be > 0"),
    ({"aux_coefficient": -1.0}, "aux_coefficient must be >= 0"),
    ({"jumprelu_init_threshold": -0.1}, "jumprelu_init_threshold must be >= 0"),
    ({"jumprelu_tanh_scale": float("nan")}, "jumprelu_tanh_scale must be > 0; got nan"),
])
def test_bad_crosscoder_config_raises_naming_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(**kw)


def test_k_is_only_checked_for_topk_architectures():
    assert cfg(architecture="crosscoder", k=1000).k == 1000
    assert cfg(architecture="topk_crosscoder", k=32).k == 32  # k == d_sae is allowed


# ------------------------------------------------------------------ LanguageModelCrosscoderRunnerConfig
def test_runner_derives_d_sae_from_expansion_factor():
    assert runner(expansion_factor=2).d_sae == 2 * 8 * 2  # expansion_factor * d_in
    assert runner().d_sae == 4 * 16  # default expansion factor 4
    assert runner(d_sae=40, expansion_factor=2).d_sae == 40  # an explicit d_sae wins


def test_runner_shares_hyper_parameter_names_and_defaults():
    r = runner(architecture="topk_crosscoder", k=5, l1_coefficient=0.2, d_sae=64)
    defaults = {f.name: f for f in dataclasses.fields(LanguageModelCrosscoderRunnerConfig)}
    for f in dataclasses.fields(CrosscoderArgs):
        if f.name != "d_sae":  # the runner derives d_sae from expansion_factor when not given
            assert defaults[f.name].default == f.default, f.name
    c = r.crosscoder_config()
    assert isinstance(c, CrosscoderConfig)
    for f in dataclasses.fields(CrosscoderArgs):
        if f.name != "k_aux":
            assert getattr(c, f.name) == getattr(r, f.name), f.name
    assert r.k_aux is None and c.k_aux == 3 * (8 // 2)  # the default is resolved by the crosscoder config
    assert runner(k_aux=9).crosscoder_config().k_aux == 9
    assert (c.model_name, c.dataset_path, c.context_size, c.training_tokens) == (
        r.model_name, r.dataset_path, r.context_size, r.training_tokens)
    assert r.total_training_steps == r.training_tokens // r.train_batch_size_tokens


@pytest.mark.parametrize("kw,match", [
    ({"training_tokens": 1000, "train_batch_size_tokens": 4096},
     "training_tokens=1000 is smaller than one batch.*raise training_tokens or lower train_batch_size_tokens"),
    ({"push_to_hub": True}, r"push_to_hub=True needs hf_repo_id \(e\.g\. 'org/"),
    ({"architecture": "nope"}, "valid architectures: " + ", ".join(ARCHITECTURES)),
    ({"hook_names_in": []}, "hook_names_in must be a non-empty list"),
    ({"architecture": "topk_crosscoder", "d_sae": 16, "k": 17}, "k=17 must be between 1 and d_sae=16"),
    ({"d_sae": 0}, "d_sae must be a positive"),
    ({"context_size": 0}, "context_size must be positive"),
    ({"store_batch_size_prompts": 0}, "store_batch_size_prompts must be positive"),
    ({"dtype": "float33"}, "dtype='float33' is not a torch dtype"),
    ({"n_batches_in_buffer": 1}, "n_batches_in_buffer must be >= 2"),
    ({"normalize_activations": "layer"}, "use one of none, expected_average"),
    ({"lr_scheduler_name": "step"}, "use one of constant, cosineannealing, linear"),
    ({"hub_strategy": "every_save"}, "use one of end, checkpoint"),
    # values that used to train silently into nonsense (negative clipping flips gradients, a negative
    # warmup a negative sparsity coefficient, a negative lr_end a negative lr, no eval batch a perfect score)
    ({"max_grad_norm": -1.0}, "max_grad_norm must be >= 0"),
    ({"l1_warmup_steps": -5}, "l1_warmup_steps must be >= 0"),
    ({"lr_warmup_steps": -1}, "lr_warmup_steps must be >= 0"),
    ({"lr_decay_steps": -5}, "lr_decay_steps must be >= 0"),
    ({"lr_end": -1e-2}, "lr_end must be >= 0"),
    ({"lr": 0.0}, "lr must be > 0"),
    ({"lr": float("nan")}, "lr must be > 0"),
    ({"adam_beta2": 1.0}, "adam_beta1/adam_beta2 must be < 1"),
    ({"n_eval_batches": 0}, "n_eval_batches must be positive"),
    ({"n_batches_for_norm_estimate": 0}, "n_batches_for_norm_estimate must be positive"),
    ({"n_checkpoints": -1}, "n_checkpoints must be >= 0"),
    ({"d_sae": None, "expansion_factor": 0}, "expansion_factor must be a positive integer"),
])
def test_bad_runner_config_raises_naming_the_fix(kw, match):
    with pytest.raises(ValueError, match=match):
        runner(**kw)


def test_runner_accepts_a_repo_id_for_push_to_hub():
    assert runner(push_to_hub=True, hf_repo_id="org/name").hf_repo_id == "org/name"
