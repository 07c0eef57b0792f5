"""The GPU suite on a CPU machine (what CI can check of issue #18): bench/gpu.py's dry run writes every
section, the CUDA tests are collected and skipped for want of a device, and the suite's scripts parse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from hf_crosscoder import ARCHITECTURES

ROOT = Path(__file__).resolve().parents[1]
DRY_BATCHES, DRY_D_SAES = (64, 128), (256, 512)  # bench/gpu.py's DRY shapes


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "HF_CROSSCODER_TEST_DEVICE"}
    src = str(ROOT / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return {**env, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_bench_gpu_dry_run_writes_every_section(tmp_path):
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "results_gpu.json").read_text())
    assert r["failed"] == {} and r["meta"]["dry_run"] is True
    assert r["meta"]["torch"] == torch.__version__ and r["meta"]["device"].startswith("CPU")
    assert all(r["peak"][p]["flops"] > 0 for p in ("bf16", "fp32"))
    rows = r["archs"]["rows"]
    seen = {(row["architecture"], row["d_sae"], row["batch"], row["precision"]) for row in rows}
    assert seen == {(a, s, b, p) for a in ARCHITECTURES for s in DRY_D_SAES for b in DRY_BATCHES
                    for p in ("bf16", "fp32")}, r["archs"]["skipped"]
    for row in rows:
        assert row["median_s"] > 0 and row["reps"] >= 3
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["median_s"])
        assert row["memory_formula_bytes"] > 0 and row["peak_memory_bytes"] is None  # CPU: no CUDA allocator
    decode = r["decode"]["rows"]
    assert {row["pass"] for row in decode} == {"forward", "forward_backward"}
    assert all(row["sparse_s"] > 0 and row["speedup_vs_best_dense"] > 0 for row in decode)
    e2e = r["e2e"]
    for key in ("runner_tokens_per_s", "stream_tokens_per_s", "harvest_tokens_per_s", "train_tokens_per_s"):
        assert e2e[key] > 0, key
    assert e2e["serial_bound_tokens_per_s"] < min(e2e["harvest_tokens_per_s"], e2e["train_tokens_per_s"])
    assert [g["goal"] for g in r["goals"]] == ["dense_bf16_peak_fraction", "runner_tokens_per_s",
                                               "topk_decode_speedup"]
    assert all(g["value"] is not None for g in r["goals"])
    md = (tmp_path / "BENCHMARKS_gpu.md").read_text()
    for heading in ("## GPU: CPU", "### Goals", "### Training step", "### TopK decode", "### End to end"):
        assert heading in md, heading
    assert "Dry run on CPU" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS_gpu.md", "results_gpu.json"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a CUDA device the CUDA tests run instead of skipping")
def test_cuda_tests_are_collected_and_skipped_without_a_device(tmp_path):
    junit = tmp_path / "junit.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "tests/test_cuda.py", "-q",
                           "-p", "no:cacheprovider", "-o", "junit_family=xunit1", f"--junitxml={junit}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    cases = list(ET.parse(junit).getroot().iter("testcase"))
    names = {case.get("name") for case in cases}
    expected = {f"test_forward_backward_fp32_matches_float64_reference[{a}-dense-default]" for a in ARCHITECTURES}
    expected |= {f"test_bf16_autocast_gradients_match_fp32[{a}-dense-default]" for a in ARCHITECTURES}
    expected |= {f"test_no_host_sync_in_a_training_step_that_does_not_log[{a}]" for a in ARCHITECTURES}
    expected |= {f"test_accelerate_launch_world_size_1[{c}]" for c in
                 ("single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3")}
    expected |= {"test_fused_adam_equals_unfused", "test_runner_logs_to_wandb_offline"}
    assert expected <= names, sorted(expected - names)
    for case in cases:
        skipped = case.find("skipped")
        assert skipped is not None, f"{case.get('name')} was not skipped"
        assert "needs a CUDA device" in (skipped.get("message") or ""), case.get("name")


def test_suite_scripts_parse_and_document_their_options():
    for script in ("bench/gpu_suite.sh", "bench/gpu_wheels.sh"):
        proc = subprocess.run(["bash", "-n", script], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, (script, proc.stderr)
    usage = subprocess.run(["bash", "bench/gpu_suite.sh", "--help"], cwd=ROOT, capture_output=True, text=True,
                           timeout=30)
    assert usage.returncode == 0 and "--out DIR" in usage.stdout and "--dry-run" in usage.stdout
    wrong = subprocess.run(["bash", "bench/gpu_suite.sh", "--bogus"], cwd=ROOT, capture_output=True, text=True,
                           timeout=30)
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr
