"""Verify hf_crosscoder's SAELens interop against the real `sae-lens` package, both directions.

sae-lens pins its own transformers / transformer-lens, so it lives in its own virtual env
(bench/.venv-saelens, gitignored; built on first use: the CPU torch 2.13.0 first, so pip never pulls a
CUDA build, then sae-lens). This one file runs in both envs, one stage per process:

  ours-export (our env)   crosscoders of every exportable architecture, normalization folded, written
                          with export_to_saelens; their inputs and outputs saved beside them.
  saelens     (sae env)   direction A: SAE.load_from_disk (and TrainingSAE.load_from_disk where SAELens
                          has a training class) on each export, encode / forward compared to ours.
                          Direction B: SAELens SAEs of each architecture (inference and training
                          classes, apply_b_dec_to_input on and off), weights randomized, saved with
                          save_model / save_inference_model as SAELens's trainer does, reloaded,
                          their outputs saved.
  ours-import (our env)   direction B: import_from_saelens on each folder, outputs compared; the
                          architectures we lack must be refused with a ValueError.

Usage: python scripts/saelens_roundtrip.py [--workdir DIR] [--saelens-version 6.x.y], with the python of
an env that has hf_crosscoder's requirements (its src/ is put on PYTHONPATH); SAELENS_VENV moves the venv.
Prints a JSON report (one row per case) and exits 1 if any case fails (relative max abs difference
above 1e-5 of reconstruction or feature activations, wrong architecture, or a missing refusal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("SAELENS_VENV", ROOT / "bench" / ".venv-saelens"))  # gitignored (bench/.venv-*/)
TORCH_PIN = "torch==2.13.0"  # the CPU build; installed before sae-lens so pip keeps it
RTOL = 1e-5
D, S, K, N = 16, 64, 4, 256
HOOK, HOOK_OUT = "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------ shared helpers
def rel_diff(a, b) -> tuple[float, float]:
    """(max |a - b|, that over max |b|)."""
    diff = float((a.double() - b.double()).abs().max())
    return diff, diff / max(float(b.double().abs().max()), 1e-30)


def row(case: str, direction: str, recon, recon_ref, acts, acts_ref, ok: bool = True, **extra) -> dict:
    r_abs, r_rel = rel_diff(recon, recon_ref)
    f_abs, f_rel = rel_diff(acts, acts_ref)
    passed = ok and r_rel <= RTOL and f_rel <= RTOL
    l0 = float((acts_ref != 0).sum(-1).double().mean())  # so a reader sees the gates are not trivial
    return {"case": case, "direction": direction, "recon_max_abs": r_abs, "recon_rel": r_rel,
            "acts_max_abs": f_abs, "acts_rel": f_rel, "l0": l0, "pass": passed, **extra}


def control_row(r: dict) -> dict:
    """A deliberately wrong mapping must be caught: passes when the comparison fails clearly."""
    caught = r.get("recon_rel", 0) > 1e-3 or r.get("acts_rel", 0) > 1e-3
    return {**r, "case": "control_" + r["case"], "expect": "mismatch", "pass": caught}


def refusal_row(case: str, direction: str, error: str | None) -> dict:
    return {"case": case, "direction": direction, "expect": "ValueError", "error": error,
            "pass": error is not None}


def save_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=1))


# ------------------------------------------------------------------------------------ stage: ours-export
A_CASES = {  # case -> (architecture, topk_ranking, output hook, SAELens architecture, acts relation)
    "crosscoder": ("crosscoder", None, HOOK, "standard", "equal"),
    "crosscoder_transcoder": ("crosscoder", None, HOOK_OUT, "transcoder", "equal"),
    "skip_crosscoder": ("skip_crosscoder", None, HOOK, "skip_transcoder", "equal"),
    "skip_crosscoder_transcoder": ("skip_crosscoder", None, HOOK_OUT, "skip_transcoder", "equal"),
    "jumprelu_crosscoder": ("jumprelu_crosscoder", None, HOOK, "jumprelu", "equal"),
    "jumprelu_transcoder": ("jumprelu_crosscoder", None, HOOK_OUT, "jumprelu_transcoder", "equal"),
    # SAELens's rescaled TopK returns relu(h) * ||W_dec|| as its feature activations
    "topk_decoder_scaled": ("topk_crosscoder", "decoder_scaled", HOOK, "topk", "times_decoder_norm"),
    "topk_pre_activation": ("topk_crosscoder", "pre_activation", HOOK, "topk", "equal"),
    "batchtopk_decoder_scaled": ("batchtopk_crosscoder", "decoder_scaled", HOOK, "jumprelu", "equal"),
    "batchtopk_pre_activation": ("batchtopk_crosscoder", "pre_activation", HOOK, "jumprelu", "equal"),
    "batchtopk_transcoder": ("batchtopk_crosscoder", "decoder_scaled", HOOK_OUT, "jumprelu_transcoder", "equal"),
    # Matryoshka BatchTopK exports as BatchTopK does (its nesting only shapes training)
    "matryoshka_decoder_scaled": ("matryoshka_batchtopk_crosscoder", "decoder_scaled", HOOK, "jumprelu", "equal"),
}


def _trained_like(architecture: str, ranking: str | None, hook_out: str, seed: int):
    """A crosscoder with weights as training leaves them: unequal decoder norms, biases, thresholds
    that gate about k latents per token, and a folded input/output normalization."""
    import torch

    from hf_crosscoder import Crosscoder, CrosscoderConfig

    torch.manual_seed(seed)
    extra = {"topk_ranking": ranking} if ranking else {}
    cc = Crosscoder(CrosscoderConfig(architecture=architecture, d_model=D, d_sae=S, k=K, hook_names_in=[HOOK],
                                     hook_names_out=[hook_out], model_name="EleutherAI/pythia-70m", **extra))
    x_norm = torch.randn(N, D)
    with torch.no_grad():
        cc.W_enc.add_(torch.randn_like(cc.W_enc) * 0.3)
        cc.W_dec.mul_(torch.rand(S, 1, 1) * 2.8 + 0.2)
        cc.b_enc.normal_(0, 0.1)
        cc.b_dec.normal_(0, 0.5)
        if architecture == "skip_crosscoder":
            cc.W_skip.normal_(0, 0.1)
        h = cc.pre_activations(x_norm)
        if architecture == "jumprelu_crosscoder":  # some negative: used as relu(theta)
            cc.theta.copy_(h.std(0) * (torch.rand(S) * 1.4 - 0.3))
        if "batchtopk" in architecture:  # a threshold that keeps about k latents per token
            scores = h.relu() * cc.rank_scale(cc.decoder_norms())
            cc.threshold.fill_(float(scores.flatten().quantile(1 - K / S)))
    cc.fold_activation_norm_scaling([0.5], [0.25 if hook_out != HOOK else 0.5])
    return cc.eval()


def stage_ours_export(work: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from hf_crosscoder.modeling import ARCHITECTURES
    from hf_crosscoder.saelens import export_to_saelens

    cases = {}
    for seed, (case, (arch, ranking, hook_out, sl_arch, relation)) in enumerate(A_CASES.items()):
        cc = _trained_like(arch, ranking, hook_out, seed)
        folder = work / "A" / case
        export_to_saelens(cc, folder / "sae")
        x = torch.randn(N, D, generator=torch.Generator().manual_seed(100 + seed)) * 2.0  # raw scale
        with torch.no_grad():
            out = cc(x)
        save_file({"x": x, "feature_acts": out.feature_acts.contiguous(),
                   "reconstruction": out.reconstruction.contiguous()}, str(folder / "ours.safetensors"))
        cases[case] = {"saelens_architecture": sl_arch, "acts": relation}
    # an architecture added to our registry (matryoshka, ...) fails the run until it has a case here
    uncovered = sorted(set(ARCHITECTURES) - {arch for arch, *_ in A_CASES.values()})
    save_json(work / "A" / "cases.json", {"cases": cases, "our_architectures": sorted(ARCHITECTURES),
                                          "uncovered": uncovered})


# ------------------------------------------------------------------------------------ stage: saelens
def _saelens_outputs(sae, x):
    import torch

    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.forward(x)
        decoded = sae.decode(acts)
        if hasattr(sae, "W_skip"):
            decoded = decoded + x @ sae.W_skip.T
    return acts, recon, decoded


def _check_a_case(case: str, spec: dict, folder: Path) -> list[dict]:
    from sae_lens import SAE, TrainingSAE
    from sae_lens.registry import SAE_TRAINING_CLASS_REGISTRY
    from safetensors.torch import load_file

    ours = load_file(str(folder / "ours.safetensors"))
    x, acts_ours, recon_ours = ours["x"], ours["feature_acts"], ours["reconstruction"]
    rows = []
    loaders = [("SAE", SAE)]
    if spec["saelens_architecture"] in SAE_TRAINING_CLASS_REGISTRY:
        loaders.append(("TrainingSAE", TrainingSAE))
    for loader_name, loader in loaders:
        sae = loader.load_from_disk(folder / "sae")
        acts, recon, decoded = _saelens_outputs(sae, x)
        ref_acts = acts_ours * sae.W_dec.norm(dim=-1) if spec["acts"] == "times_decoder_norm" else acts_ours
        arch_ok = sae.cfg.architecture() == spec["saelens_architecture"]
        r = row(case, f"ours->saelens ({loader_name}.load_from_disk)", recon, recon_ours, acts, ref_acts,
                ok=arch_ok and rel_diff(decoded, recon_ours)[1] <= RTOL,
                saelens_class=type(sae).__name__, acts_relation=spec["acts"])
        rows.append(r)
    return rows


def _control_a(work: Path) -> dict:
    """Our pre_activation TopK export read with SAELens's rescaling switched on must not match."""
    import shutil

    src, dst = work / "A" / "topk_pre_activation", work / "A" / "topk_pre_activation_flipped"
    shutil.copytree(src, dst, dirs_exist_ok=True)
    cfg = json.loads((dst / "sae" / "cfg.json").read_text())
    save_json(dst / "sae" / "cfg.json", {**cfg, "rescale_acts_by_decoder_norm": True})
    r = _check_a_case("topk_pre_activation_flipped", {"saelens_architecture": "topk", "acts": "equal"}, dst)[0]
    return control_row({**r, "direction": r["direction"] + ", rescale_acts_by_decoder_norm flipped"})


def _randomize(sae, seed: int) -> None:
    """Weights as training leaves them: decoder rows of unequal norm, non-zero biases."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) * 0.4)
        norms = torch.rand(sae.W_dec.shape[0], 1, generator=g) * 2.8 + 0.2
        sae.W_dec.copy_(torch.randn(sae.W_dec.shape, generator=g) / D ** 0.5 * norms)
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g) * 0.5)
        for name in ("b_enc", "b_gate", "b_mag", "r_mag"):
            if isinstance(getattr(sae, name, None), torch.nn.Parameter):
                getattr(sae, name).copy_(torch.randn(getattr(sae, name).shape, generator=g) * 0.1)
        if hasattr(sae, "W_skip"):
            sae.W_skip.copy_(torch.randn(sae.W_skip.shape, generator=g) * 0.1)


def _hidden_pre(sae, x):
    with __import__("torch").no_grad():
        return sae.process_sae_in(x) @ sae.W_enc + sae.b_enc


def _set_thresholds(sae, x, allow_negative: bool, seed: int) -> None:
    """JumpReLU thresholds spread over the pre-activations' range (negative ones only where SAELens
    allows them: its training projects thresholds to >= 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    low = -0.3 if allow_negative else 0.0
    with torch.no_grad():
        sae.threshold.copy_(_hidden_pre(sae, x).std(0) * (torch.rand(S, generator=g) * (1.2 - low) + low))


def _set_batchtopk_threshold(sae, x) -> None:
    """topk_threshold as SAELens estimates it, in units of the ranked score (h * ||W_dec|| when rescaling):
    here the quantile that keeps about k latents per token."""
    import torch

    h = _hidden_pre(sae, x)
    if sae.cfg.rescale_acts_by_decoder_norm:
        h = h * sae.W_dec.norm(dim=-1)
    sae.topk_threshold = torch.tensor(float(h.relu().flatten().quantile(1 - K / S)), dtype=torch.double)


def _metadata(transcoder: bool = False):
    from sae_lens.saes.sae import SAEMetadata

    extra = {"hook_name_out": HOOK_OUT} if transcoder else {}
    return SAEMetadata(model_name="gpt2", hook_name=HOOK, context_size=128, dataset_path="monology/pile", **extra)


def _b_specs() -> dict:
    """case -> (class name, config class name, config kwargs, how it is saved and loaded, expected)."""
    topk, bt = {"k": K}, {"k": K}
    specs = {}
    for b in (True, False):
        tag = "bdec" if b else "nobdec"
        specs[f"standard_{tag}"] = ("StandardSAE", "StandardSAEConfig", {"apply_b_dec_to_input": b}, "inference",
                                    ("crosscoder", None))
        specs[f"jumprelu_{tag}"] = ("JumpReLUSAE", "JumpReLUSAEConfig", {"apply_b_dec_to_input": b}, "inference",
                                    ("jumprelu_crosscoder", None))
        for rescale in (False, True):
            r = "rescale" if rescale else "norescale"
            ranking = "decoder_scaled" if rescale else "pre_activation"
            kw = {**topk, "rescale_acts_by_decoder_norm": rescale, "apply_b_dec_to_input": b}
            specs[f"topk_{r}_{tag}"] = ("TopKSAE", "TopKSAEConfig", kw, "inference", ("topk_crosscoder", ranking))
            specs[f"topk_training_{r}_{tag}"] = ("TopKTrainingSAE", "TopKTrainingSAEConfig", kw, "checkpoint",
                                                 ("topk_crosscoder", ranking))
            bkw = {**bt, "rescale_acts_by_decoder_norm": rescale, "apply_b_dec_to_input": b}
            for cls in ("BatchTopK", "MatryoshkaBatchTopK"):
                name = cls.lower().replace("matryoshkabatchtopk", "matryoshka_batchtopk")
                extra = {"matryoshka_widths": [16, S]} if cls.startswith("Matryoshka") else {}
                cfg = (f"{cls}TrainingSAE", f"{cls}TrainingSAEConfig", {**bkw, **extra})
                specs[f"{name}_checkpoint_{r}_{tag}"] = (*cfg, "checkpoint", ("batchtopk_crosscoder", ranking))
                specs[f"{name}_inference_{r}_{tag}"] = (*cfg, "saved_for_inference", ("jumprelu_crosscoder", None))
    specs["topk_training_inference_rescale"] = ("TopKTrainingSAE", "TopKTrainingSAEConfig",
                                                {**topk, "rescale_acts_by_decoder_norm": True},
                                                "saved_for_inference", ("topk_crosscoder", "decoder_scaled"))
    specs["standard_training"] = ("StandardTrainingSAE", "StandardTrainingSAEConfig", {}, "checkpoint",
                                  ("crosscoder", None))
    specs["jumprelu_training"] = ("JumpReLUTrainingSAE", "JumpReLUTrainingSAEConfig", {}, "checkpoint",
                                  ("jumprelu_crosscoder", None))
    tc = {"d_out": D, "apply_b_dec_to_input": False}
    specs["transcoder"] = ("Transcoder", "TranscoderConfig", tc, "inference", ("crosscoder", None))
    specs["skip_transcoder"] = ("SkipTranscoder", "SkipTranscoderConfig", tc, "inference", ("skip_crosscoder", None))
    specs["jumprelu_transcoder"] = ("JumpReLUTranscoder", "JumpReLUTranscoderConfig", tc, "inference",
                                    ("jumprelu_crosscoder", None))
    # SAELens SAEs with no hf_crosscoder equivalent: the import must refuse them
    specs["refuse_gated"] = ("GatedSAE", "GatedSAEConfig", {}, "inference", "refuse")
    specs["refuse_abstopk"] = ("AbsTopKSAE", "AbsTopKSAEConfig", topk, "inference", "refuse")
    specs["refuse_jumprelu_skip_transcoder"] = ("JumpReLUSkipTranscoder", "JumpReLUSkipTranscoderConfig", tc,
                                                "inference", "refuse")
    specs["refuse_unfolded_norm"] = ("StandardSAE", "StandardSAEConfig",
                                     {"normalize_activations": "expected_average_only_in"}, "inference", "refuse")
    specs["refuse_transcoder_d_out"] = ("Transcoder", "TranscoderConfig", {**tc, "d_out": D // 2}, "inference",
                                        "refuse")
    return specs


def _build_b(cls_name: str, cfg_name: str, kwargs: dict, seed: int):
    import sae_lens
    import torch

    transcoder = "Transcoder" in cls_name
    cfg = getattr(sae_lens, cfg_name)(d_in=D, d_sae=S, metadata=_metadata(transcoder), **kwargs)
    sae = getattr(sae_lens, cls_name)(cfg)
    _randomize(sae, seed)
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(1000 + seed)) * 2.0
    if hasattr(sae, "threshold"):
        _set_thresholds(sae, x, allow_negative="Training" not in cls_name, seed=seed)
    if hasattr(sae, "topk_threshold"):
        _set_batchtopk_threshold(sae, x)
    return sae, x


def _save_b(sae, how: str, folder: Path):
    """Save as SAELens does (trainer checkpoints: save_model; the runner's final SAE:
    save_inference_model; inference classes: save_model) and reload with the loader a user would."""
    from sae_lens import SAE, TrainingSAE

    if how == "saved_for_inference":
        sae.save_inference_model(folder)
        return SAE.load_from_disk(folder)
    sae.save_model(folder)
    return TrainingSAE.load_from_disk(folder) if how == "checkpoint" else SAE.load_from_disk(folder)


def _reference(loaded, x, folder: Path, name: str, decoder_norm=None) -> None:
    """SAELens's outputs on x and the decoder norms that relate its feature activations to ours (its
    own, or for a folded save_inference_model, those of the checkpoint it came from)."""
    import torch
    from safetensors.torch import save_file

    acts, recon, _ = _saelens_outputs(loaded, x)
    with torch.no_grad():
        dn = loaded.W_dec.norm(dim=-1) if decoder_norm is None else decoder_norm
    save_file({"x": x, "feature_acts": acts.contiguous(), "reconstruction": recon.contiguous(),
               "decoder_norm": dn.contiguous()}, str(folder / name))


def _acts_relation(loaded) -> str:
    return "times_decoder_norm" if getattr(loaded.cfg, "rescale_acts_by_decoder_norm", False) else "equal"


def _make_b_case(case: str, spec: tuple, seed: int, folder: Path) -> dict:
    """{case: what ours-import checks}; a BatchTopK checkpoint gives two: its batch top-k (our training
    mode) and its inference behaviour, which SAELens defines by save_inference_model (our eval mode)."""
    from sae_lens import SAE

    cls_name, cfg_name, kwargs, how, expected = spec
    sae, x = _build_b(cls_name, cfg_name, kwargs, seed)
    loaded = _save_b(sae, how, folder / "sae")
    _reference(loaded, x, folder, "saelens.safetensors")
    batch = how == "checkpoint" and "BatchTopK" in cls_name
    entry = {"folder": case, "ref": "saelens.safetensors", "saelens_class": type(loaded).__name__,
             "saved_as": loaded.cfg.architecture(), "how": how, "expected": expected,
             "acts": _acts_relation(loaded), "mode": "train" if batch else "eval"}
    cases = {case: entry}
    if batch:
        sae.save_inference_model(folder / "inference")
        inference = SAE.load_from_disk(folder / "inference")
        # rescaled: save_inference_model folds ||W_dec|| into the encoder, so its JumpReLU activations
        # are relu(h) * ||W_dec|| of the checkpoint (the scale of SAELens's BatchTopK activations)
        _reference(inference, x, folder, "saelens_inference.safetensors", loaded.W_dec.norm(dim=-1).detach())
        cases[case + "_eval"] = {**entry, "ref": "saelens_inference.safetensors", "mode": "eval",
                                 "how": "checkpoint vs its save_inference_model",
                                 "saelens_class": type(inference).__name__}
    return cases


def _add_pre6_cases(work: Path, cases: dict) -> None:
    """Configs as SAELens < 6 wrote them (flat, hook_point, activation_fn_str, no version): SAELens 6
    still loads them (handle_pre_6_0_config); TopK was architecture 'standard' + activation_fn 'topk'."""
    import torch
    from sae_lens import SAE
    from safetensors.torch import save_file

    for i, (case, act) in enumerate((("pre6_standard", "relu"), ("pre6_topk", "topk"))):
        folder = work / "B" / case
        (folder / "sae").mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(500 + i)
        w = {"W_enc": torch.randn(D, S, generator=g) * 0.4, "b_enc": torch.randn(S, generator=g) * 0.1,
             "W_dec": torch.randn(S, D, generator=g) * (torch.rand(S, 1, generator=g) + 0.2),
             "b_dec": torch.randn(D, generator=g) * 0.5}
        save_file(w, str(folder / "sae" / "sae_weights.safetensors"))
        cfg = {"architecture": "standard", "d_in": D, "d_sae": S, "dtype": "float32", "device": "cpu",
               "model_name": "gpt2", "hook_point": HOOK, "hook_point_layer": 0, "hook_point_head_index": None,
               "activation_fn_str": act, "apply_b_dec_to_input": True, "finetuning_scaling_factor": False,
               "context_size": 128, "dataset_path": "monology/pile", "normalize_activations": "none",
               "sae_lens_training_version": "3.13.0"}
        if act == "topk":
            cfg["activation_fn_kwargs"] = {"k": K}
        save_json(folder / "sae" / "cfg.json", cfg)
        loaded = SAE.load_from_disk(folder / "sae")
        _reference(loaded, torch.randn(N, D, generator=g) * 2.0, folder, "saelens.safetensors")
        expected = ("topk_crosscoder", "pre_activation") if act == "topk" else ("crosscoder", None)
        cases[case] = {"folder": case, "ref": "saelens.safetensors", "saelens_class": type(loaded).__name__,
                       "saved_as": loaded.cfg.architecture(), "how": "pre-6 config", "expected": expected,
                       "acts": "equal", "mode": "eval"}


def stage_saelens(work: Path) -> None:
    import warnings

    import sae_lens

    warnings.filterwarnings("ignore")
    spec_a = json.loads((work / "A" / "cases.json").read_text())
    rows = []
    for case, spec in spec_a["cases"].items():
        rows += guarded(_check_a_case, case, "ours->saelens", spec, work / "A" / case)
    rows += guarded(lambda _case: _control_a(work), "control_topk_pre_activation", "ours->saelens")
    cases = {}
    for seed, (case, spec) in enumerate(_b_specs().items()):
        cases.update(_make_b_case(case, spec, seed, work / "B" / case))
    _add_pre6_cases(work, cases)
    save_json(work / "B" / "cases.json", {"cases": cases, "saelens_version": sae_lens.__version__})
    save_json(work / "A" / "results.json", rows)


# ------------------------------------------------------------------------------------ stage: ours-import
def _import_b_case(case: str, spec: dict, work: Path, ranking_override: str | None = None) -> dict:
    import torch
    from safetensors.torch import load_file

    from hf_crosscoder.saelens import import_from_saelens

    folder = work / "B" / spec["folder"]
    direction = f"saelens->ours ({spec['saelens_class']}, {spec['how']})"
    if spec["expected"] == "refuse":
        try:
            import_from_saelens(folder / "sae")
        except ValueError as e:
            return refusal_row(case, direction, str(e))
        return refusal_row(case, direction, None)
    ref = load_file(str(folder / spec["ref"]))
    cc = import_from_saelens(folder / "sae")
    if ranking_override:
        cc.config.topk_ranking = ranking_override
    cc.train(spec["mode"] == "train")
    with torch.no_grad():
        out = cc(ref["x"])
    acts = out.feature_acts * ref["decoder_norm"] if spec["acts"] == "times_decoder_norm" else out.feature_acts
    arch, ranking = spec["expected"]
    got = (cc.config.architecture, cc.config.topk_ranking if ranking else None)
    return row(case, direction, out.reconstruction, ref["reconstruction"], acts, ref["feature_acts"],
               ok=got == (arch, ranking) or ranking_override is not None, imported_as=cc.config.architecture,
               topk_ranking=cc.config.topk_ranking if ranking else None, mode=spec["mode"],
               acts_relation=spec["acts"])


def guarded(fn, case: str, direction: str, *args) -> list[dict]:
    """fn's rows, or one failed row carrying the error: one broken case must not hide the others."""
    try:
        rows = fn(case, *args)
    except Exception as e:  # noqa: BLE001 - reported as a failed case
        return [{"case": case, "direction": direction, "pass": False, "error": f"{type(e).__name__}: {e}"}]
    return rows if isinstance(rows, list) else [rows]


def stage_ours_import(work: Path) -> None:
    spec = json.loads((work / "B" / "cases.json").read_text())
    rows = []
    for case, s in spec["cases"].items():
        rows += guarded(_import_b_case, case, "saelens->ours", s, work)
    # SAELens's default TopK imported with our decoder-scaled ranking must not match
    flipped = guarded(_import_b_case, "topk_norescale_bdec", "saelens->ours", spec["cases"]["topk_norescale_bdec"],
                      work, "decoder_scaled")[0]
    rows.append(control_row({**flipped, "direction": flipped["direction"] + ", imported as decoder_scaled"}))
    save_json(work / "B" / "results.json", rows)


# ------------------------------------------------------------------------------------ orchestration
def ensure_venv(version: str | None) -> Path:
    """bench/.venv-saelens with the CPU torch first, then sae-lens (reused when present)."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run(["python3", "-m", "venv", str(VENV)], check=True)
    have = subprocess.run([str(python), "-c", "import sae_lens, torch; print(sae_lens.__version__)"],
                          capture_output=True, text=True)
    if have.returncode != 0 or (version and have.stdout.strip() != version):
        pip = [str(python), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, TORCH_PIN], check=True)
        subprocess.run([*pip, f"sae-lens=={version}" if version else "sae-lens>=6,<7", "safetensors"], check=True)
    return python


def run_stage(python: str, stage: str, work: Path, pythonpath: str | None) -> None:
    env = {**os.environ, **OFFLINE}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    else:
        env.pop("PYTHONPATH", None)  # the SAELens env must not see our package
    subprocess.run([python, __file__, "--stage", stage, "--workdir", str(work)], check=True, env=env)


def orchestrate(args) -> int:
    saelens_python = str(ensure_venv(args.saelens_version))
    ours_python, src = args.ours_python or sys.executable, str(ROOT / "src")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="saelens_roundtrip_"))
    run_stage(ours_python, "ours-export", work, src)
    run_stage(saelens_python, "saelens", work, None)
    run_stage(ours_python, "ours-import", work, src)
    rows = json.loads((work / "A" / "results.json").read_text()) + json.loads((work / "B" / "results.json").read_text())
    for arch in json.loads((work / "A" / "cases.json").read_text())["uncovered"]:
        rows.append({"case": arch, "direction": "ours->saelens", "pass": False,
                     "error": "in hf_crosscoder's ARCHITECTURES but no export case in A_CASES"})
    version = json.loads((work / "B" / "cases.json").read_text())["saelens_version"]
    failed = [r["case"] + " / " + r["direction"] for r in rows if not r["pass"]]
    print(json.dumps({"sae_lens_version": version, "rtol": RTOL, "workdir": str(work), "results": rows,
                      "n_cases": len(rows), "failed": failed}, indent=1))
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="where the folders and outputs go (default: a new temporary folder)")
    p.add_argument("--saelens-version", help="pin sae-lens (default: the newest 6.x)")
    p.add_argument("--ours-python", help="python of the env with hf_crosscoder's requirements (default: this one)")
    p.add_argument("--stage", choices=["ours-export", "saelens", "ours-import"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.stage is None:
        return orchestrate(args)
    work = Path(args.workdir)
    {"ours-export": stage_ours_export, "saelens": stage_saelens, "ours-import": stage_ours_import}[args.stage](work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
