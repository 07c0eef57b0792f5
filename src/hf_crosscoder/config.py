"""Crosscoder hyper-parameters, defined once.

`CrosscoderArgs` is the single list of architecture hyper-parameters (name, default, help). The saved
`CrosscoderConfig` (a `PretrainedConfig`, what goes into config.json) and the runner's dataclass config
both take their fields and defaults from it, so one flag name means one thing everywhere. Likewise
`HarvestArgs` (model, data, harvesting; with `HookArgs`, the hooks both share) is declared once for the
runner's config and the activation cache's (`cache.CacheActivationsRunnerConfig`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PretrainedConfig

CONFIG_VERSION = 1

# Registered checks of the named choices that live in other modules: "architecture" (modeling.py) and
# "layer_structure" (structures.py) register each of their names with its check of the config, so this
# module, a leaf, validates them without importing either (the package imports both on import).
CONFIG_CHECKS: dict[str, dict[str, Any]] = {"layer_structure": {}, "architecture": {}}


def register_config_check(kind: str, name: str, check: Any) -> None:
    """Make `name` a valid value of the config field `kind`, validated by `check(config)`."""
    CONFIG_CHECKS[kind][name] = check


def hook_union(hooks_in: list[str], hooks_out: list[str]) -> list[str]:
    """Every hook read or written, each once, inputs first (what is harvested and stored)."""
    return list(dict.fromkeys([*hooks_in, *hooks_out]))


def n_models(c: Any) -> int:
    """How many models a config's crosscoder reads (its `model_names`, else one)."""
    names = getattr(c, "model_names", None)
    return len(names) if names else 1


def layer_labels(c: Any, side: str) -> list[str]:
    """The name of each input (`side` 'in') or output ('out') layer of the crosscoder's layer axis: its
    hooks, or for several models the (model, hook) pairs as `model/hook`, model-major (the acts index of
    model m's hook h is m * n_hooks + h)."""
    return per_model(getattr(c, "model_names", None), c.hook_names_in if side == "in" else c.hook_names_out)


def stored_layers(c: Any) -> list[str]:
    """The layers a store (or an activation cache) holds, each once: the hooks read or written (inputs first),
    per model (model-major, `model/hook`) when `c.model_names` lists several."""
    return per_model(getattr(c, "model_names", None), hook_union(c.hook_names_in, c.hook_names_out))


def per_model(model_names: list[str] | None, hooks: list[str]) -> list[str]:
    """`hooks`, or for several models every (model, hook) pair as `model/hook`, model-major."""
    return [f"{m}/{h}" for m in model_names for h in hooks] if model_names else list(hooks)


def validate_model_names(c: Any) -> None:
    """model_names (model diffing): None, or two or more distinct names, on the dense structure only."""
    names = getattr(c, "model_names", None)
    if names is None:
        return
    if isinstance(names, str) or len(names) < 2:
        raise ValueError(f"model_names must list two or more models (Hub ids or local folders) to diff; got "
                         f"{names!r}. For one model use model_name.")
    if len(set(names)) != len(names):
        raise ValueError(f"model_names lists a model twice: {list(names)}; list each model once.")
    if getattr(c, "layer_structure", "dense") != "dense":
        raise ValueError(f"layer_structure={c.layer_structure!r} is not supported with model_names (model "
                         "diffing); use layer_structure='dense'.")


def torch_dtype(name: str) -> torch.dtype:
    """'float32' / 'bfloat16' / 'torch.float16' -> the torch dtype; ValueError for anything else."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype={name!r} is not a torch dtype; use float32, bfloat16 or float16.")
    return dtype


def arg(default: Any = None, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field whose help text becomes the CLI's `--help` (HfArgumentParser reads metadata)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class HookArgs:
    """The hooked activations: what the crosscoder reads and reconstructs is what the harvester captures."""

    d_model: int = arg(512, "Width of each hooked activation (the model's hidden size; 512 for pythia-70m).")
    hook_names_in: list[str] = arg([], "Hooks the crosscoder reads, e.g. blocks.0.hook_resid_post "
                                   "blocks.1.hook_resid_post (TransformerLens-style names or module paths).")
    hook_names_out: list[str] = arg([], "Hooks the crosscoder reconstructs (same as the inputs: acausal; "
                                    "later layers: causal; any mix).")


@dataclass
class CrosscoderArgs(HookArgs):
    """Architecture hyper-parameters shared by `CrosscoderConfig` and the training runner's config."""

    architecture: str = arg("crosscoder", "Sparsity family, a registered architecture (hf_crosscoder."
                            "ARCHITECTURES).")
    layer_structure: str = arg("dense", "Which latents read and write which hooks: 'dense' (all to all), "
                               "'cross_layer' (a CLT: latent group i reads input hook i, writes output hooks "
                               "i..L-1) or 'per_layer' (group i reads input hook i, writes output hook i).")
    d_sae: int = arg(4096, "Number of latents (dictionary size).")
    l1_coefficient: float = arg(1.0, "Sparsity coefficient: scales the decoder-norm-weighted L1 (ReLU "
                                "architectures) or the L0/tanh penalty (JumpReLU). Unused by TopK.")
    sparsity_decoder_norm: str = arg("sum", "How a latent's decoder norm across output layers is taken: "
                                     "'sum' of per-layer L2 norms (Anthropic crosscoder) or 'concat' "
                                     "(L2 of the concatenation: an SAE on the stacked layers).")
    k: int = arg(32, "Active latents per token for topk_crosscoder (batchtopk: on average); per layer group "
                 "for the cross_layer / per_layer structures.")
    matryoshka_widths: list[int] | None = arg(None, "matryoshka_batchtopk_crosscoder: increasing prefix sizes "
                                              "whose last is d_sae (per layer group: d_sae / layers), e.g. "
                                              "512 2048 8192; default d_sae/16, d_sae/4, d_sae.")
    topk_ranking: str = arg("decoder_scaled", "How TopK/BatchTopK rank latents: 'decoder_scaled' = "
                            "relu(h) * decoder norm (selection does not drift with the decoder's scale), or "
                            "'pre_activation' = raw h (SAELens with rescale_acts_by_decoder_norm=False, "
                            "sparsify).")
    k_aux: int | None = arg(None, "Dead latents used by the AuxK loss per token (per layer group); default "
                            "d_model // 2 per output hook (dense: len(hook_names_out) * d_model // 2, the same "
                            "for a model diff), capped at d_sae.")
    aux_coefficient: float = arg(0.5, "Weight of the AuxK loss (TopK/BatchTopK), on the summed squared error "
                                 "as SAELens weighs it (BENCHMARKS.md, fidelity).")
    jumprelu_init_threshold: float = arg(0.01, "Initial JumpReLU threshold (0.1 for the tanh recipe).")
    jumprelu_bandwidth: float = arg(0.05, "Width of the rectangle kernel of the straight-through "
                                    "estimator (2.0 for the tanh recipe).")
    jumprelu_sparsity: str = arg("step", "JumpReLU sparsity penalty: 'step' (L0, SAELens) or 'tanh' "
                                 "(Anthropic Jan 2025: tanh(c * f * decoder_norm)).")
    jumprelu_tanh_scale: float = arg(4.0, "The c in the tanh penalty.")
    jumprelu_pre_act_coefficient: float = arg(3e-6, "Weight of the pre-activation loss "
                                              "relu(theta - h) * decoder_norm that revives latents.")
    jumprelu_pre_act_latents: str = arg("dead", "Latents the pre-activation loss applies to: 'dead' "
                                        "(SAELens, default), 'all' (Anthropic) or 'none'.")
    n_shared_latents: int = arg(0, "Model diffing: the first N latents have one decoder vector per hook, "
                                "shared by every model (Anthropic, Feb 2025); the rest are free.")
    shared_sparsity_scale: float = arg(1.0, "Multiplier of the shared latents' L1 term (crosscoder, "
                                       "skip_crosscoder; Anthropic used 0.1-0.2: shared latents then cost less "
                                       "than model-specific ones).")
    batchtopk_threshold_momentum: float = arg(0.99, "EMA momentum of the BatchTopK inference threshold.")
    decoder_init_norm: float = arg(0.1, "Initial L2 norm of each latent's decoder vector in each layer.")


ARG_DEFAULTS = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(CrosscoderArgs)}

SPARSITY_DECODER_NORMS = ("sum", "concat")
JUMPRELU_SPARSITIES = ("step", "tanh")
PRE_ACT_LATENTS = ("dead", "all", "none")
TOPK_RANKINGS = ("decoder_scaled", "pre_activation")
L1_ARCHITECTURES = ("crosscoder", "skip_crosscoder")  # whose sparsity term is L1 weighted by decoder norms


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; use one of {', '.join(choices)}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(c: Any, names: tuple[str, ...], low: float, strict: bool = False) -> None:
    """Each named number of `c` is finite and >= low (> low if strict); else a ValueError naming it."""
    for name in names:
        value = getattr(c, name)
        ok = isinstance(value, (int, float)) and math.isfinite(value) and (value > low if strict else value >= low)
        if not ok:
            raise ValueError(f"{name} must be {'>' if strict else '>='} {low}; got {value!r}.")


def check_positive(c: Any, names: tuple[str, ...]) -> None:
    """Each named count of `c` is > 0; else a ValueError naming it."""
    for name in names:
        if getattr(c, name) <= 0:
            raise ValueError(f"{name} must be positive; got {getattr(c, name)}.")


def validate_hook_args(c: Any) -> None:
    """The `HookArgs` checks (duck-typed): both hook lists given, d_model positive."""
    for name in ("hook_names_in", "hook_names_out"):
        hooks = getattr(c, name)
        if isinstance(hooks, str) or not hooks:
            raise ValueError(f"{name} must be a non-empty list of hook names, e.g. "
                             f"['blocks.0.hook_resid_post']; got {hooks!r}.")
    if not _is_int(c.d_model) or c.d_model <= 0:
        raise ValueError(f"d_model must be a positive integer (the model's hidden size); got {c.d_model}.")


def _registered(kind: str, c: Any) -> None:
    value, checks = getattr(c, kind), CONFIG_CHECKS[kind]
    if value not in checks:
        raise ValueError(f"Unknown {kind.replace('_', ' ')} {value!r}; valid {kind.replace('_', ' ')}s: "
                         f"{', '.join(checks)}.")
    checks[value](c)


def validate_crosscoder_args(c: Any) -> None:
    """Raise a ValueError naming the fix for any inconsistent hyper-parameter (duck-typed on `c`)."""
    validate_hook_args(c)
    validate_model_names(c)
    for name in ("hook_names_in", "hook_names_out"):
        hooks = getattr(c, name)
        if len(set(hooks)) != len(hooks):
            raise ValueError(f"{name} lists a hook twice: {hooks}; list each hook once.")
    if c.d_sae is not None and (not _is_int(c.d_sae) or c.d_sae <= 0):
        raise ValueError(f"d_sae must be a positive number of latents; got {c.d_sae}.")
    _registered("layer_structure", c)
    _registered("architecture", c)  # its own hyper-parameters (k, widths, ...) once the structure is valid
    check_range(c, ("l1_coefficient", "aux_coefficient", "jumprelu_init_threshold",
                    "jumprelu_pre_act_coefficient"), 0)
    check_range(c, ("jumprelu_bandwidth", "jumprelu_tanh_scale", "decoder_init_norm"), 0, strict=True)
    if not 0.0 <= c.batchtopk_threshold_momentum < 1.0:
        raise ValueError("batchtopk_threshold_momentum must be in [0, 1); "
                         f"got {c.batchtopk_threshold_momentum}.")
    _choice("sparsity_decoder_norm", c.sparsity_decoder_norm, SPARSITY_DECODER_NORMS)
    _choice("jumprelu_sparsity", c.jumprelu_sparsity, JUMPRELU_SPARSITIES)
    _choice("jumprelu_pre_act_latents", c.jumprelu_pre_act_latents, PRE_ACT_LATENTS)
    _choice("topk_ranking", c.topk_ranking, TOPK_RANKINGS)
    _check_shared_latents(c)


def _check_shared_latents(c: Any) -> None:
    check_range(c, ("shared_sparsity_scale",), 0)
    if not _is_int(c.n_shared_latents) or c.n_shared_latents < 0:
        raise ValueError(f"n_shared_latents must be an integer >= 0; got {c.n_shared_latents!r}.")
    if c.n_shared_latents and getattr(c, "model_names", None) is None:
        raise ValueError("n_shared_latents ties decoder vectors across models; it needs model_names (two or "
                         "more models). Set n_shared_latents=0 for one model.")
    if c.d_sae is not None and c.n_shared_latents > c.d_sae:
        raise ValueError(f"n_shared_latents={c.n_shared_latents} exceeds d_sae={c.d_sae}.")
    if c.shared_sparsity_scale != 1 and c.architecture not in L1_ARCHITECTURES:
        raise ValueError(f"shared_sparsity_scale scales the decoder-norm-weighted L1 term of "
                         f"{' / '.join(L1_ARCHITECTURES)}; architecture={c.architecture!r} has none it applies to. "
                         "Leave shared_sparsity_scale at 1.")


class CrosscoderConfig(PretrainedConfig):
    """config.json of a crosscoder: its hyper-parameters plus where its activations came from.

    Hyper-parameters are those of `CrosscoderArgs` (same names and defaults). `d_in` and `d_out` are
    derived (`d_model * n_models * len(hook_names_in|out)`, n_models = len(model_names) or 1); passing inconsistent values raises. Provenance fields
    (`model_name`, `dataset_path`, `context_size`, `training_tokens`, the per-hook activation scales and
    whether they were folded into the weights) make config.json alone say what the model was trained on.
    """

    model_type = "crosscoder"
    PROVENANCE = {
        "model_name": None,  # public names (naming.py): Hub ids, else a folder / file name, never a path
        "model_names": None,  # model diffing: every model, in the order of the layer axis (model-major)
        "dataset_path": None,
        "model_is_local": None,  # the weights / data came from a local folder or file
        "dataset_is_local": None,
        "context_size": None,
        "training_tokens": None,
        "activation_scale_in": None,   # per-hook scalars the training activations were multiplied by
        "activation_scale_out": None,
        "activation_norm_folded": False,  # True once those scales live in the weights (raw-scale model)
        "config_version": CONFIG_VERSION,
    }

    def __init__(self, d_in: int | None = None, d_out: int | None = None, **kwargs: Any) -> None:
        for name, default in {**ARG_DEFAULTS, **self.PROVENANCE}.items():
            value = kwargs.pop(name, default)
            setattr(self, name, list(value) if isinstance(value, (list, tuple)) else value)
        super().__init__(**kwargs)
        validate_crosscoder_args(self)
        for name, given, derived in (("d_in", d_in, self.d_in), ("d_out", d_out, self.d_out)):
            if given is not None and given != derived:
                hooks = "hook_names_in" if name == "d_in" else "hook_names_out"
                times = "d_model * len(model_names)" if self.model_names else "d_model"
                raise ValueError(f"{name}={given} does not match {times} * len({hooks}) = {derived}; "
                                 f"drop {name} (it is derived) or fix d_model / {hooks}.")
        if self.k_aux is None:  # per group of latents: a layered structure's group writes one hook or more
            # a model diff's latents write every model at once: k_aux per hook, not per (model, hook), so AuxK
            # costs a diff what the rest does (2x for 2 models), not 4x (BENCHMARKS.md, model diffing)
            groups, hooks = (1, len(self.hook_names_out)) if self.layer_structure == "dense" else (self.n_in, 1)
            self.k_aux = min(self.d_sae // groups, max(1, hooks * (self.d_model // 2)))  # d_model 1: not 0

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> CrosscoderConfig:
        model_type = config_dict.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"This config.json has model_type={model_type!r}, not 'crosscoder': it is not a "
                             "crosscoder. Load it with transformers' Auto classes, or point Crosscoder."
                             "from_pretrained at a folder or repo written by Crosscoder.save_pretrained.")
        version = config_dict.get("config_version", 1)
        if version > CONFIG_VERSION:
            raise ValueError(f"config_version={version} was written by a newer hf_crosscoder (this one "
                             f"reads up to {CONFIG_VERSION}); upgrade hf_crosscoder.")
        return super().from_dict(config_dict, **kwargs)

    @property
    def n_in(self) -> int:
        """Input layers: (model, hook) pairs, model-major (one model: the input hooks)."""
        return n_models(self) * len(self.hook_names_in)

    @property
    def n_out(self) -> int:
        return n_models(self) * len(self.hook_names_out)

    @property
    def d_in(self) -> int:
        return self.d_model * self.n_in

    @property
    def d_out(self) -> int:
        return self.d_model * self.n_out

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["d_in"], out["d_out"] = self.d_in, self.d_out  # written for readers; re-derived on load
        return out

    # PretrainedConfig's task defaults that mean nothing for a crosscoder (labels, chunking, output flags);
    # left out of config.json, PretrainedConfig restores them on load
    UNUSED_PRETRAINED_KEYS = ("id2label", "label2id", "problem_type", "chunk_size_feed_forward",
                              "is_encoder_decoder", "output_hidden_states", "output_attentions", "return_dict",
                              "_name_or_path")

    def to_diff_dict(self) -> dict[str, Any]:
        # config.json is the provenance record: write every field, not only those differing from defaults
        return {k: v for k, v in self.to_dict().items() if k not in self.UNUSED_PRETRAINED_KEYS}


NORMALIZATIONS = ("none", "expected_average")
LR_SCHEDULERS = ("constant", "cosineannealing", "linear")
HUB_STRATEGIES = ("end", "checkpoint")
B_DEC_INITS = ("mean", "zeros")
DEAD_WINDOW_TOKENS = 10_000_000  # OpenAI's TopK recipe: dead = no activation in 10M tokens
DEAD_WINDOW_RUN_FRACTION = 0.1


@dataclass
class HarvestArgs(HookArgs):
    """What the model, the data and the harvester need: shared by the training runner's config and the
    activation cache's (`CacheActivationsRunnerConfig`), so both take the same flags."""

    # --- model ---
    model_name: str = arg("EleutherAI/pythia-70m", "Hub id or local directory of the transformers model.")
    model_names: list[str] | None = arg(None, "Model diffing: two or more models (Hub ids or local folders) "
                                        "read on the same tokens by one crosscoder; they must share the "
                                        "tokenizer and d_model. model_name then reads as model_names[0].")
    model_devices: list[str] | None = arg(None, "With model_names: one device per model (e.g. cuda:0 "
                                          "cuda:1); default: every model on the training device.")
    base_model_id: str | None = arg(None, "Hub id of the model, for the model card's base_model when "
                                    "model_name is a local folder (default: read from the folder's model card "
                                    "or config, else its folder name).")
    model_class_name: str = arg("AutoModelForCausalLM", "transformers Auto class that loads it "
                                "(AutoModel for encoders such as BERT).")
    dtype: str = arg("float32", "dtype of the frozen model, and of the activations a cache writes "
                     "(bfloat16 is a GPU option).")
    device: str | None = arg(None, "Device; default: the accelerator's (cuda if present, else cpu).")
    # --- data ---
    dataset_path: str = arg("roneneldan/TinyStories", "datasets name, local file (.txt/.json/.jsonl/"
                            ".parquet/.arrow) or a save_to_disk directory.")
    dataset_name: str | None = arg(None, "datasets configuration name, if the dataset has several.")
    dataset_split: str = arg("train", "Split to read.")
    streaming: bool = arg(True, "Stream the dataset (never loads the corpus whole).")
    dataset_text_column: str | None = arg(None, "Text column; auto-detected ('text', 'content', ...) "
                                          "when not given.")
    is_dataset_tokenized: bool = arg(False, "The dataset holds token ids ('input_ids' or 'tokens').")
    context_size: int = arg(128, "Tokens per packed sequence.")
    prepend_bos: bool = arg(True, "Put the tokenizer's BOS (or EOS) token between packed documents.")
    exclude_special_tokens: bool = arg(True, "Leave BOS/EOS/PAD positions (attention sinks with outsized "
                                       "norms) out of training batches and out of a cache being written "
                                       "(False keeps them in the cache, flagged is_special).")
    # --- harvesting ---
    training_tokens: int = arg(2_000_000, "Total training tokens, or activation rows a cache writes "
                               "(global across processes).")
    store_batch_size_prompts: int = arg(32, "Sequences per model forward when harvesting (lower on OOM).")
    compile_llm: bool = arg(False, "torch.compile the frozen model (each layer's forward).")
    autocast_lm: bool = arg(False, "bf16 autocast for the model forward (GPU).")
    seed: int = arg(42, "Random seed.")

    def __post_init__(self) -> None:
        validate_hook_args(self)
        check_positive(self, ("context_size", "training_tokens", "store_batch_size_prompts"))
        torch_dtype(self.dtype)
        self._resolve_model_names()

    def _resolve_model_names(self) -> None:
        """model_names given: model_name (left at its default, or equal) becomes model_names[0]."""
        if self.model_names is None:
            if self.model_devices is not None:
                raise ValueError("model_devices places the models of model_names; give model_names too, or "
                                 "use device for one model.")
            return
        self.model_names = list(self.model_names)
        validate_model_names(self)
        default = HarvestArgs.__dataclass_fields__["model_name"].default
        if self.model_name not in (default, self.model_names[0]):
            raise ValueError(f"model_name={self.model_name!r} and model_names={self.model_names} disagree; give "
                             "model_names only (model_name then reads as model_names[0]).")
        self.model_name = self.model_names[0]
        if self.model_devices is not None and len(self.model_devices) != len(self.model_names):
            raise ValueError(f"model_devices lists {len(self.model_devices)} devices for {len(self.model_names)} "
                             "models; give one device per entry of model_names.")


@dataclass
class StoreArgs:
    """The activations store: shuffle buffer, normalization, or an activation cache instead of the model."""

    n_batches_in_buffer: int | None = arg(None, "Shuffle buffer size in training batches (lower on OOM); "
                                          "default: as many as hold 20 harvests (20 x store_batch_size_prompts "
                                          "x context_size tokens, SAELens's buffer), at least 20.")
    normalize_activations: str = arg("expected_average", "'expected_average': scale each hook so its "
                                     "mean norm is sqrt(d_model) (folded into the saved weights); "
                                     "'none'.")
    n_batches_for_norm_estimate: int = arg(8, "Harvest batches used to estimate the per-hook scales.")
    cached_activations_path: str | None = arg(None, "Train from an activation cache written by "
                                              "CacheActivationsRunner (the model is not loaded).")

    def validate_store_args(self) -> None:
        check_positive(self, ("n_batches_for_norm_estimate",))
        if self.n_batches_in_buffer is not None and self.n_batches_in_buffer < 2:
            raise ValueError("n_batches_in_buffer must be >= 2 (half the buffer is served while the other "
                             "half refills).")
        _choice("normalize_activations", self.normalize_activations, NORMALIZATIONS)


@dataclass
class TrainerArgs:
    """What the optimization loop (trainer.CrosscoderTrainer) reads: its own slice of a run's config."""

    train_batch_size_tokens: int = arg(4096, "Tokens per optimizer step (global across processes).")
    lr: float = arg(3e-4, "Adam learning rate.")
    adam_beta1: float = arg(0.9, "Adam beta1.")
    adam_beta2: float = arg(0.999, "Adam beta2.")
    lr_scheduler_name: str = arg("constant", "constant, cosineannealing or linear (after warmup).")
    lr_warmup_steps: int = arg(0, "Linear warmup steps from 0.")
    lr_decay_steps: int = arg(0, "Linear decay to lr_end over the last N steps (constant scheduler).")
    lr_end: float | None = arg(None, "Final lr for decay/cosine; default lr / 10.")
    l1_warmup_steps: int = arg(0, "Ramp the sparsity coefficient linearly from 0 over N steps.")
    max_grad_norm: float = arg(1.0, "Gradient clipping norm (0 disables).")
    dead_feature_window: int | None = arg(None, "A latent that has not fired for more than this many steps is "
                                          "dead (feeds AuxK and the pre-activation loss); default: 10M tokens "
                                          "of steps, at most a tenth of the run, so AuxK engages in short runs.")
    b_dec_init_method: str = arg("mean", "Decoder bias at the start: 'mean' of each output hook's "
                                 "normalized activations over the first buffer (SAELens's name), or 'zeros'.")
    feature_sampling_window: int = arg(2000, "Steps over which feature densities are measured for logs.")
    wandb_log_frequency: int = arg(10, "Log training metrics every N steps.")
    eval_every_n_wandb_logs: int = arg(100, "Run evals every N logging steps (also without wandb).")
    compile_crosscoder: bool = arg(False, "torch.compile the crosscoder's loss.")
    autocast: bool = arg(False, "bf16 autocast for the crosscoder (GPU).")

    def validate_trainer_args(self) -> None:
        check_positive(self, ("train_batch_size_tokens", "feature_sampling_window", "wandb_log_frequency",
                              "eval_every_n_wandb_logs"))
        if self.dead_feature_window is not None:
            check_positive(self, ("dead_feature_window",))
        _choice("b_dec_init_method", self.b_dec_init_method, B_DEC_INITS)
        check_range(self, ("lr_warmup_steps", "lr_decay_steps", "l1_warmup_steps", "max_grad_norm",
                           "adam_beta1", "adam_beta2"), 0)
        check_range(self, ("lr",), 0, strict=True)
        if self.lr_end is not None:
            check_range(self, ("lr_end",), 0)
        if max(self.adam_beta1, self.adam_beta2) >= 1:
            raise ValueError(f"adam_beta1/adam_beta2 must be < 1; got {self.adam_beta1}, {self.adam_beta2}.")
        _choice("lr_scheduler_name", self.lr_scheduler_name, LR_SCHEDULERS)

    def dead_window_steps(self, total_steps: int) -> int:
        """`dead_feature_window`, or DEAD_WINDOW_TOKENS of steps capped at a tenth of the run's steps."""
        if self.dead_feature_window is not None:
            return self.dead_feature_window
        tokens = min(DEAD_WINDOW_TOKENS, DEAD_WINDOW_RUN_FRACTION * total_steps * self.train_batch_size_tokens)
        return max(1, math.ceil(tokens / self.train_batch_size_tokens))

    def trainer_args(self) -> TrainerArgs:
        """A plain TrainerArgs with this config's values (what the trainer is given)."""
        return TrainerArgs(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TrainerArgs)})


@dataclass
class EvalArgs:
    """Evaluation during and after training."""

    n_eval_batches: int = arg(10, "Harvest batches per eval (store_batch_size_prompts sequences each).")
    eval_dataset_path: str | None = arg(None, "A separate dataset to evaluate on (same forms as dataset_path); "
                                        "default: a held-out slice of dataset_path (eval_holdout_sequences).")
    eval_dataset_split: str | None = arg(None, "Split of eval_dataset_path (default dataset_split), e.g. "
                                         "validation.")
    eval_holdout_sequences: int | None = arg(None, "Without eval_dataset_path: sequences per process held out "
                                             "from the start of dataset_path for evaluation, never trained on "
                                             "(default n_eval_batches * store_batch_size_prompts; 0: evaluate "
                                             "on the training stream).")

    def validate_eval_args(self) -> None:
        check_positive(self, ("n_eval_batches",))
        if self.eval_holdout_sequences is not None:
            check_range(self, ("eval_holdout_sequences",), 0)


@dataclass
class OutputArgs:
    """Where a run writes (output folder, checkpoints, wandb) and what it publishes to the Hub."""

    output_path: str = arg("crosscoder_output", "Where the trained crosscoder, config and metrics go.")
    overwrite_output: bool = arg(False, "Allow writing into a non-empty output_path.")
    n_checkpoints: int = arg(0, "Checkpoints spaced over training (one more is written at the end).")
    checkpoint_path: str | None = arg(None, "Checkpoint directory; default OUTPUT_PATH/checkpoints.")
    resume_from_checkpoint: str | None = arg(None, "A checkpoint directory, or True / 'latest' for the "
                                             "newest one in checkpoint_path (False: start fresh).")
    log_to_wandb: bool = arg(False, "Log to Weights & Biases (WANDB_MODE=offline works).")
    wandb_project: str = arg("hf_crosscoder", "wandb project.")
    wandb_entity: str | None = arg(None, "wandb entity.")
    run_name: str | None = arg(None, "Run name; default derived from architecture, d_sae and hooks.")
    hf_repo_id: str | None = arg(None, "Hub repo to publish to, e.g. org/pythia70m-cc.")
    push_to_hub: bool = arg(False, "Publish to hf_repo_id.")
    hub_private: bool = arg(False, "Create the hub repo private.")
    hub_strategy: str = arg("end", "'end': publish once at the end; 'checkpoint': also every checkpoint.")
    dashboard: bool = arg(False, "At the end, write the feature browser OUTPUT_PATH/dashboard/index.html "
                          "(as python -m hf_crosscoder.dashboard OUTPUT_PATH).")
    dashboard_tokens: int = arg(20_000, "Eval tokens the --dashboard browser reads for top contexts.")

    def validate_output_args(self) -> None:
        check_range(self, ("n_checkpoints",), 0)
        check_positive(self, ("dashboard_tokens",))
        resume = self.resume_from_checkpoint
        if resume is not None and not isinstance(resume, (str, bool, os.PathLike)):
            raise ValueError(f"resume_from_checkpoint={resume!r} must be True/False, 'latest' or a checkpoint path.")
        _choice("hub_strategy", self.hub_strategy, HUB_STRATEGIES)
        if self.push_to_hub and not self.hf_repo_id:
            raise ValueError("push_to_hub=True needs hf_repo_id (e.g. 'org/pythia70m-cc').")


# The help groups of the command line, in order (cli.py prints --help by these)
ARG_GROUPS = (("model and data", HarvestArgs), ("crosscoder", CrosscoderArgs), ("activations store", StoreArgs),
              ("training", TrainerArgs), ("evaluation", EvalArgs), ("output, checkpoints and Hub", OutputArgs))


@dataclass
class LanguageModelCrosscoderRunnerConfig(CrosscoderArgs, OutputArgs, EvalArgs, TrainerArgs, StoreArgs, HarvestArgs):
    """Everything one training run needs: the crosscoder's hyper-parameters, what to harvest from which
    model and data, plus the run's own fields (one dataclass per group: `ARG_GROUPS`).

    Names and defaults follow SAELens where it has them. `train_batch_size_tokens` and `training_tokens`
    are global: under data parallelism each of N processes trains on 1/N of every batch, so the same
    config gives the same optimization on 1 or N devices. Validated here (all that can be checked
    without the model) and again once the model's config is read (d_model). Never mutated by training.
    """

    d_sae: int | None = arg(None, "Number of latents; default expansion_factor * d_in.")
    expansion_factor: int | None = arg(None, "d_sae = expansion_factor * d_in when d_sae is not given "
                                       "(default 4).")

    def __post_init__(self) -> None:
        if self.d_sae is None:
            if self.expansion_factor is not None and (not _is_int(self.expansion_factor) or self.expansion_factor <= 0):
                raise ValueError(f"expansion_factor must be a positive integer; got {self.expansion_factor!r}.")
            self.d_sae = (self.expansion_factor or 4) * self.d_model * n_models(self) * len(self.hook_names_in or [0])
        validate_crosscoder_args(self)
        HarvestArgs.__post_init__(self)  # the model, data and harvesting fields
        self.validate_store_args()
        self.validate_trainer_args()
        self.validate_eval_args()
        self.validate_output_args()
        if self.training_tokens < self.train_batch_size_tokens:
            raise ValueError(f"training_tokens={self.training_tokens} is smaller than one batch "
                             f"(train_batch_size_tokens={self.train_batch_size_tokens}); raise "
                             "training_tokens or lower train_batch_size_tokens.")

    @property
    def total_training_steps(self) -> int:
        return self.training_tokens // self.train_batch_size_tokens

    def crosscoder_config(self, **provenance: Any) -> CrosscoderConfig:
        """The `CrosscoderConfig` this run trains (hyper-parameters copied by name, plus provenance)."""
        hyper = {name: getattr(self, name) for name in ARG_DEFAULTS}
        source = dict(model_name=self.model_name, model_names=self.model_names, dataset_path=self.dataset_path,
                      context_size=self.context_size, training_tokens=self.training_tokens)
        return CrosscoderConfig(**hyper, **{**source, **provenance})
