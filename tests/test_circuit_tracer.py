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
    export_to_circuit_tracer,
    read_clt,
    read_transcoder_set,
    transcoder_encode,
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


# --- export of trained crosscoders -----------------------------------------------------------------

F64 = torch.float64
HOOKS_IN, HOOKS_OUT = _names("ln2.hook_normalized"), _names("hook_mlp_out")
SCALE_IN, SCALE_OUT = [0.5, 2.0, 3.0], [4.0, 0.25, 1.5]  # normalization scales, folded by the export


def _crosscoder(structure, arch, seed=0, hooks_in=HOOKS_IN, **kw):
    """A randomly initialised crosscoder (nonzero biases, thresholds, skip) trained on normalized
    activations (its scales not folded), float64."""
    from hf_crosscoder import Crosscoder, CrosscoderConfig

    torch.manual_seed(seed)
    cfg = CrosscoderConfig(architecture=arch, layer_structure=structure, d_model=D, d_sae=L * G, k=4,
                           hook_names_in=hooks_in, hook_names_out=HOOKS_OUT, model_name="org/tiny",
                           activation_scale_in=SCALE_IN, activation_scale_out=SCALE_OUT, **kw)
    cc = Crosscoder(cfg).double().eval()
    g = _gen(seed + 1)
    with torch.no_grad():
        cc.b_enc.copy_(torch.randn(L * G, generator=g, dtype=F64) * 0.1)
        cc.b_dec.copy_(torch.randn(L, D, generator=g, dtype=F64))
        if hasattr(cc, "theta"):
            cc.theta.copy_(torch.rand(L * G, generator=g, dtype=F64) * 0.3)
        if hasattr(cc, "W_skip"):
            cc.W_skip.copy_(torch.randn(cc.W_skip.shape, generator=g, dtype=F64) * 0.3)
        if arch.endswith("batchtopk_crosscoder"):
            cc.threshold.copy_(torch.rand(L, generator=g, dtype=F64) * 0.2 + 0.05)
    return cc


def _raw_rows(n, seed):
    return torch.randn(n, L, D, generator=_gen(seed), dtype=F64) * torch.tensor([1.0, 0.3, 0.5], dtype=F64)[:, None]


def _ours_raw(cc, x_raw):
    """The crosscoder's own forward in raw scale: it ran on normalized inputs and predicted normalized outputs."""
    s_in, s_out = torch.tensor(SCALE_IN, dtype=F64), torch.tensor(SCALE_OUT, dtype=F64)
    with torch.no_grad():
        out = cc(x_raw * s_in[:, None])
    return out.feature_acts, out.reconstruction / s_out[:, None]


def _theirs(folder, kind, x_raw):
    layers, config = (read_clt if kind == "cross_layer" else read_transcoder_set)(folder)
    xs = x_raw.transpose(0, 1)
    if kind == "cross_layer":
        feats, recon = clt_encode(layers, xs), clt_reconstruct(layers, xs)
    else:
        feats = [transcoder_encode(layer, x) for layer, x in zip(layers, xs)]
        recon = torch.stack([transcoder_reconstruct(layer, x) for layer, x in zip(layers, xs)])
    return layers, config, torch.cat(feats, -1), recon.transpose(0, 1)


EXACT = [("cross_layer", "crosscoder"), ("cross_layer", "jumprelu_crosscoder"),
         ("cross_layer", "batchtopk_crosscoder"), ("cross_layer", "matryoshka_batchtopk_crosscoder"),
         ("per_layer", "crosscoder"), ("per_layer", "skip_crosscoder"), ("per_layer", "jumprelu_crosscoder"),
         ("per_layer", "batchtopk_crosscoder")]


@pytest.mark.parametrize("structure,arch", EXACT, ids=[f"{s}-{a}" for s, a in EXACT])
def test_export_reconstructs_as_the_crosscoder_in_raw_scale(tmp_path, structure, arch):
    cc = _crosscoder(structure, arch)
    before = {k: v.clone() for k, v in cc.state_dict().items()}
    report = export_to_circuit_tracer(cc, tmp_path / "ct", scan="org/tiny-ct")
    assert all(torch.equal(v, before[k]) for k, v in cc.state_dict().items())  # the model itself is untouched
    assert not cc.config.activation_norm_folded
    x = _raw_rows(64, seed=5)
    layers, config, feats, recon = _theirs(tmp_path / "ct", structure, x)
    ours_feats, ours_recon = _ours_raw(cc, x)
    torch.testing.assert_close(recon, ours_recon, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(feats, ours_feats, rtol=1e-10, atol=1e-10)
    assert 0 < int((feats > 0).sum()) < feats.numel()  # the gates really cut
    kind = "cross_layer_transcoder" if structure == "cross_layer" else "transcoder_set"
    assert config["model_kind"] == kind and config["model_name"] == "org/tiny" and config["scan"] == "org/tiny-ct"
    assert (config["feature_input_hook"], config["feature_output_hook"]) == ("mlp.hook_in", "mlp.hook_out")
    assert ("threshold" in layers[0]) == (arch != "crosscoder" and arch != "skip_crosscoder")
    assert ("W_skip" in layers[0]) == (arch == "skip_crosscoder")
    assert all(t.dtype == F64 for layer in layers for t in layer.values())
    assert report["model_kind"] == kind and report["n_layers"] == L and report["d_transcoder"] == G
    assert "calibration" not in report  # no activations: nothing to compare on


@pytest.mark.parametrize("structure", ["cross_layer", "per_layer"])
def test_topk_exports_as_rate_matched_jumprelu(tmp_path, structure):
    cc = _crosscoder(structure, "topk_crosscoder")
    x_cal = _raw_rows(3000, seed=7)
    x_norm = x_cal * torch.tensor(SCALE_IN, dtype=F64)[:, None]
    with torch.no_grad():
        y = cc(x_norm).reconstruction / torch.tensor(SCALE_OUT, dtype=F64)[:, None]
    y = y + 0.3 * torch.randn(y.shape, generator=_gen(8), dtype=F64)  # targets the TopK model misses a bit
    batches = [(x_cal[i:i + 1000], y[i:i + 1000]) for i in range(0, 3000, 1000)]  # an iterable of pairs
    report = export_to_circuit_tracer(cc, tmp_path, activations=iter(batches), holdout_fraction=0.25)
    assert report["activation"] == "jumprelu_rate_matched"
    cal, held = report["calibration"], report["held_out"]
    assert cal["rows"] == 2250 and held["rows"] == 750
    assert cal["l0_original"] == pytest.approx([4.0] * L, abs=0.05)  # k per group (some picks are 0)
    assert cal["l0_export"] == pytest.approx(cal["l0_original"], abs=1e-12)  # matched on the calibration rows
    assert held["l0_export"] == pytest.approx(held["l0_original"], rel=0.1)
    assert held["fvu_cost"] == pytest.approx(held["fvu_export"] - held["fvu_original"])
    assert 0 < held["fvu_export_vs_original"] < 1 and held["fvu_cost"] > 0
    # independently, on fresh rows: what the files do vs the TopK model
    x = _raw_rows(2000, seed=9)
    layers, _, feats, recon = _theirs(tmp_path, structure, x)
    ours_feats, ours_recon = _ours_raw(cc, x)
    l0_ours = (ours_feats > 0).double().sum(0).view(L, G).sum(1) / 2000
    l0_theirs = (feats > 0).double().sum(0).view(L, G).sum(1) / 2000
    torch.testing.assert_close(l0_theirs, l0_ours, rtol=0.1, atol=0)
    assert all(bool((layer["threshold"] >= 0).all()) for layer in layers)
    err = (recon - ours_recon).pow(2).sum() / (ours_recon - ours_recon.mean(0)).pow(2).sum()
    assert float(err) == pytest.approx(held["fvu_export_vs_original"], rel=0.25)


def test_exact_exports_report_no_cost_on_activations(tmp_path):
    cc = _crosscoder("per_layer", "jumprelu_crosscoder")
    report = export_to_circuit_tracer(cc, tmp_path, activations=_raw_rows(200, seed=3).flatten(1))
    for split in ("calibration", "held_out"):
        assert report[split]["l0_export"] == pytest.approx(report[split]["l0_original"], abs=1e-12)
        assert report[split]["fvu_export_vs_original"] < 1e-20
        assert "fvu_cost" not in report[split]  # no targets given


def test_export_refuses_what_circuit_tracer_cannot_load(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="layer_structure='dense'.*--layer_structure cross_layer"):
        export_to_circuit_tracer(_crosscoder("dense", "crosscoder"), out)
    with pytest.raises(ValueError, match="CLT loader reads no skip weights.*per_layer skip_crosscoder"):
        export_to_circuit_tracer(_crosscoder("cross_layer", "skip_crosscoder"), out)
    with pytest.raises(ValueError, match=r"input hook must be one of .*got 'blocks\.0\.hook_resid_post'"):
        export_to_circuit_tracer(_crosscoder("per_layer", "crosscoder", hooks_in=_names("hook_resid_post")), out)
    with pytest.raises(ValueError, match="calibrated on activations; pass activations="):
        export_to_circuit_tracer(_crosscoder("cross_layer", "topk_crosscoder"), out)
    cc = _crosscoder("cross_layer", "crosscoder")
    cc.config.model_name = None
    with pytest.raises(ValueError, match="pass model_name="):
        export_to_circuit_tracer(cc, out)
    with pytest.raises(ValueError, match=r"a batch has shape \(5, 7\)"):
        export_to_circuit_tracer(_crosscoder("cross_layer", "crosscoder"), out, activations=torch.zeros(5, 7))
    assert not out.exists()  # every check runs before anything is written


def test_export_never_replaces_a_folder_without_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    cc = _crosscoder("per_layer", "crosscoder")
    with pytest.raises(ValueError, match="exists and is not empty; pass overwrite=True"):
        export_to_circuit_tracer(cc, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    export_to_circuit_tracer(_crosscoder("cross_layer", "crosscoder"), tmp_path / "ct")
    export_to_circuit_tracer(cc, tmp_path / "ct", overwrite=True)  # the CLT's files go, the set's come
    assert sorted(p.name for p in (tmp_path / "ct").iterdir()) == ["config.yaml"] + [
        f"layer_{i}.safetensors" for i in range(L)]


# --- command line ----------------------------------------------------------------------------------

def _saved_run(path, tiny_model_dir, text_dataset_path, structure="per_layer", arch="topk_crosscoder",
               hook_in="ln2.hook_normalized"):
    from hf_crosscoder import Crosscoder, CrosscoderConfig

    torch.manual_seed(0)
    n = 4  # the tiny GPT-NeoX's layers
    cfg = CrosscoderConfig(architecture=arch, layer_structure=structure, d_model=64, d_sae=n * 32, k=4,
                           hook_names_in=[f"blocks.{i}.{hook_in}" for i in range(n)],
                           hook_names_out=[f"blocks.{i}.hook_mlp_out" for i in range(n)],
                           model_name=tiny_model_dir, dataset_path=text_dataset_path, context_size=32)
    Crosscoder(cfg).save_pretrained(path)
    return str(path)


def test_cli_harvests_calibration_tokens_and_exports(tmp_path, tiny_model_dir, text_dataset_path, capsys):
    from hf_crosscoder.circuit_tracer import main

    run = _saved_run(tmp_path / "run", tiny_model_dir, text_dataset_path)
    out = tmp_path / "ct"
    report = main([run, "--out", str(out), "--calibration_tokens", "640", "--batch_size", "4", "--device", "cpu",
                   "--model_name", "org/tiny-neox"])
    assert report["activation"] == "jumprelu_rate_matched" and report["model_kind"] == "transcoder_set"
    assert report["calibration"]["rows"] + report["held_out"]["rows"] >= 600  # BOS positions left out
    # within 10%, not exactly: pythia's layer-0 MLP input is a function of the token alone (parallel
    # residual), so repeated tokens tie and pass or fail a threshold together
    assert report["calibration"]["l0_export"] == pytest.approx(report["calibration"]["l0_original"], rel=0.1)
    assert "fvu_cost" in report["held_out"]  # the harvested outputs are the targets
    layers, config = read_transcoder_set(out)
    assert len(layers) == 4 and config["model_name"] == "org/tiny-neox" and "threshold" in layers[0]
    assert yaml.safe_load((out / "config.yaml").read_text())["feature_input_hook"] == "mlp.hook_in"
    assert '"jumprelu_rate_matched"' in capsys.readouterr().out and (out / "export_report.json").is_file()


def test_cli_errors_are_one_line(tmp_path, tiny_model_dir, text_dataset_path, capsys):
    from hf_crosscoder.circuit_tracer import main

    dense = _saved_run(tmp_path / "dense", tiny_model_dir, text_dataset_path, structure="dense", arch="crosscoder")
    with pytest.raises(SystemExit) as err:
        main([dense, "--out", str(tmp_path / "a")])
    assert err.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # (progress bars)
    assert len(errors) == 1 and errors[0].split("error: ")[1].startswith("circuit-tracer loads")
    assert "layer_structure='dense'" in errors[0]
    # pythia is parallel-residual: its hook_mlp_in is resid_pre, which circuit-tracer cannot hook
    mlp_in = _saved_run(tmp_path / "mlp_in", tiny_model_dir, text_dataset_path, hook_in="hook_mlp_in")
    with pytest.raises(SystemExit):
        main([mlp_in, "--out", str(tmp_path / "b"), "--calibration_tokens", "64"])
    assert "parallel-residual model" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
