import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_crosscoder.hooks import (
    HookPoint,
    capture_activations,
    check_d_model,
    find_layers,
    resolve_hook,
    splice,
    valid_hook_names,
)

N = 3  # layers of the small models built here


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=N, n_head=4, vocab_size=50, n_positions=64))


def _llama():
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=50))


def _bert():
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=N, num_attention_heads=4,
                                intermediate_size=64, vocab_size=50), add_pooling_layer=False)


# (builder, path of the final norm applied to the last layer's output in hidden_states[-1])
MODELS = {"gpt2": (_gpt2, "transformer.ln_f"), "llama": (_llama, "model.norm"), "bert": (_bert, None)}


@pytest.fixture(params=["gpt_neox", "gpt2", "llama", "bert"])
def model_and_norm(request, tiny_model_and_tokenizer):
    if request.param == "gpt_neox":
        return tiny_model_and_tokenizer[0], "gpt_neox.final_layer_norm"
    torch.manual_seed(0)
    build, norm = MODELS[request.param]
    return build().eval(), norm


def _ids(model, batch=2, seq=10):
    return torch.randint(5, 50, (batch, seq), generator=torch.Generator().manual_seed(0))


def _hook_count(model):
    # transformers installs its own output-capturing hooks once (output_hidden_states): count, not zero
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_resid_post_and_pre_match_output_hidden_states(model_and_norm):
    model, norm_path = model_and_norm
    n = len(find_layers(model)[1])
    ids = _ids(model)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    names = [f"blocks.{i}.hook_resid_{k}" for i in range(n) for k in ("pre", "post")]
    acts = capture_activations(model, names, ids)
    for i in range(n):
        torch.testing.assert_close(acts[f"blocks.{i}.hook_resid_pre"], hidden[i])
        if i < n - 1:
            torch.testing.assert_close(acts[f"blocks.{i}.hook_resid_post"], hidden[i + 1])
            torch.testing.assert_close(acts[f"blocks.{i + 1}.hook_resid_pre"], acts[f"blocks.{i}.hook_resid_post"])
    last = acts[f"blocks.{n - 1}.hook_resid_post"]
    # transformers 5: hidden_states[-1] is the final norm's output, not the last layer's
    final = model.get_submodule(norm_path)(last) if norm_path else last
    torch.testing.assert_close(final, hidden[-1])
    assert last.shape == (2, 10, hidden[0].shape[-1])


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_attn_and_mlp_out_sum_to_the_residual_update(build):
    torch.manual_seed(0)
    model = build().eval()
    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out", "blocks.1.hook_mlp_out",
             "blocks.1.hook_resid_post"]
    a = capture_activations(model, names, _ids(model))
    torch.testing.assert_close(a[names[0]] + a[names[1]] + a[names[2]], a[names[3]])


def test_gpt_neox_parallel_residual_and_module_paths(tiny_model_and_tokenizer):
    model = tiny_model_and_tokenizer[0]
    assert model.config.use_parallel_residual
    names = ["blocks.2.hook_resid_pre", "blocks.2.hook_attn_out", "blocks.2.hook_mlp_out",
             "blocks.2.hook_resid_post", "gpt_neox.layers.2"]
    a = capture_activations(model, names, _ids(model))
    torch.testing.assert_close(a[names[0]] + a[names[1]] + a[names[2]], a[names[3]])
    torch.testing.assert_close(a["gpt_neox.layers.2"], a[names[3]])
    assert resolve_hook(model, "gpt_neox.layers.2.mlp").layer_index == 2
    assert resolve_hook(model, "blocks.2.hook_attn_out").module is model.gpt_neox.layers[2].attention


def test_bert_sub_block_hooks_are_the_dense_projections():
    model = _bert()
    assert resolve_hook(model, "blocks.0.hook_attn_out").module is model.encoder.layer[0].attention.output.dense
    assert resolve_hook(model, "blocks.0.hook_mlp_out").module is model.encoder.layer[0].output.dense
    assert find_layers(model)[0] == "encoder.layer"
    assert len(valid_hook_names(model)) == 4 * N


def test_early_stop_same_activations_and_skips_later_layers(tiny_model_and_tokenizer):
    model = tiny_model_and_tokenizer[0]
    before = _hook_count(model)
    _, layers = find_layers(model)
    calls = [0] * len(layers)
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, layer in enumerate(layers)]
    try:
        names = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "blocks.0.hook_resid_post"]
        early = capture_activations(model, names, _ids(model), stop_early=True)
        assert calls == [1, 1, 0, 0]
        full = capture_activations(model, names, _ids(model), stop_early=False)
        assert calls == [2, 2, 1, 1]
    finally:
        for h in handles:
            h.remove()
    assert list(early) == ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post"]  # duplicates captured once
    for name in early:
        torch.testing.assert_close(early[name], full[name])
    assert _hook_count(model) == before


def test_unknown_hook_lists_valid_names(tiny_model_and_tokenizer):
    model = tiny_model_and_tokenizer[0]
    with pytest.raises(ValueError, match=r"Unknown hook name 'blocks\.0\.hook_resid_mid'.*blocks\.\{i\}"
                                         r"\.hook_\{resid_pre,resid_post,attn_out,mlp_out\} for i in 0\.\.3"):
        resolve_hook(model, "blocks.0.hook_resid_mid")
    with pytest.raises(ValueError, match="has 4 layers"):
        resolve_hook(model, "blocks.4.hook_resid_post")
    with pytest.raises(ValueError, match="Unknown hook name 'gpt_neox.layerz.1'"):
        capture_activations(model, ["gpt_neox.layerz.1"], _ids(model))


def test_unsupported_model_asks_for_module_paths():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="could not find the layer list.*pass raw module paths"):
        find_layers(model)
    assert resolve_hook(model, "1") == HookPoint("1", model[1], False, None)
    assert valid_hook_names(model) == ["0", "1"]


def test_hooks_removed_after_the_forward_raises(tiny_model_and_tokenizer):
    model = tiny_model_and_tokenizer[0]
    before = _hook_count(model)
    bad_ids = torch.full((1, 4), 10_000)  # out of the vocabulary: the embedding raises
    with pytest.raises(IndexError):
        capture_activations(model, ["blocks.3.hook_resid_post", "blocks.1.hook_resid_pre"], bad_ids)
    assert _hook_count(model) == before
    with pytest.raises(IndexError), splice(model, {"blocks.0.hook_resid_post": torch.zeros_like}):
        model(bad_ids)
    assert _hook_count(model) == before


def test_splice_replaces_output_and_input_and_is_undone(tiny_model_and_tokenizer):
    model = tiny_model_and_tokenizer[0]
    before = _hook_count(model)
    ids = _ids(model)
    with torch.no_grad():
        clean = model(ids).logits
        with splice(model, {"blocks.1.hook_resid_post": torch.zeros_like}):
            zero_post = model(ids).logits
        with splice(model, {"blocks.2.hook_resid_pre": torch.zeros_like}):
            zero_pre = model(ids).logits
        with splice(model, {"blocks.2.hook_attn_out": lambda a: a}):
            identity = model(ids).logits
        after = model(ids).logits
    assert not torch.allclose(zero_post, clean)
    torch.testing.assert_close(zero_pre, zero_post)  # input of layer 2 == output of layer 1
    torch.testing.assert_close(identity, clean)
    torch.testing.assert_close(after, clean)
    assert _hook_count(model) == before


def test_check_d_model_message():
    check_d_model(GPTNeoXConfig(hidden_size=512), 512, "EleutherAI/pythia-70m")
    with pytest.raises(ValueError, match=r"d_model=768 does not match the hidden size 512 of "
                                         r"EleutherAI/pythia-70m; set d_model=512 \(pythia-70m: 512"):
        check_d_model(GPTNeoXConfig(hidden_size=512), 768, "EleutherAI/pythia-70m")
    with pytest.raises(ValueError, match="hidden size 32 of gpt2-tiny"):
        check_d_model(GPT2Config(n_embd=32), 64, "gpt2-tiny")
