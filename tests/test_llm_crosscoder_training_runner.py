"""End to end on a tiny random GPT-NeoX: train, evaluate, save, reload, resume, bad input."""

import dataclasses
import json
import math
import shlex
import shutil
import time

import pytest
import torch
from helpers import make_runner_config
from safetensors.torch import load_file

from hf_crosscoder import Crosscoder, LanguageModelCrosscoderTrainingRunner
from hf_crosscoder.activations import ActivationsStore

ARCHS = ["crosscoder", "skip_crosscoder", "jumprelu_crosscoder", "topk_crosscoder", "batchtopk_crosscoder"]


@pytest.mark.parametrize("arch", ARCHS)
def test_trains_evaluates_saves_and_reloads(arch, tiny_model_dir, text_dataset_path, tmp_path):
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, architecture=arch, k=8,
                             training_tokens=64 * 60, wandb_log_frequency=5, eval_every_n_wandb_logs=6,
                             lr=3e-3, l1_coefficient=0.05, output_path=str(tmp_path / "out"))
    crosscoder = LanguageModelCrosscoderTrainingRunner(cfg).run()
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "README.md", "runner_config.json", "metrics.json",
                 "training_log.jsonl", "eval_log.jsonl"):
        assert (out / name).exists(), name
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["losses/mse"] < log[0]["losses/mse"]
    elapsed = [row["elapsed_s"] for row in log]  # wall clock for throughput: positive, increasing
    assert elapsed[0] > 0 and elapsed == sorted(elapsed)
    metrics = json.loads((out / "metrics.json").read_text())
    for hook in cfg.hook_names_out:
        assert -0.5 < metrics[f"explained_variance/{hook}"] <= 1
        assert math.isfinite(metrics[f"ce_loss_score/{hook}"]) and math.isfinite(metrics[f"kl_div_score/{hook}"])
        assert metrics[f"kl_div_with_sae/{hook}"] >= 0
    assert metrics["l0"] > 0 and 0 < metrics["frac_alive"] <= 1
    # metrics.json: numbers or null only; per-latent statistics in feature_stats.safetensors
    assert metrics.pop("distributed_type") == "NO"  # the one descriptor of the run (accelerate's name)
    assert all(v is None or isinstance(v, (int, float)) for v in metrics.values())
    stats = load_file(out / "feature_stats.safetensors")
    assert stats["feature_density"].shape == (cfg.d_sae,) and stats["max_decoder_cosine_sim"].shape == (cfg.d_sae,)

    # the saved model works on raw activations, like the returned one
    reloaded = Crosscoder.from_pretrained(out).eval()
    assert type(reloaded) is type(crosscoder) and reloaded.config.activation_norm_folded
    raw_cfg = make_runner_config(tiny_model_dir, text_dataset_path, normalize_activations="none")
    store = ActivationsStore(raw_cfg, device="cpu")
    acts_in, _ = store.next_batch()
    torch.testing.assert_close(reloaded(acts_in).reconstruction, crosscoder.eval()(acts_in).reconstruction)


def test_folded_model_on_raw_equals_training_model_on_normalized(tiny_model_dir, text_dataset_path, tmp_path,
                                                                  capsys):
    from transformers.utils import logging as hf_logging

    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "o"),
                             n_checkpoints=1)
    hf_logging.enable_progress_bar()  # a library caller's setting: on
    capsys.readouterr()
    folded = LanguageModelCrosscoderTrainingRunner(cfg).run().eval()
    # the internal loads and saves (the LM, each checkpoint, the output folder) draw no transformers bars
    assert "Writing model shards" not in capsys.readouterr().err and hf_logging.is_progress_bar_enabled()
    ckpt = tmp_path / "o" / "checkpoints" / f"step_{cfg.total_training_steps}"
    normalized = Crosscoder.from_pretrained(ckpt).eval()  # checkpoints hold the training-space model
    store = ActivationsStore(make_runner_config(tiny_model_dir, text_dataset_path,
                                                normalize_activations="none"), device="cpu")
    x, _ = store.next_batch()
    s_in = torch.tensor(folded.config.activation_scale_in)
    s_out = torch.tensor(folded.config.activation_scale_out)
    expected = normalized(x * s_in[:, None]).reconstruction / s_out[:, None]
    torch.testing.assert_close(folded(x).reconstruction, expected, rtol=1e-4, atol=1e-4)


def test_dashboard_true_writes_the_feature_browser(tiny_model_dir, text_dataset_path, tmp_path):
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "d"),
                             training_tokens=64 * 4, dashboard=True, dashboard_tokens=256)
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    site = tmp_path / "d" / "dashboard"
    assert (site / "index.html").is_file() and (site / "data.js").stat().st_size > 0
    assert make_runner_config(tiny_model_dir, text_dataset_path).dashboard is False  # off by default


def test_resume_equals_uninterrupted(tiny_model_dir, text_dataset_path, tmp_path):
    common = dict(architecture="topk_crosscoder", k=8, training_tokens=64 * 16, n_checkpoints=1,
                  wandb_log_frequency=4, eval_every_n_wandb_logs=2)
    full = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "a"), **common)
    LanguageModelCrosscoderTrainingRunner(full).run()
    half = tmp_path / "a" / "checkpoints" / "step_8"
    assert half.is_dir()
    resumed = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "b"),
                                 resume_from_checkpoint=str(half), **common)
    LanguageModelCrosscoderTrainingRunner(resumed).run()
    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_bad_inputs_fail_before_training(tiny_model_dir, text_dataset_path, tmp_path):
    with pytest.raises(ValueError, match="d_model=32 does not match"):
        LanguageModelCrosscoderTrainingRunner(make_runner_config(
            tiny_model_dir, text_dataset_path, d_model=32, output_path=str(tmp_path / "x"))).run()
    with pytest.raises(ValueError, match="smaller than one batch"):
        make_runner_config(tiny_model_dir, text_dataset_path, training_tokens=10)
    with pytest.raises(ValueError, match="valid architectures"):
        make_runner_config(tiny_model_dir, text_dataset_path, architecture="sae")
    with pytest.raises(ValueError, match="no checkpoint found"):
        LanguageModelCrosscoderTrainingRunner(make_runner_config(
            tiny_model_dir, text_dataset_path, resume_from_checkpoint="latest",
            output_path=str(tmp_path / "y"))).run()
    broken = tmp_path / "broken" / "step_3"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="missing or incomplete"):
        LanguageModelCrosscoderTrainingRunner(make_runner_config(
            tiny_model_dir, text_dataset_path, resume_from_checkpoint=str(broken),
            output_path=str(tmp_path / "z"))).run()


def test_existing_output_is_never_overwritten(tiny_model_dir, text_dataset_path, tmp_path):
    out = tmp_path / "done"
    out.mkdir()
    (out / "model.safetensors").write_text("precious")
    with pytest.raises(ValueError, match="overwrite_output"):
        LanguageModelCrosscoderTrainingRunner(make_runner_config(
            tiny_model_dir, text_dataset_path, output_path=str(out))).run()
    assert (out / "model.safetensors").read_text() == "precious"
    unwritable = tmp_path / "file"
    unwritable.write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        LanguageModelCrosscoderTrainingRunner(make_runner_config(
            tiny_model_dir, text_dataset_path, output_path=str(unwritable))).run()


def _model_without_weights(tiny_model_dir, tmp_path):
    """The tiny model's config and tokenizer with unreadable weights: any check that runs after the weights
    load fails with a safetensors error instead of its own message."""
    broken = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"\xff" * 64)
    return broken


@pytest.mark.parametrize("overrides, error, match", [
    ({"hook_names_in": ["blocks.0.hook_bogus"]}, ValueError, "Unknown hook name 'blocks.0.hook_bogus'.*Valid names"),
    ({"hook_names_out": ["blocks.9.hook_resid_post"]}, ValueError, "has 4 layers"),
    ({"dataset_path": "/nonexistent/corpus.jsonl"}, FileNotFoundError, "does not exist; give an existing local"),
    ({"dataset_path": "EMPTY"}, ValueError, "yielded no tokens"),
])
def test_hooks_and_data_are_checked_before_the_weights_load(tiny_model_dir, text_dataset_path, tmp_path,
                                                            overrides, error, match):
    if overrides.get("dataset_path") == "EMPTY":
        (tmp_path / "empty.jsonl").write_text("")
        overrides = {"dataset_path": str(tmp_path / "empty.jsonl")}
    cfg = make_runner_config(_model_without_weights(tiny_model_dir, tmp_path), text_dataset_path,
                             output_path=str(tmp_path / "out"), **overrides)
    with pytest.raises(error, match=match):
        LanguageModelCrosscoderTrainingRunner(cfg).run()


def test_failed_overwrite_keeps_the_earlier_outputs(tiny_model_dir, text_dataset_path, tmp_path):
    # overwrite_output replaces the old logs and plots only once the new run passed its checks
    out = tmp_path / "done"
    out.mkdir()
    for name in ("training_log.jsonl", "eval_log.jsonl", "loss.png"):
        (out / name).write_text("earlier run")
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(out), overwrite_output=True,
                             hook_names_in=["blocks.0.hook_bogus"])
    with pytest.raises(ValueError, match="Unknown hook name"):
        LanguageModelCrosscoderTrainingRunner(cfg).run()
    assert all((out / name).read_text() == "earlier run" for name in ("training_log.jsonl", "eval_log.jsonl",
                                                                       "loss.png"))


def test_cuda_device_without_a_gpu_is_refused(tiny_model_dir, text_dataset_path, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, device="cuda", output_path=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="device='cuda' but torch sees no CUDA device.*drop --device"):
        LanguageModelCrosscoderTrainingRunner(cfg).run()
    assert not (tmp_path / "o").exists()


def _config_file(cfg, path):
    import dataclasses

    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return path


def test_sigterm_writes_checkpoint_that_resumes_to_same_result(tiny_model_dir, text_dataset_path, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    common = dict(training_tokens=64 * 400, wandb_log_frequency=1, eval_every_n_wandb_logs=10_000)
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "killed"), **common)
    cmd = [sys.executable, "-m", "hf_crosscoder.llm_crosscoder_training_runner",
           "--config", str(_config_file(cfg, tmp_path / "run.json"))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    log = tmp_path / "killed" / "training_log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Resume with --resume_from_checkpoint" in err
    checkpoint = max((tmp_path / "killed" / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    assert 3 <= int(checkpoint.name[5:]) < 400

    short = dict(common, training_tokens=64 * (int(checkpoint.name[5:]) + 5))
    resumed = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "resumed"),
                                 resume_from_checkpoint=str(checkpoint), **short)
    LanguageModelCrosscoderTrainingRunner(resumed).run()
    straight = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "straight"),
                                  **short)
    LanguageModelCrosscoderTrainingRunner(straight).run()
    a = load_file(tmp_path / "resumed" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_wandb_offline_run_logs_metrics(tiny_model_dir, text_dataset_path, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "w"),
                             log_to_wandb=True, wandb_log_frequency=5, eval_every_n_wandb_logs=2)
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    runs = list((tmp_path / "w" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    keys = (b"losses/mse", b"l0", b"dead_fraction", b"eval/explained_variance", b"eval/feature_density_log10")
    deadline = time.time() + 60  # wandb's service process may still be flushing the run file
    while True:
        data = b"".join(p.read_bytes() for p in runs[0].glob("*.wandb"))
        missing = [key for key in keys if key not in data]
        if not missing or time.time() > deadline:
            break
        time.sleep(0.5)
    assert not missing, missing


def test_resume_with_another_process_count_is_refused(tiny_model_dir, text_dataset_path, tmp_path, monkeypatch):
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "a"),
                             training_tokens=64 * 4, n_checkpoints=1)
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    checkpoint = tmp_path / "a" / "checkpoints" / "step_4"
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    (checkpoint / "trainer_state.json").write_text(json.dumps({**state, "num_processes": 2}))
    resumed = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "b"),
                                 training_tokens=64 * 4, resume_from_checkpoint=str(checkpoint))

    def no_store(*args, **kwargs):
        raise AssertionError("the language model was loaded before the checkpoint was checked")

    monkeypatch.setattr("hf_crosscoder.llm_crosscoder_training_runner.ActivationsStore", no_store)
    with pytest.raises(ValueError, match="written by 2 processes"):
        LanguageModelCrosscoderTrainingRunner(resumed).run()


def test_resume_into_same_output_logs_each_step_once(tiny_model_dir, text_dataset_path, tmp_path):
    common = dict(output_path=str(tmp_path / "run"), training_tokens=64 * 8, n_checkpoints=1,
                  wandb_log_frequency=1, eval_every_n_wandb_logs=2)
    LanguageModelCrosscoderTrainingRunner(make_runner_config(tiny_model_dir, text_dataset_path, **common)).run()
    first = load_file(tmp_path / "run" / "model.safetensors")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_4"
    LanguageModelCrosscoderTrainingRunner(make_runner_config(
        tiny_model_dir, text_dataset_path, resume_from_checkpoint=str(checkpoint), **common)).run()
    for name, steps in (("training_log.jsonl", list(range(1, 9))), ("eval_log.jsonl", [2, 4, 6, 8])):
        logged = [json.loads(row)["step"] for row in (tmp_path / "run" / name).read_text().splitlines()]
        assert logged == steps, name
    again = load_file(tmp_path / "run" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("how", ["api_True", "cli_True", "cli_latest"])
def test_resume_true_continues_an_interrupted_run_in_place(how, tiny_model_dir, text_dataset_path, tmp_path):
    """`resume_from_checkpoint=True` (transformers' Trainer convention) and `--resume_from_checkpoint True`
    pick the newest checkpoint of the interrupted run's own output folder and finish it exactly."""
    from hf_crosscoder.cli import reproduce_command
    from hf_crosscoder.llm_crosscoder_training_runner import main

    common = dict(architecture="topk_crosscoder", k=8, training_tokens=64 * 16, n_checkpoints=1,
                  wandb_log_frequency=4, eval_every_n_wandb_logs=2)
    full = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "a"), **common)
    LanguageModelCrosscoderTrainingRunner(full).run()
    interrupted = tmp_path / "b"  # as a run killed after its step-8 checkpoint leaves it
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_8", interrupted / "checkpoints" / "step_8")
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(interrupted), **common)
    if how == "api_True":
        LanguageModelCrosscoderTrainingRunner(dataclasses.replace(cfg, resume_from_checkpoint=True)).run()
    else:
        argv = shlex.split(reproduce_command(cfg).replace("\\\n", " "))[3:]
        main([*argv, "--resume_from_checkpoint", "True" if how == "cli_True" else "latest"])
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_progress_bar_averages_over_the_run_and_shows_harvest_and_train_rates(monkeypatch):
    from types import SimpleNamespace

    from tqdm.auto import tqdm

    from hf_crosscoder import llm_crosscoder_training_runner as runner

    clock = iter([10.0, 14.0])  # the bar starts at t=10, the step is reported at t=14
    monkeypatch.setattr(runner.time, "perf_counter", lambda: next(clock))
    store = SimpleNamespace(harvest_seconds=1.0, harvested_rows=100, num_processes=2)
    bar = tqdm(total=1000, disable=True, smoothing=0)
    bar.harvest_start = (store.harvest_seconds, store.harvested_rows, runner.time.perf_counter(), 0)
    store.harvest_seconds, store.harvested_rows = 2.0, 300  # 1 s harvesting 200 rows on each of 2 processes
    runner._progress(bar, store, SimpleNamespace(n_tokens=600), {"loss": 1.0, "l0": 3.0, "fvu/h": 0.5})
    postfix = bar.postfix
    assert "harvest=400 tok/s" in postfix and "train=200 tok/s" in postfix  # 600 tokens in 4 - 1 s
