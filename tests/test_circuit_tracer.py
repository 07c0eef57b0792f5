"""Our side of circuit-tracer's format: files, names, orientations, config.yaml, reference math.
(The round trip through circuit-tracer itself: scripts/circuit_tracer_roundtrip.py, in its own venv.)"""

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open

from hf_crosscoder.circuit_tracer import (
    circuit_tracer_hooks,
    clt_encode,
    clt_reconstruct,
    read_clt,
    read_transcoder_set,
    transcoder_reconstruct,
    write_clt,
    write_transcoder_set,
)

L, D, G = 3, 8, 16
META = {"model_name": "org/tiny", "feature_input_hook": "mlp.hook_in", "feature_output_hook": "mlp.hook_out"}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _clt_layers(threshold=True, dtype=torch.float32, seed=0):
    g = _gen(seed)
    layers = []
    for i in range(L):
        layer = {"W_enc": torch.randn(D, G, generator=g), "b_enc": torch.randn(G, generator=g) * 0.1,
                 "W_dec": torch.randn(G, L - i, D, generator=g), "b_dec": torch.randn(D, generator=g)}
        if threshold:
            layer["threshold"] = torch.rand(G, generator=g)
        layers.append({k: v.to(dtype) for k, v in layer.items()})
    return layers


def _set_layers(threshold=False, skip=False, seed=0):
    g = _gen(seed)
    layers = []
    for _ in range(L):
        layer = {"W_enc": torch.randn(D, G, generator=g), "b_enc": torch.randn(G, generator=g) * 0.1,
                 "W_dec": torch.randn(G, D, generator=g), "b_dec": torch.randn(D, generator=g)}
        if threshold:
            layer["threshold"] = torch.rand(G, generator=g)
        if skip:
            layer["W_skip"] = torch.randn(D, D, generator=g)
        layers.append(layer)
    return layers


def _raw(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clt_files_names_orientation_and_round_trip(tmp_path, dtype):
    layers = _clt_layers(dtype=dtype)
    write_clt(tmp_path / "clt", layers, scan="org/tiny-clt", **META)
    names = sorted(p.name for p in (tmp_path / "clt").iterdir())
    assert names == ["W_dec_0.safetensors", "W_dec_1.safetensors", "W_dec_2.safetensors", "W_enc_0.safetensors",
                     "W_enc_1.safetensors", "W_enc_2.safetensors", "config.yaml"]
    for i in range(L):
        enc = _raw(tmp_path / "clt" / f"W_enc_{i}.safetensors")
        assert set(enc) == {f"W_enc_{i}", f"b_enc_{i}", f"b_dec_{i}", f"threshold_{i}"}
        assert enc[f"W_enc_{i}"].shape == (G, D) and enc[f"W_enc_{i}"].dtype == dtype
        assert torch.equal(enc[f"W_enc_{i}"], layers[i]["W_enc"].T)  # [d_transcoder, d_model]: theirs
        dec = _raw(tmp_path / "clt" / f"W_dec_{i}.safetensors")
        assert set(dec) == {f"W_dec_{i}"} and dec[f"W_dec_{i}"].shape == (G, L - i, D)
    back, config = read_clt(tmp_path / "clt")
    _assert_same(back, layers)
    assert config == {"model_kind": "cross_layer_transcoder", **META, "scan": "org/tiny-clt"}


def test_clt_reconstruction_equals_a_dense_block_triangular_decoder(tmp_path):
    layers, _ = read_clt(write_clt(tmp_path, _clt_layers(), **META))
    xs = torch.randn(L, 5, D, generator=_gen(1))
    # independent: circuit-tracer's file orientation (F.linear with [G, d_model]) and one big matrix whose
    # block (i, j) is W_dec_i[:, j - i] for j >= i and zero below the diagonal
    feats = []
    for i in range(L):
        enc = _raw(tmp_path / f"W_enc_{i}.safetensors")
        h = F.linear(xs[i], enc[f"W_enc_{i}"], enc[f"b_enc_{i}"])
        feats.append(torch.where(h > enc[f"threshold_{i}"], h, torch.zeros_like(h)))
    big = torch.zeros(L * G, L * D)
    for i in range(L):
        for j in range(i, L):
            big[i * G:(i + 1) * G, j * D:(j + 1) * D] = layers[i]["W_dec"][:, j - i]
    b_dec = torch.cat([layer["b_dec"] for layer in layers])
    expected = (torch.cat(feats, -1) @ big + b_dec).view(5, L, D).transpose(0, 1)
    for got, want in zip(clt_encode(layers, xs), feats):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(clt_reconstruct(layers, xs), expected)
    assert 0 < sum(int((f > 0).sum()) for f in feats) < L * 5 * G  # the gate really cuts


def test_jumprelu_gate_is_strict_and_relu_without_threshold():
    layer = {"W_enc": torch.eye(2), "b_enc": torch.zeros(2), "W_dec": torch.eye(2), "b_dec": torch.zeros(2),
             "threshold": torch.tensor([0.5, 0.5])}
    x = torch.tensor([[0.5, 0.7], [-1.0, 0.2]])
    torch.testing.assert_close(transcoder_reconstruct(layer, x), torch.tensor([[0.0, 0.7], [0.0, 0.0]]))
    del layer["threshold"]
    torch.testing.assert_close(transcoder_reconstruct(layer, x), torch.tensor([[0.5, 0.7], [0.0, 0.2]]))


@pytest.mark.parametrize("threshold,skip", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["relu", "jumprelu", "relu_skip", "jumprelu_skip"])
def test_transcoder_set_files_and_reconstruction(tmp_path, threshold, skip):
    layers = _set_layers(threshold, skip)
    write_transcoder_set(tmp_path, layers, **META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "layer_0.safetensors",
                                                           "layer_1.safetensors", "layer_2.safetensors"]
    back, config = read_transcoder_set(tmp_path)
    _assert_same(back, layers)
    assert config == {"model_kind": "transcoder_set", **META}
    x = torch.randn(6, D, generator=_gen(2))
    for i in range(L):
        raw = _raw(tmp_path / f"layer_{i}.safetensors")
        assert set(raw) == {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"activation_function.threshold"} if threshold
                                                                    else set()) | ({"W_skip"} if skip else set())
        assert raw["W_enc"].shape == (G, D) and raw["W_dec"].shape == (G, D)
        # independent: circuit-tracer's SingleLayerTranscoder on the raw files (F.linear, x @ W_skip.T)
        h = F.linear(x, raw["W_enc"], raw["b_enc"])
        f = h * (h > raw["activation_function.threshold"]) if threshold else F.relu(h)
        want = f @ raw["W_dec"] + raw["b_dec"] + (x @ raw["W_skip"].T if skip else 0)
        torch.testing.assert_close(transcoder_reconstruct(back[i], x), want)
        if skip:
            torch.testing.assert_close(x @ layers[i]["W_skip"], x @ raw["W_skip"].T)  # ours: y = x @ W_skip


def test_config_yaml_is_what_circuit_tracer_reads(tmp_path):
    write_transcoder_set(tmp_path, _set_layers(), extra={"hf_crosscoder": {"fvu": 0.1}}, **META)
    config = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config == {"model_kind": "transcoder_set", **META, "hf_crosscoder": {"fvu": 0.1}}
    assert "transcoders" not in config  # else the Hub loader reads paths from it instead of globbing layer_*
    with pytest.raises(ValueError, match=r"extra keys \['scan'\] are circuit-tracer's own"):
        write_transcoder_set(tmp_path, _set_layers(), extra={"scan": "x"}, overwrite=True, **META)


def test_bad_layers_are_clear_errors(tmp_path):
    clt = _clt_layers()
    clt[0]["W_skip"] = torch.zeros(D, D)
    with pytest.raises(ValueError, match=r"layer 0: .*unknown \['W_skip'\] \(circuit-tracer's CLT loader reads no skip"):
        write_clt(tmp_path, clt, **META)
    clt = _clt_layers()
    clt[1]["W_dec"] = torch.zeros(G, L, D)  # layer 1 writes L - 1 layers
    with pytest.raises(ValueError, match=r"layer 1: W_dec has shape \(16, 3, 8\), expected \(16, 2, 8\)"):
        write_clt(tmp_path, clt, **META)
    sets = _set_layers(threshold=True)
    del sets[2]["threshold"]
    with pytest.raises(ValueError, match="threshold is given for some layers only"):
        write_transcoder_set(tmp_path, sets, **META)
    with pytest.raises(ValueError, match="no layers to write"):
        write_transcoder_set(tmp_path, [], **META)
    assert not any(tmp_path.iterdir())  # checks run before anything is written


def test_existing_export_needs_overwrite_and_loses_its_extra_layers(tmp_path):
    write_clt(tmp_path, _clt_layers(), **META)
    with pytest.raises(ValueError, match="already holds circuit-tracer files.*overwrite=True"):
        write_transcoder_set(tmp_path, _set_layers(), **META)
    write_transcoder_set(tmp_path, _set_layers()[:2], overwrite=True, **META)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "layer_0.safetensors", "layer_1.safetensors"]
    assert len(read_transcoder_set(tmp_path)[0]) == 2
    with pytest.raises(ValueError, match=r"expected W_enc_0\.safetensors"):
        read_clt(tmp_path)


def _names(kind, n=L):
    return [f"blocks.{i}.{kind}" for i in range(n)]


def test_hook_names_map_to_circuit_tracer_feature_hooks():
    out = _names("hook_mlp_out")
    assert circuit_tracer_hooks(_names("ln2.hook_normalized"), out) == ("mlp.hook_in", "mlp.hook_out")
    assert circuit_tracer_hooks(_names("hook_resid_mid"), out) == ("hook_resid_mid", "mlp.hook_out")
    assert circuit_tracer_hooks(_names("hook_mlp_in"), out) == ("hook_resid_mid", "mlp.hook_out")
    assert circuit_tracer_hooks(_names("ln2.hook_normalized"), out, parallel_residual=True, n_layers=L)[0] == \
        "mlp.hook_in"
    with pytest.raises(ValueError, match="parallel-residual model .*ln2.hook_normalized"):
        circuit_tracer_hooks(_names("hook_mlp_in"), out, parallel_residual=True)
    with pytest.raises(ValueError, match=r"input hook must be one of blocks\.\{i\}\.ln2\.hook_normalized.*"
                                         r"got 'blocks\.0\.hook_resid_post'"):
        circuit_tracer_hooks(_names("hook_resid_post"), out)
    with pytest.raises(ValueError, match=r"output hook must be one of blocks\.\{i\}\.hook_mlp_out"):
        circuit_tracer_hooks(_names("ln2.hook_normalized"), _names("hook_resid_post"))
    with pytest.raises(ValueError, match="one input hook per layer, in order from layer 0"):
        circuit_tracer_hooks(_names("ln2.hook_normalized")[1:] + ["blocks.3.ln2.hook_normalized"], out)
    with pytest.raises(ValueError, match="several kinds"):
        circuit_tracer_hooks(["blocks.0.hook_resid_mid", "blocks.1.ln2.hook_normalized"], out[:2])
    with pytest.raises(ValueError, match="replaces all 4 MLPs of the model; these hooks cover 3 layers"):
        circuit_tracer_hooks(_names("ln2.hook_normalized"), out, n_layers=4)
