"""Round trip through the real circuit-tracer: our writer's folders, its loaders, its math vs ours.

    python scripts/circuit_tracer_roundtrip.py [--workdir DIR] [--venv bench/.venv-circuit-tracer]

In our env: builds the circuit-tracer venv if missing (its transformers pin, <= 4.57.3, clashes with
ours; torch is installed first, $TORCH or torch==2.13.0, so pip keeps that build), writes random CLTs
(JumpReLU, ReLU) and transcoder sets (ReLU, JumpReLU, each with and without a skip) with
hf_crosscoder.circuit_tracer, plus inputs and our reference features and reconstructions; and tiny
crosscoders of every exportable architecture (cross_layer and per_layer, ReLU, skip, JumpReLU, BatchTopK,
Matryoshka, TopK), trained a few steps on normalized synthetic rows and exported by
`export_to_circuit_tracer` (their scales folded, TopK calibrated to JumpReLU), with the crosscoder's own
raw-scale forward as the reference (TopK: the files' math; its conversion cost is printed). Then runs
itself with --check in that venv, which loads each folder with circuit-tracer's `load_clt` /
`load_transcoder_set` (lazy and eager) and `load_transcoders_from_cache` (reads config.yaml), and
compares its encode / decode / forward / attribution reconstruction with ours. Prints one JSON report;
exits 1 on any mismatch. Needs no Hub and no base model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
L, D, G, N_POS = 4, 16, 48, 7
IN_HOOK, OUT_HOOK = "mlp.hook_in", "mlp.hook_out"
CASES = {  # name: (kind, threshold, skip)
    "clt_jumprelu": ("clt", True, False),
    "clt_relu": ("clt", False, False),
    "set_relu": ("set", False, False),
    "set_jumprelu": ("set", True, False),
    "set_relu_skip": ("set", False, True),
    "set_jumprelu_skip": ("set", True, True),
}

# trained tiny crosscoders exported by export_to_circuit_tracer: name: (layer_structure, architecture)
EXPORTS = {
    "export_clt_relu": ("cross_layer", "crosscoder"),
    "export_clt_jumprelu": ("cross_layer", "jumprelu_crosscoder"),
    "export_clt_batchtopk": ("cross_layer", "batchtopk_crosscoder"),
    "export_clt_topk": ("cross_layer", "topk_crosscoder"),
    "export_set_relu_skip": ("per_layer", "skip_crosscoder"),
    "export_set_jumprelu": ("per_layer", "jumprelu_crosscoder"),
    "export_set_matryoshka": ("per_layer", "matryoshka_batchtopk_crosscoder"),
    "export_set_topk": ("per_layer", "topk_crosscoder"),
}
SCALE_IN, SCALE_OUT = [0.5, 2.0, 3.0, 1.25], [4.0, 0.25, 1.5, 0.8]  # normalization scales (unfolded)
TRAIN_STEPS, TRAIN_BATCH, N_CALIBRATION = 30, 256, 4000


def _case(name: str) -> tuple[str, bool, bool]:
    """(kind, threshold, skip) of a random-tensor or an exported case."""
    if name in CASES:
        return CASES[name]
    structure, arch = EXPORTS[name]
    return ("clt" if structure == "cross_layer" else "set", arch not in ("crosscoder", "skip_crosscoder"),
            arch == "skip_crosscoder")


# --- our side (hf_crosscoder's env) -------------------------------------------------------------

def build_venv(venv: Path) -> None:
    if (venv / "bin" / "python").exists():
        return
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, os.environ.get("TORCH", "torch==2.13.0")], check=True)  # before circuit-tracer pulls one
    subprocess.run([*pip, os.environ.get("CIRCUIT_TRACER", "circuit-tracer==0.5.0")], check=True)


def random_layers(kind: str, threshold: bool, skip: bool, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(L):
        layer = {"W_enc": torch.randn(D, G, generator=g) / D ** 0.5, "b_enc": torch.randn(G, generator=g) * 0.2,
                 "W_dec": torch.randn(G, L - i, D, generator=g) if kind == "clt" else torch.randn(G, D, generator=g),
                 "b_dec": torch.randn(D, generator=g)}
        if threshold:
            layer["threshold"] = torch.rand(G, generator=g) * 0.6
        if skip:
            layer["W_skip"] = torch.randn(D, D, generator=g) / D ** 0.5
        layers.append(layer)
    return layers


def write_cases(work: Path) -> None:
    from hf_crosscoder import circuit_tracer as ct

    for seed, (name, (kind, threshold, skip)) in enumerate(CASES.items()):
        layers = random_layers(kind, threshold, skip, seed)
        folder = work / "cache" / "org" / name  # also an entry of circuit-tracer's cache (cache_dir=work/cache)
        xs = torch.randn(L, N_POS, D, generator=torch.Generator().manual_seed(100 + seed))
        meta = {"model_name": "org/tiny", "feature_input_hook": IN_HOOK, "feature_output_hook": OUT_HOOK,
                "scan": f"org/{name}", "overwrite": True}
        if kind == "clt":
            ct.write_clt(folder, layers, **meta)
            feats, recon = ct.clt_encode(layers, xs), ct.clt_reconstruct(layers, xs)
        else:
            ct.write_transcoder_set(folder, layers, **meta)
            feats = [ct.transcoder_encode(layer, x) for layer, x in zip(layers, xs)]
            recon = torch.stack([ct.transcoder_reconstruct(layer, x) for layer, x in zip(layers, xs)])
        save_file({"xs": xs, "features": torch.stack(feats), "reconstruction": recon},
                  str(work / f"{name}.reference.safetensors"))


# --- circuit-tracer's side (its venv; no hf_crosscoder import) -----------------------------------

def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.float()).abs().max())


def check_clt(folder: Path, ref: dict, threshold: bool) -> dict[str, float]:
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

    out = {}
    xs, cpu = ref["xs"], torch.device("cpu")
    for lazy_enc, lazy_dec in ((False, True), (True, False)):
        clt = load_clt(str(folder), feature_input_hook=IN_HOOK, feature_output_hook=OUT_HOOK, device=cpu,
                       dtype=torch.float32, lazy_encoder=lazy_enc, lazy_decoder=lazy_dec)
        assert isinstance(clt.activation_function, JumpReLU) == threshold, "activation function"
        assert (clt.n_layers, clt.d_transcoder, clt.d_model) == (L, G, D), "shape"
        tag = f"lazy_enc={lazy_enc},lazy_dec={lazy_dec}"
        feats = clt.encode(xs)
        out[f"encode[{tag}]"] = _diff(feats, ref["features"])
        out[f"encode_layer[{tag}]"] = max(_diff(clt.encode_layer(xs[i], i), ref["features"][i]) for i in range(L))
        out[f"decode[{tag}]"] = _diff(clt.decode(feats), ref["reconstruction"])
        out[f"forward[{tag}]"] = _diff(clt(xs), ref["reconstruction"])
        parts = clt.compute_attribution_components(xs, zero_positions=slice(0, 0))
        out[f"attribution_reconstruction[{tag}]"] = _diff(parts["reconstruction"], ref["reconstruction"])
    return out


def check_set(folder: Path, ref: dict, threshold: bool, skip: bool) -> dict[str, float]:
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    out = {}
    xs, cpu = ref["xs"], torch.device("cpu")
    paths = {i: str(folder / f"layer_{i}.safetensors") for i in range(L)}
    for lazy in (True, False):
        ts = load_transcoder_set(paths, scan="x", feature_input_hook=IN_HOOK, feature_output_hook=OUT_HOOK,
                                 device=cpu, dtype=torch.float32, lazy_encoder=lazy, lazy_decoder=lazy)
        assert ts.skip_connection == skip, "skip"
        assert all(isinstance(t.activation_function, JumpReLU) == threshold for t in ts), "activation function"
        feats = ts.encode(xs)
        out[f"encode[lazy={lazy}]"] = _diff(feats, ref["features"])
        out[f"decode[lazy={lazy}]"] = _diff(ts.decode(feats, xs), ref["reconstruction"])
        out[f"forward[lazy={lazy}]"] = max(_diff(t(xs[i]), ref["reconstruction"][i]) for i, t in enumerate(ts))
        parts = ts.compute_attribution_components(xs, zero_positions=slice(0, 0))
        out[f"attribution_reconstruction[lazy={lazy}]"] = _diff(parts["reconstruction"], ref["reconstruction"])
    return out


def check_config(cache: Path, name: str, kind: str, ref: dict) -> dict[str, float]:
    from circuit_tracer.utils.caching import load_transcoders_from_cache

    model, config = load_transcoders_from_cache(f"org/{name}", cache_dir=str(cache), device=torch.device("cpu"),
                                                dtype=torch.float32)
    expected_kind = "cross_layer_transcoder" if kind == "clt" else "transcoder_set"
    assert config["model_kind"] == expected_kind and config["model_name"] == "org/tiny", "config.yaml"
    assert (model.feature_input_hook, model.feature_output_hook, model.scan) == (IN_HOOK, OUT_HOOK, f"org/{name}")
    return {"encode[from config.yaml]": _diff(model.encode(ref["xs"]), ref["features"])}


def _synthetic(g: torch.Generator, n: int, mix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw rows (x [n, L, D], y = a fixed linear map of x plus noise): something to train on."""
    x = torch.randn(n, L, D, generator=g) * torch.linspace(0.5, 2.0, L)[:, None]
    y = torch.einsum("nld,lde->nle", x, mix) + 0.1 * torch.randn(n, L, D, generator=g)
    return x, y


def train_tiny(structure: str, arch: str, seed: int):
    """A tiny crosscoder trained TRAIN_STEPS Adam steps on normalized synthetic rows (scales recorded,
    not folded: the export folds them). Returns it with the synthetic map."""
    from hf_crosscoder import Crosscoder, CrosscoderConfig

    torch.manual_seed(seed)
    cfg = CrosscoderConfig(architecture=arch, layer_structure=structure, d_model=D, d_sae=L * G, k=6,
                           l1_coefficient=1e-3, hook_names_in=[f"blocks.{i}.ln2.hook_normalized" for i in range(L)],
                           hook_names_out=[f"blocks.{i}.hook_mlp_out" for i in range(L)], model_name="org/tiny",
                           activation_scale_in=SCALE_IN, activation_scale_out=SCALE_OUT)
    cc = Crosscoder(cfg).train()
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(L, D, D, generator=g) / D ** 0.5
    s_in, s_out = torch.tensor(SCALE_IN)[:, None], torch.tensor(SCALE_OUT)[:, None]
    opt = torch.optim.Adam(cc.parameters(), lr=3e-3)
    for _ in range(TRAIN_STEPS):
        x, y = _synthetic(g, TRAIN_BATCH, mix)
        loss = cc(x * s_in, y * s_out).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return cc.eval(), mix


def write_exports(work: Path) -> dict:
    """Each EXPORTS case exported into the cache folder, with our references: the crosscoder's own forward
    in raw scale (exact cases) or, for TopK (converted to JumpReLU), the format layer's math on the files
    (the conversion's cost is the export report's). Returns the export reports."""
    from hf_crosscoder import circuit_tracer as ct

    reports = {}
    for seed, (name, (structure, arch)) in enumerate(EXPORTS.items()):
        cc, mix = train_tiny(structure, arch, seed)
        folder = work / "cache" / "org" / name
        g = torch.Generator().manual_seed(1000 + seed)
        calibration = _synthetic(g, N_CALIBRATION, mix)
        reports[name] = ct.export_to_circuit_tracer(cc, folder, activations=calibration, scan=f"org/{name}",
                                                    overwrite=True)
        xs_rows = _synthetic(g, N_POS, mix)[0]
        if arch == "topk_crosscoder":
            read = ct.read_clt if structure == "cross_layer" else ct.read_transcoder_set
            layers, xs = read(folder)[0], xs_rows.transpose(0, 1)
            feats = torch.stack(ct.clt_encode(layers, xs))
            recon = (ct.clt_reconstruct(layers, xs) if structure == "cross_layer" else
                     torch.stack([ct.transcoder_reconstruct(layer, x) for layer, x in zip(layers, xs)]))
        else:
            with torch.no_grad():
                out = cc(xs_rows * torch.tensor(SCALE_IN)[:, None])
            feats = out.feature_acts.view(N_POS, L, G).transpose(0, 1)
            recon = (out.reconstruction / torch.tensor(SCALE_OUT)[:, None]).transpose(0, 1)
        save_file({"xs": xs_rows.transpose(0, 1).contiguous(), "features": feats.contiguous(),
                   "reconstruction": recon.contiguous()}, str(work / f"{name}.reference.safetensors"))
    return reports


def check_all(work: Path, tolerance: float) -> dict:
    import circuit_tracer
    import transformers

    report = {"versions": {"circuit_tracer": circuit_tracer.__version__, "torch": torch.__version__,
                           "transformers": transformers.__version__}, "tolerance": tolerance, "cases": {}}
    ok = True
    for name in [*CASES, *EXPORTS]:
        kind, threshold, skip = _case(name)
        ref = load_file(str(work / f"{name}.reference.safetensors"))
        folder = work / "cache" / "org" / name
        try:
            diffs = check_clt(folder, ref, threshold) if kind == "clt" else check_set(folder, ref, threshold, skip)
            diffs.update(check_config(work / "cache", name, kind, ref))
            scale = float(ref["reconstruction"].abs().max())
            passed = max(diffs.values()) <= tolerance * (1 + scale)
            report["cases"][name] = {"passed": passed, "max_abs_diff": max(diffs.values()), "diffs": diffs,
                                     "active_fraction": float((ref["features"] > 0).float().mean())}
        except Exception as e:  # noqa: BLE001 (a loader failure is a mismatch to report, not a crash)
            passed = False
            report["cases"][name] = {"passed": False, "error": f"{type(e).__name__}: {e}"}
        ok = ok and passed
    report["passed"] = ok
    return report


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=None, help="where the exports go (default: a temp dir)")
    p.add_argument("--venv", type=Path, default=ROOT / "bench" / ".venv-circuit-tracer")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max abs diff allowed, times (1 + max |recon|)")
    p.add_argument("--check", action="store_true", help="(internal) the circuit-tracer side, run in its venv")
    args = p.parse_args()
    if args.check:
        report = check_all(args.workdir, args.tolerance)
        print(json.dumps(report, indent=2))
        return 0 if report["passed"] else 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="circuit_tracer_roundtrip_"))
    work.mkdir(parents=True, exist_ok=True)
    build_venv(args.venv)
    sys.path.insert(0, str(ROOT / "src"))
    write_cases(work)
    reports = write_exports(work)
    (work / "export_reports.json").write_text(json.dumps(reports, indent=2))
    for name, report in reports.items():
        held = report["held_out"]
        print(f"{name}: {report['activation']}, held-out L0 per layer {[round(v, 2) for v in held['l0_original']]}"
              f" -> {[round(v, 2) for v in held['l0_export']]}, FVU {held['fvu_original']:.4f} -> "
              f"{held['fvu_export']:.4f} (cost {held['fvu_cost']:+.4f})")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(args.venv / "bin" / "python"), __file__, "--check", "--workdir", str(work),
           "--tolerance", str(args.tolerance)]
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
