import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
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
    assert resolve_hook(model, "gpt_neox.layers.2.mlp").module is model.gpt_neox.layers[2].mlp
    assert resolve_hook(model, "blocks.2.hook_attn_out").module is model.gpt_neox.layers[2].attention


def test_bert_sub_block_hooks_are_the_dense_projections():
    model = _bert()
    assert resolve_hook(model, "blocks.0.hook_attn_out").module is model.encoder.layer[0].attention.output.dense
    assert resolve_hook(model, "blocks.0.hook_mlp_out").module is model.encoder.layer[0].output.dense
    assert find_layers(model)[0] == "encoder.layer"
    assert len(valid_hook_names(model)) == 7 * N


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
    with pytest.raises(ValueError, match=r"Unknown hook name 'blocks\.0\.hook_resid_middle'.*blocks\.\{i\}\."
                                         r"\{hook_resid_pre,hook_resid_post,hook_attn_out,hook_mlp_in,"
                                         r"ln2\.hook_normalized,hook_mlp_out\} for i in 0\.\.3"):
        resolve_hook(model, "blocks.0.hook_resid_middle")
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


# --- the MLP's inputs: resid_mid, mlp_in, ln2.hook_normalized -------------------------------------

def _gpt_neox(parallel):
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=N, num_attention_heads=4,
                                            intermediate_size=64, vocab_size=50, use_parallel_residual=parallel))


def _gemma2():
    return Gemma2ForCausalLM(Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=8,
                                          num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
                                          attn_implementation="eager"))


def _layer_norm(x, ln):  # nn.LayerNorm by its formula
    centred = x - x.mean(-1, keepdim=True)
    return centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + ln.eps) * ln.weight + ln.bias


def _rms_norm(x, ln):  # LlamaRMSNorm by its formula
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + ln.variance_epsilon) * ln.weight


def _pre_ln(get_layer, norm_name, formula, parallel=False):
    """Hand-written second half of a pre-LN layer: from (resid_pre, attn_out, mlp input or None) to
    (resid_mid, mlp_in, normalized, mlp_out, resid_post)."""
    def forward(model, i, pre, attn, replace=None):
        layer = get_layer(model)[i]
        mid = None if parallel else pre + attn
        mlp_in = pre if parallel else mid
        if replace is not None and "mid" in replace:
            mid = mlp_in = replace["mid"](mid)
        if replace is not None and "mlp_in" in replace:
            mlp_in = replace["mlp_in"](mlp_in)
        normalized = formula(mlp_in, getattr(layer, norm_name))
        if replace is not None and "normalized" in replace:
            normalized = replace["normalized"](normalized)
        mlp_out = layer.mlp(normalized)
        return mid, mlp_in, normalized, mlp_out, (pre + attn if parallel else mid) + mlp_out
    return forward


def _bert_forward(model, i, pre, attn, replace=None):
    layer = model.encoder.layer[i]
    mid = pre + attn  # attention.output: LayerNorm(resid_pre + dense(...)), dropout off in eval
    if replace is not None and "mid" in replace:
        mid = replace["mid"](mid)
    normalized = _layer_norm(mid, layer.attention.output.LayerNorm)
    mlp_out = layer.output.dense(layer.intermediate(normalized))
    return mid, mid, normalized, mlp_out, _layer_norm(normalized + mlp_out, layer.output.LayerNorm)


FAMILIES = {
    "gpt2": (_gpt2, _pre_ln(lambda m: m.transformer.h, "ln_2", _layer_norm)),
    "llama": (_llama, _pre_ln(lambda m: m.model.layers, "post_attention_layernorm", _rms_norm)),
    "gpt_neox_sequential": (lambda: _gpt_neox(False),
                            _pre_ln(lambda m: m.gpt_neox.layers, "post_attention_layernorm", _layer_norm)),
    "gpt_neox_parallel": (lambda: _gpt_neox(True),
                          _pre_ln(lambda m: m.gpt_neox.layers, "post_attention_layernorm", _layer_norm, True)),
    "bert": (_bert, _bert_forward),
}
MLP_INPUTS = ["hook_resid_mid", "hook_mlp_in", "ln2.hook_normalized"]


def _family(name):
    torch.manual_seed(0)
    build, forward = FAMILIES[name]
    return build().eval(), forward


def _layer1(*kinds):
    return [f"blocks.1.{k}" for k in kinds]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mlp_inputs_equal_a_hand_written_forward(family):
    model, forward = _family(family)
    parallel = family == "gpt_neox_parallel"
    kinds = ["hook_resid_pre", "hook_attn_out", *MLP_INPUTS[parallel:], "hook_mlp_out", "hook_resid_post"]
    acts = capture_activations(model, _layer1(*kinds), _ids(model))
    with torch.no_grad():
        mid, mlp_in, normalized, mlp_out, post = forward(model, 1, acts["blocks.1.hook_resid_pre"],
                                                         acts["blocks.1.hook_attn_out"])
    if not parallel:
        torch.testing.assert_close(acts["blocks.1.hook_resid_mid"], mid)
    torch.testing.assert_close(acts["blocks.1.hook_mlp_in"], mlp_in)
    torch.testing.assert_close(acts["blocks.1.ln2.hook_normalized"], normalized)
    # the normalized input really is what the MLP reads, and the layer's output follows from it
    torch.testing.assert_close(acts["blocks.1.hook_mlp_out"], mlp_out)
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], post)
    if parallel:  # TransformerLens's parallel branch: mlp_in is resid_pre
        torch.testing.assert_close(acts["blocks.1.hook_mlp_in"], acts["blocks.1.hook_resid_pre"])
    assert set(_layer1(*MLP_INPUTS[parallel:])) <= set(valid_hook_names(model))


def test_gemma2_reads_the_pre_feedforward_norm_not_the_attention_post_norm():
    torch.manual_seed(0)
    model = _gemma2().eval()
    layer = model.model.layers[1]
    assert resolve_hook(model, "blocks.1.ln2.hook_normalized").module is layer.pre_feedforward_layernorm
    kinds = ["hook_resid_pre", "hook_attn_out", *MLP_INPUTS, "hook_mlp_out", "hook_resid_post"]
    a = {k: v for k, v in zip(kinds, capture_activations(model, _layer1(*kinds), _ids(model)).values())}
    with torch.no_grad():
        mid = a["hook_resid_pre"] + layer.post_attention_layernorm(a["hook_attn_out"])
        torch.testing.assert_close(a["hook_resid_mid"], mid)
        torch.testing.assert_close(a["ln2.hook_normalized"], layer.pre_feedforward_layernorm(mid))
        torch.testing.assert_close(a["hook_mlp_out"], layer.mlp(a["ln2.hook_normalized"]))
        torch.testing.assert_close(a["hook_resid_post"], mid + layer.post_feedforward_layernorm(a["hook_mlp_out"]))
    torch.testing.assert_close(a["hook_mlp_in"], a["hook_resid_mid"])


def test_parallel_residual_resid_mid_names_the_alternatives():
    torch.manual_seed(0)
    model = _gpt_neox(True).eval()
    with pytest.raises(ValueError, match=r"'blocks\.2\.hook_resid_mid': GPTNeoXLayer has a parallel residual.*"
                                         r"no resid_mid\. Use blocks\.2\.ln2\.hook_normalized .*"
                                         r"blocks\.2\.hook_mlp_in .*blocks\.2\.hook_resid_pre instead"):
        capture_activations(model, ["blocks.2.hook_resid_mid"], _ids(model))
    assert not any(name.endswith("hook_resid_mid") for name in valid_hook_names(model))
    with pytest.raises(ValueError, match=r"Unknown hook name .*\{hook_resid_pre,hook_resid_post,hook_attn_out,"
                                         r"hook_mlp_in,ln2\.hook_normalized,hook_mlp_out\}"):
        resolve_hook(model, "blocks.0.hook_mlp_inn")


def test_layer_without_an_mlp_norm_asks_for_a_module_path():
    model = _gpt2()
    del model.transformer.h[0].ln_2
    with pytest.raises(ValueError, match=r"'blocks\.0\.ln2\.hook_normalized': found no norm before the MLP in "
                                         r"GPT2Block .*pass the module path"):
        resolve_hook(model, "blocks.0.ln2.hook_normalized")
    assert "blocks.0.hook_mlp_in" not in valid_hook_names(model)
    assert "blocks.1.hook_mlp_in" in valid_hook_names(model)


@pytest.mark.parametrize("kind", MLP_INPUTS)
def test_mlp_input_hooks_stop_the_forward_early(kind):
    model, _ = _family("gpt2")
    layers = model.transformer.h
    ran = []
    handles = [m.register_forward_hook(lambda m, a, o, tag=tag: ran.append(tag))
               for i, layer in enumerate(layers) for tag, m in ((f"layer{i}", layer), (f"mlp{i}", layer.mlp))]
    try:
        early = capture_activations(model, [f"blocks.1.{kind}"], _ids(model))
        assert ran == ["mlp0", "layer0"]  # layer 1's MLP and every later layer never ran
        full = capture_activations(model, [f"blocks.1.{kind}"], _ids(model), stop_early=False)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(early[f"blocks.1.{kind}"], full[f"blocks.1.{kind}"])


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox_sequential", "bert"])
def test_splicing_resid_mid_changes_the_residual_stream(family):
    model, forward = _family(family)
    shift = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    before = _hook_count(model)
    with splice(model, {"blocks.1.hook_resid_mid": lambda a: a + shift}):
        acts = capture_activations(model, _layer1("hook_resid_pre", "hook_attn_out", "hook_resid_post"), _ids(model))
    with torch.no_grad():
        *_, post = forward(model, 1, acts["blocks.1.hook_resid_pre"], acts["blocks.1.hook_attn_out"],
                           replace={"mid": lambda m: m + shift})
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], post)
    assert _hook_count(model) == before


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("kind,key", [("hook_mlp_in", "mlp_in"), ("ln2.hook_normalized", "normalized")])
def test_splicing_an_mlp_input_changes_the_mlp_input_only(family, kind, key):
    model, forward = _family(family)
    shift = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with splice(model, {f"blocks.1.{kind}": lambda a: a + shift}):
        acts = capture_activations(model, _layer1("hook_resid_pre", "hook_attn_out", "hook_resid_post"), _ids(model))
    with torch.no_grad():
        *_, post = forward(model, 1, acts["blocks.1.hook_resid_pre"], acts["blocks.1.hook_attn_out"],
                           replace={key: lambda m: m + shift})
    torch.testing.assert_close(acts["blocks.1.hook_resid_post"], post)
    clean = capture_activations(model, _layer1("hook_resid_post"), _ids(model))["blocks.1.hook_resid_post"]
    assert not torch.allclose(clean, post)  # the shift reached the output, through the MLP alone (post = mid + ...)
