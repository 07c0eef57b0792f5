"""SAELens interop: one-hook crosscoders to and from SAELens's on-disk format (sae-lens is not needed).

Verified against the real sae-lens 6.54.12 (torch 2.13 CPU, its own venv): scripts/saelens_roundtrip.py
builds that venv, exports every architecture and loads it with `SAE.load_from_disk` (and
`TrainingSAE.load_from_disk` where SAELens has a training class), and imports SAEs that sae-lens itself
built and saved, comparing outputs both ways (all within 1e-5 relative). tests/test_saelens.py checks our
side against a re-statement of the math below, without sae-lens.

Folder (`SAE.save_model`): `cfg.json` = `cfg.to_dict()`: d_in, d_sae, dtype ("float32"), device,
apply_b_dec_to_input (default True), normalize_activations ("none"), reshape_activations ("none"),
architecture, metadata {sae_lens_version, sae_lens_training_version, model_name, hook_name, hook_head_index,
context_size, dataset_path, ...; transcoders: hook_name_out}; plus per class: topk k and
rescale_acts_by_decoder_norm (TopKSAEConfig default False, TopKTrainingSAEConfig default True);
transcoders d_out. `sae_weights.safetensors`: W_enc [d_in, d_sae], W_dec [d_sae, d_in | d_out], b_enc
[d_sae], b_dec [d_in | d_out]; jumprelu / jumprelu_transcoder threshold [d_sae]; skip_transcoder W_skip
[d_out, d_in]. `load_from_disk` needs architecture, d_in, d_sae and dtype (KeyError without them; the
other fields default, unknown top-level keys are dropped, metadata keeps any key), and a state dict with
exactly the class's parameters (strict load_state_dict: an extra tensor is an error).
A config whose sae_lens_version (top level or metadata) is missing or below 6 is read as the pre-6 flat
layout: hook_point -> hook_name, activation_fn_str -> activation_fn, and activation_fn 'topk' with
activation_fn_kwargs.k -> architecture 'topk' (loading/pretrained_sae_loaders.py: handle_config_defaulting);
so we write "6.0.0" as the format version.

Math (sae_lens/saes/*.py): sae_in = x - b_dec * apply_b_dec_to_input (transcoders: x; SAELens refuses
apply_b_dec_to_input=True there); h = sae_in @ W_enc + b_enc. standard / transcoder: relu(h). jumprelu /
jumprelu_transcoder: relu(h) * (h > threshold), threshold raw (negatives act as 0). topk: with rescale,
h *= ||W_dec|| (row norms); keep the k largest h, relu; decode divides the activations by ||W_dec||
again, so its feature activations are ours times ||W_dec||. Decode: f @ W_dec + b_dec; skip_transcoder's
forward adds x @ W_skip.T (decode alone does not). Training classes: TopKTrainingSAE as topk;
BatchTopKTrainingSAE / MatryoshkaBatchTopKTrainingSAE (architectures "batchtopk" /
"matryoshka_batchtopk", k a float) keep the int(k * batch) largest relu(h [* ||W_dec||]) of the whole
batch, with a float64 buffer topk_threshold in the units of that score; JumpReLUTrainingSAE masks
h * (h > threshold), threshold projected to >= 0 in training. Checkpoints (trainer: `save_model`) keep the
training architecture; the final SAE (runner: `save_inference_model`) is the inference one: TopK with
rescale gets ||W_dec|| folded into W_enc and b_enc (unit decoder rows, flag kept), BatchTopK and
Matryoshka BatchTopK become "jumprelu" with topk_threshold on every latent (after that fold).

Export: the crosscoder must run on raw activations (normalization folded, or never used); one input
hook and one output hook. Different in/out hooks export as SAELens transcoders (d_out, and hook_name_out
in metadata, where SAELens 6 reads it; also at the top level, for readers of earlier layouts: SAELens
drops it there).
Mapping: crosscoder -> standard | transcoder; skip_crosscoder -> skip_transcoder (SAELens has no skip SAE);
jumprelu_crosscoder -> jumprelu | jumprelu_transcoder (threshold = relu(theta)); topk_crosscoder -> topk
with rescale_acts_by_decoder_norm=True (SAELens then ranks h * ||W_dec||, our relu(h) * decoder norm: the
same latents, since with one output hook our normalized-space norm is ||W_dec|| times a constant), or,
for topk_ranking='pre_activation', rescale_acts_by_decoder_norm=False (both rank raw h: SAELens's
default); batchtopk_crosscoder -> jumprelu | jumprelu_transcoder (as SAELens saves BatchTopK),
per-latent threshold = our decoder-scaled threshold / decoder norm. No SAELens TopK transcoder exists.

Import reverses it (standard -> crosscoder, jumprelu -> jumprelu_crosscoder with theta = threshold,
topk -> topk_crosscoder, batchtopk and matryoshka_batchtopk checkpoints -> batchtopk_crosscoder with
threshold = topk_threshold, transcoder / skip_transcoder / jumprelu_transcoder -> the same with
hook_names_out = [hook_name_out]; rescale_acts_by_decoder_norm -> topk_ranking 'decoder_scaled', else
'pre_activation') and folds `apply_b_dec_to_input` into the encoder bias, in float64: b_enc' = b_enc -
b_dec @ W_enc. Refused with a ValueError: architectures we lack (gated, abstopk, jumprelu_skip_transcoder,
temporal, matching_pursuit), normalize_activations other than "none", hook_z / per-head SAEs,
transcoders with d_out != d_in, and non-integer k.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from .config import CrosscoderConfig
from .modeling import ARCHITECTURES, Crosscoder

CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SAELENS_FORMAT_VERSION = "6.0.0"



def _export_names(architecture: str) -> tuple[str | None, str | None]:
    """(SAELens SAE, SAELens transcoder) an architecture declares (`saelens_architectures`)."""
    return getattr(ARCHITECTURES[architecture], "saelens_architectures", (None, None))


def _import_names() -> dict[str, str]:
    """SAELens architecture -> ours, from the architectures' `saelens_imports` declarations."""
    return {name: arch for arch, cls in ARCHITECTURES.items() for name in cls.saelens_imports}


_BATCHTOPK = ("batchtopk", "matryoshka_batchtopk")  # SAELens training classes: rescale by default
_TRANSCODERS = ("transcoder", "skip_transcoder", "jumprelu_transcoder")


# ----------------------------------------------------------------------------------------- export
def _check_exportable(crosscoder: Crosscoder) -> None:
    c = crosscoder.config
    if c.n_in != 1 or c.n_out != 1:
        raise ValueError(f"SAELens holds one input and one output hook per SAE; this crosscoder reads "
                         f"{c.hook_names_in} and writes {c.hook_names_out}. Only SAEs and transcoders "
                         "(one hook in, one out) can be exported.")
    if c.activation_scale_in is not None and not c.activation_norm_folded:
        raise ValueError("Export needs raw-scale weights: call crosscoder.fold_activation_norm_scaling("
                         "config.activation_scale_in, config.activation_scale_out) first.")
    if _export_names(c.architecture) == (None, None):
        exportable = [a for a in ARCHITECTURES if _export_names(a) != (None, None)]
        raise ValueError(f"No SAELens equivalent for architecture {c.architecture!r}; exportable: "
                         f"{', '.join(exportable)}.")


def _saelens_architecture(crosscoder: Crosscoder) -> str:
    c = crosscoder.config
    sae, transcoder = _export_names(c.architecture)
    if c.hook_names_in == c.hook_names_out:
        return sae
    if transcoder is None:
        raise ValueError(f"SAELens has no transcoder for {c.architecture!r} (hooks {c.hook_names_in[0]} -> "
                         f"{c.hook_names_out[0]}); export a crosscoder, skip_crosscoder, jumprelu_crosscoder "
                         "or batchtopk_crosscoder transcoder instead.")
    return transcoder


def _export_state(crosscoder: Crosscoder, architecture: str) -> dict[str, Tensor]:
    W_dec = crosscoder.structure.decoder_vectors(crosscoder.W_dec)
    state = {"W_enc": crosscoder.W_enc[0], "W_dec": W_dec[:, 0], "b_enc": crosscoder.b_enc,
             "b_dec": crosscoder.b_dec[0]}
    if architecture.startswith("jumprelu"):  # JumpReLU itself, or a gate (BatchTopK) expressed as one
        state["threshold"] = crosscoder.pre_activation_threshold()
    if architecture == "skip_transcoder":
        state["W_skip"] = crosscoder.W_skip.T  # SAELens: [d_out, d_in]
    return {k: v.detach().to(crosscoder.W_enc.dtype).contiguous().cpu() for k, v in state.items()}


def _export_cfg(crosscoder: Crosscoder, architecture: str) -> dict[str, Any]:
    c = crosscoder.config
    metadata = {"sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": None,
                "model_name": c.model_name, "hook_name": c.hook_names_in[0], "hook_head_index": None,
                "context_size": c.context_size, "dataset_path": c.dataset_path,
                "exported_by": "hf_crosscoder", "hf_crosscoder_architecture": c.architecture,
                # exact round trip of topk ranking / batchtopk gating through decoder_norms()
                "activation_scale_in": c.activation_scale_in if c.activation_norm_folded else None,
                "activation_scale_out": c.activation_scale_out if c.activation_norm_folded else None}
    cfg = {"architecture": architecture, "d_in": c.d_model, "d_sae": c.d_sae,
           "dtype": str(crosscoder.W_enc.dtype).removeprefix("torch."), "device": "cpu",
           "apply_b_dec_to_input": False, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata}
    if architecture == "topk":
        cfg.update(k=c.k, rescale_acts_by_decoder_norm=c.topk_ranking == "decoder_scaled")
    if architecture in _TRANSCODERS:
        metadata["hook_name_out"] = c.hook_names_out[0]
        cfg.update(d_out=c.d_model, hook_name_out=c.hook_names_out[0])
    return cfg


def export_to_saelens(crosscoder: Crosscoder, folder: str | Path) -> Path:
    """Write a one-hook crosscoder as a SAELens SAE / transcoder folder (cfg.json + sae_weights.safetensors)
    that `sae_lens.SAE.load_from_disk(folder)` reads. Returns the folder."""
    _check_exportable(crosscoder)
    architecture = _saelens_architecture(crosscoder)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_export_state(crosscoder, architecture), str(folder / WEIGHTS_FILENAME))
    (folder / CFG_FILENAME).write_text(json.dumps(_export_cfg(crosscoder, architecture), indent=2))
    return folder


# ----------------------------------------------------------------------------------------- import
def _read_folder(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    for name in (CFG_FILENAME, WEIGHTS_FILENAME):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} has no {name}: not a SAELens SAE folder (expected {CFG_FILENAME} and "
                             f"{WEIGHTS_FILENAME}, as written by SAE.save_model).")
    return json.loads((folder / CFG_FILENAME).read_text()), load_file(str(folder / WEIGHTS_FILENAME))


def _field(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
    """SAELens 6 nests run info in `metadata`; earlier versions kept it at the top level."""
    metadata = cfg.get("metadata") or {}
    value = metadata.get(key)
    return cfg.get(key, default) if value is None else value


def _is_pre_6(cfg: dict[str, Any]) -> bool:
    """SAELens reads a config without metadata.sae_lens_version (or the top-level one) >= 6 as the pre-6
    flat layout (loading/pretrained_sae_loaders.py: handle_config_defaulting)."""
    version = str(cfg.get("sae_lens_version") or (cfg.get("metadata") or {}).get("sae_lens_version") or "0")
    major = version.split(".")[0]
    return not major.isdigit() or int(major) < 6


def _architecture(cfg: dict[str, Any]) -> str:
    """Before 6.0 a TopK SAE was architecture 'standard' with activation_fn(_str) 'topk' and
    activation_fn_kwargs.k; SAELens 6 loads it as 'topk' (rescale_acts_by_decoder_norm=False)."""
    architecture = cfg.get("architecture") or "standard"
    if _is_pre_6(cfg):
        activation = cfg.get("activation_fn") or cfg.get("activation_fn_str")
        if activation == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
            return "topk"
    return architecture


def _check_importable(cfg: dict[str, Any], architecture: str) -> None:
    if architecture not in _import_names():
        raise ValueError(f"SAELens architecture {architecture!r} has no hf_crosscoder equivalent; importable: "
                         f"{', '.join(_import_names())}.")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise ValueError(f"normalize_activations={norm!r}: this SAE rescales its inputs at run time (or needs a "
                         "norm scaling factor not stored in its folder). Fold it first (SAELens: "
                         "sae.fold_activation_norm_scaling_factor(factor); sae.save_model(folder)).")
    head = _field(cfg, "hook_head_index", _field(cfg, "hook_point_head_index"))
    if (cfg.get("reshape_activations") or "none") != "none" or head is not None:
        raise ValueError("hook_z / per-head SAEs are not supported: hf_crosscoder hooks read whole "
                         "residual-width activations.")
    if _field(cfg, "hook_name") is None and _field(cfg, "hook_point") is None:
        raise ValueError("cfg.json names no hook (metadata.hook_name); cannot tell what the SAE reads.")


def _imported_config(cfg: dict[str, Any], architecture: str) -> CrosscoderConfig:
    hook_in = _field(cfg, "hook_name") or _field(cfg, "hook_point")
    hook_out = (_field(cfg, "hook_name_out") or hook_in) if architecture in _TRANSCODERS else hook_in
    d_in, d_out = int(cfg["d_in"]), int(cfg.get("d_out") or cfg["d_in"])
    if d_out != d_in:
        raise ValueError(f"d_out={d_out} differs from d_in={d_in}; a crosscoder reads and writes one width "
                         "(d_model), so this transcoder cannot be imported.")
    k = (cfg.get("activation_fn_kwargs") or {}).get("k") if _is_pre_6(cfg) else None
    k = k or cfg.get("k") or 32
    if float(k) != int(k):
        raise ValueError(f"k={k} is not a whole number; hf_crosscoder's k counts latents per token.")
    scale_in, scale_out = _field(cfg, "activation_scale_in"), _field(cfg, "activation_scale_out")
    # SAELens's TopK default (rescale_acts_by_decoder_norm=False) ranks raw pre-activations, as sparsify does
    rescale = cfg.get("rescale_acts_by_decoder_norm", architecture in _BATCHTOPK)
    return CrosscoderConfig(
        topk_ranking="decoder_scaled" if rescale else "pre_activation",
        architecture=_import_names()[architecture], d_model=d_in, d_sae=int(cfg["d_sae"]), k=int(k),
        hook_names_in=[hook_in], hook_names_out=[hook_out], model_name=_field(cfg, "model_name"),
        dataset_path=_field(cfg, "dataset_path"), context_size=_field(cfg, "context_size"),
        activation_scale_in=scale_in, activation_scale_out=scale_out,
        activation_norm_folded=scale_in is not None and scale_out is not None)


def _imported_state(cfg: dict[str, Any], architecture: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    W_enc, W_dec, b_enc, b_dec = state["W_enc"], state["W_dec"], state["b_enc"], state["b_dec"]
    # SAELens < 6: features scaled before decoding (its `scaling_factor`, used when cfg says so)
    scale = state.get("finetuning_scaling_factor")
    if scale is None and cfg.get("finetuning_scaling_factor"):
        scale = state.get("scaling_factor")
    if scale is not None:
        W_dec = W_dec * scale[:, None]
    if cfg.get("apply_b_dec_to_input", True) and architecture not in _TRANSCODERS:
        # (x - b_dec) @ W_enc + b_enc == x @ W_enc + b_enc' (the fold in float64: one rounding, not two)
        b_enc = (b_enc.double() - b_dec.double() @ W_enc.double()).to(b_enc.dtype)
    out = {"W_enc": W_enc[None], "W_dec": W_dec[:, None], "b_enc": b_enc, "b_dec": b_dec[None]}
    if architecture in ("jumprelu", "jumprelu_transcoder"):
        out["theta"] = state["threshold"] if "threshold" in state else state["log_threshold"].exp()
    if architecture == "skip_transcoder":
        out["W_skip"] = state["W_skip"].T
    if architecture in _BATCHTOPK and "topk_threshold" in state:
        out["threshold"] = state["topk_threshold"].reshape(())
    return out


def import_from_saelens(folder: str | Path) -> Crosscoder:
    """A SAELens SAE / transcoder folder (cfg.json + sae_weights.safetensors) as a Crosscoder with the
    same outputs on raw activations (feature activations of SAELens topk SAEs with
    rescale_acts_by_decoder_norm come out divided by ||W_dec||, i.e. unscaled)."""
    cfg, state = _read_folder(Path(folder))
    architecture = _architecture(cfg)
    _check_importable(cfg, architecture)
    config = _imported_config(cfg, architecture)
    weights = _imported_state(cfg, architecture, state)
    crosscoder = Crosscoder(config)
    missing = set(crosscoder.state_dict()) - set(weights) - {"threshold"}
    if missing:
        raise ValueError(f"sae_weights.safetensors lacks {sorted(missing)} for a {architecture} SAE.")
    with torch.no_grad():
        for name, tensor in weights.items():
            target = crosscoder.get_parameter(name) if name != "threshold" else crosscoder.threshold
            target.copy_(tensor)
    dtype = state["W_enc"].dtype
    return crosscoder.to(dtype) if dtype.is_floating_point else crosscoder
