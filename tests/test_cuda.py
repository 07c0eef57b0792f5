"""CUDA tests (`pytest -m cuda`): the GPU code paths against CPU references.

Every architecture of the registry and every layer structure, forward and backward in fp32 against the
float64 CPU reference; bf16 autocast gradients against fp32; fused Adam against unfused; the runner end to
end on a tiny GPT-NeoX (bf16 and fp32) and its exact resume; `accelerate launch` at world size 1 with each
GPU config of accelerate_configs/; and no host synchronization in a training step that does not log.

Without a CUDA device each test is skipped ("needs a CUDA device"), so CI (CPU) collects and skips them.
HF_CROSSCODER_TEST_DEVICE=cpu runs the same tests on CPU (bench/gpu_suite.sh --dry-run): there the fp32
arithmetic, launches and bookkeeping are exercised, while host syncs are counted from a list of the ops
that synchronize on CUDA (the CUDA profiler is the measurement on a GPU).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from helpers import make_runner_config
from safetensors.torch import load_file
from test_modeling import (
    AC_D_MODEL,
    AC_D_SAE,
    AC_DEAD,
    AC_HOOKS_OUT,
    AC_KW,
    ac_inputs,
    assert_grads_close,
    make,
    naive,
)
from torch.utils._python_dispatch import TorchDispatchMode

import hf_crosscoder
import hf_crosscoder.config
import hf_crosscoder.structures
from hf_crosscoder import ARCHITECTURES, Crosscoder, LanguageModelCrosscoderRunnerConfig, kernels
from hf_crosscoder.llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner
from hf_crosscoder.trainer import CrosscoderTrainer, make_optimizer

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = str(Path(hf_crosscoder.__file__).resolve().parent) + os.sep
DEVICE_ENV = "HF_CROSSCODER_TEST_DEVICE"


def _test_device() -> torch.device | None:
    name = os.environ.get(DEVICE_ENV)
    if name:
        return torch.device(name)
    return torch.device("cuda") if torch.cuda.is_available() else None


DEVICE = _test_device()
ON_CUDA = DEVICE is not None and DEVICE.type == "cuda"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device")]

STRUCTURES = tuple(hf_crosscoder.structures.STRUCTURES)
# extra configurations of an architecture whose code paths differ (others get their defaults only)
VARIANTS = {
    "crosscoder": {"concat": {"sparsity_decoder_norm": "concat"}},
    "jumprelu_crosscoder": {"tanh_all": {"jumprelu_sparsity": "tanh", "jumprelu_pre_act_latents": "all"}},
    "batchtopk_crosscoder": {"eval_gate": {"mode": "eval"}},
}
CASES = [(arch, structure, name, kw) for arch in ARCHITECTURES for structure in STRUCTURES
         for name, kw in {"default": {}, **VARIANTS.get(arch, {})}.items()]
CASE_IDS = [f"{arch}-{structure}-{name}" for arch, structure, name, _ in CASES]
F64 = torch.float64


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state: a bf16 Accelerator after an fp32 one would be refused."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def true_fp32():
    """fp32 matmuls in fp32 (not TF32) while comparing with float64; restored afterwards."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


# ------------------------------------------------------------------ fp32 on the device vs float64 on CPU
BATCH = 64  # 64 x 128 (token, latent) pairs: few enough that a seed with every decision well inside its margin exists
MARGIN = 1e-5  # relative distance to every decision boundary: 10-40x the fp32 rounding of a pre-activation


def structure_kw(structure: str) -> dict:
    return {} if structure == "dense" else {"layer_structure": structure}


def reference(arch: str, structure: str, kw: dict, seed: int):
    """(float64 model on CPU with fp32-representable values, x, y float64): the device model is its fp32
    copy, so the two compute the same function and differ by arithmetic alone."""
    kw = dict(kw)
    mode = kw.pop("mode", "train")
    m = make(arch, seed, d_model=AC_D_MODEL, d_sae=AC_D_SAE, hooks_out=AC_HOOKS_OUT,
             **{**AC_KW, **structure_kw(structure), **kw})
    x, y = (t.double() for t in ac_inputs(seed, batch=BATCH))
    if mode == "eval":  # BatchTopK inference: the gate at the threshold another training batch set
        m.train()
        m(ac_inputs(seed + 1000, batch=BATCH)[0].double())
        m.eval()
        assert m._gated()
    return m.float().double(), x, y


def _gap(scores: torch.Tensor, k: int) -> float:
    """Smallest gap, per row, between the k-th and (k+1)-th largest score where the k-th is positive (a
    selection among zero scores changes nothing: their activations and gradients are 0)."""
    if k >= scores.shape[-1]:
        return math.inf
    top = scores.topk(k + 1, dim=-1).values
    gap = (top[:, k - 1] - top[:, k])[top[:, k - 1] > 0]
    return float(gap.min()) if gap.numel() else math.inf


def decision_margin(m: Crosscoder, x: torch.Tensor, dead: torch.Tensor) -> float:
    """The reference's smallest distance to a decision the forward or backward takes (relu's kink, a
    JumpReLU threshold or kernel edge, a TopK / BatchTopK / AuxK cut, the inference gate), relative to the
    scale of the quantity decided on. Architectures not listed get relu's kink only."""
    c = m.config
    with torch.no_grad():
        h, dn = m.pre_activations(x), m.decoder_norms()
        h_scale = float(h.abs().max())
        margins = [float(h.abs().min()) / h_scale]
        if c.architecture == "jumprelu_crosscoder":
            d = (h - m.inference_threshold()).abs()
            edges = [d.min(), (d - c.jumprelu_bandwidth / 2).abs().min(), m.theta.abs().min()]
            margins += [float(v) / h_scale for v in edges]
        if c.architecture in ("topk_crosscoder", "batchtopk_crosscoder", "matryoshka_batchtopk_crosscoder"):
            scores = torch.relu(h) * dn
            scale = float(scores.max())
            if not m.training and bool((m.threshold >= 0).all()):  # the inference gate (one per group)
                margins.append(float((scores - m._latent_thresholds()).abs().min()) / scale)
            elif c.architecture == "topk_crosscoder":
                margins.append(_gap(scores, c.k) / scale)
            else:
                margins.append(_gap(scores.flatten()[None], c.k * x.shape[0]) / scale)
            margins.append(_gap(scores.masked_fill(~dead, -1.0), c.k_aux) / scale)  # AuxK, per token
    return min(margins)


def first_clear_seed(arch: str, structure: str, kw: dict) -> tuple[Crosscoder, torch.Tensor, torch.Tensor]:
    for seed in range(30):
        m, x, y = reference(arch, structure, kw, seed)
        if decision_margin(m, x, AC_DEAD) >= MARGIN:
            return m, x, y
    raise AssertionError(f"no seed in 0-29 keeps {arch} {structure} {kw} {MARGIN:g} away from every decision")


def step(m: Crosscoder, x, y, dead, bf16: bool = False):
    """Forward (bf16 autocast on the inputs' device, or not), then each loss term's own gradients and the
    loss's, outside autocast as in the trainer: {"loss" or a term: {parameter: gradient}}."""
    m.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = m(x, y, dead_mask=dead)
    names, params = zip(*m.named_parameters())
    grads = {}
    for term, value in out.losses.items():
        if value.requires_grad:
            gs = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
            grads[term] = {n: g for n, g in zip(names, gs) if g is not None}
    out.loss.backward()
    grads["loss"] = {n: p.grad.clone() for n, p in zip(names, params) if p.grad is not None}
    return out, grads


def close32(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """fp32 result vs float64: elementwise within 1e-4 relative, 1e-5 of the largest reference value."""
    got, ref = got.detach().to("cpu", F64), ref.detach().to("cpu", F64)
    scale = float(ref.abs().max()) if ref.numel() else 0.0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * scale + 1e-12, msg=what)


@pytest.mark.parametrize("arch,structure,variant,kw", CASES, ids=CASE_IDS)
def test_forward_backward_fp32_matches_float64_reference(arch, structure, variant, kw, true_fp32, monkeypatch):

    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 16 * AC_D_SAE)  # several row chunks, as at full size
    ref, x, y = first_clear_seed(arch, structure, kw)
    dev = copy.deepcopy(ref).to(DEVICE, torch.float32)
    out, grads = step(dev, x.float().to(DEVICE), y.float().to(DEVICE), AC_DEAD.to(DEVICE))
    ref_out, ref_grads = step(ref, x, y, AC_DEAD)
    assert out.feature_acts.device.type == DEVICE.type and out.feature_acts.dtype == torch.float32
    close32(out.feature_acts, ref_out.feature_acts, "feature_acts")
    close32(out.reconstruction, ref_out.reconstruction, "reconstruction")
    assert set(out.losses) == set(ref_out.losses)
    for name, value in ref_out.losses.items():
        close32(out.losses[name], value, name)
    assert torch.equal(out.fire_counts.cpu(), ref_out.fire_counts) and torch.equal(out.fired.cpu(), ref_out.fired)
    assert set(grads) == set(ref_grads)
    for term, ref_term in ref_grads.items():
        assert set(grads[term]) == set(ref_term), term
        for name, g in ref_term.items():
            close32(grads[term][name], g, f"d {term} / d {name}")
    assert all(g.any() for g in ref_grads["loss"].values())  # every parameter's gradient was checked non-trivially
    if dev.config.architecture == "batchtopk_crosscoder":
        close32(dev.threshold, ref.threshold, "threshold")
    if structure == "dense":  # the loop reference of test_modeling, written from the math
        loops = naive(ref, x, y, dead=AC_DEAD)
        close32(out.feature_acts, loops["f"], "feature_acts vs naive")
        close32(out.reconstruction, loops["recon"], "reconstruction vs naive")
        close32(out.loss, torch.tensor(loops["losses"]["loss"], dtype=F64), "loss vs naive")


# ------------------------------------------------------------------ bf16 autocast on the device vs fp32
@pytest.mark.parametrize("arch,structure,variant,kw", CASES, ids=CASE_IDS)
def test_bf16_autocast_gradients_match_fp32(arch, structure, variant, kw):
    """Per parameter, the loss gradient under bf16 autocast points where the fp32 one does (cosine >= 0.99)
    and has its norm within 5%; the loss agrees within 3% (measured on CPU: test_modeling's bf16 tests)."""
    kw = dict(kw)
    mode = kw.pop("mode", "train")
    m = make(arch, 0, d_model=AC_D_MODEL, d_sae=AC_D_SAE, hooks_out=AC_HOOKS_OUT,
             **{**AC_KW, **structure_kw(structure), **kw}).float().to(DEVICE)
    x, y = (t.to(DEVICE) for t in ac_inputs(0))
    dead = AC_DEAD.to(DEVICE)
    if mode == "eval":
        m.train()
        m(x)
        m.eval()
    out32, grads32 = step(m, x, y, dead, bf16=False)
    out16, grads16 = step(m, x, y, dead, bf16=True)
    assert torch.isfinite(out16.loss) and not torch.equal(out16.loss.float(), out32.loss)  # the bf16 path ran
    assert abs(out16.loss.item() / out32.loss.item() - 1) <= 3e-2
    assert set(grads32["loss"]) == {n for n, _ in m.named_parameters()}
    assert_grads_close(grads16["loss"], grads32["loss"], min_cos=0.99, norm_rtol=0.05, what="loss")


# ------------------------------------------------------------------ fused Adam
def small_runner_config(**kw) -> LanguageModelCrosscoderRunnerConfig:
    base = dict(architecture="crosscoder", hook_names_in=["a", "b"], hook_names_out=["c", "d"], d_model=32,
                d_sae=256, k=8, train_batch_size_tokens=256, training_tokens=256 * 1000, lr=1e-3,
                device=DEVICE.type)
    return LanguageModelCrosscoderRunnerConfig(**{**base, **kw})


def test_fused_adam_equals_unfused():
    """The trainer's optimizer is torch's fused Adam on the device; five steps of it on real crosscoder
    gradients leave the weights where the plain (for-loop) Adam leaves them, to fp32 rounding."""
    cfg = small_runner_config()
    torch.manual_seed(0)
    model = Crosscoder(cfg.crosscoder_config()).to(DEVICE)
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    fused = make_optimizer(cfg, model)
    assert fused.defaults["fused"] is True
    plain = torch.optim.Adam(twin.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), fused=False,
                             foreach=False)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        x, y = (torch.randn(256, 64, generator=g).to(DEVICE) for _ in range(2))
        model(x, y).loss.backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
        fused.zero_grad(set_to_none=True)
        plain.zero_grad(set_to_none=True)
    for (name, p), q, p0 in zip(model.named_parameters(), twin.parameters(), start):
        assert not torch.equal(p, p0), name
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    trainer = CrosscoderTrainer(cfg, Crosscoder(cfg.crosscoder_config()).to(DEVICE),
                                Accelerator(cpu=DEVICE.type == "cpu"))
    assert trainer.optimizer.optimizer.defaults["fused"] is True
    assert trainer.crosscoder.W_enc.device.type == DEVICE.type


# ------------------------------------------------------------------ the runner on the device
def _runner_cfg(tiny_model_dir, text_dataset_path, out: Path, **kw) -> LanguageModelCrosscoderRunnerConfig:
    return make_runner_config(tiny_model_dir, text_dataset_path, device=DEVICE.type, output_path=str(out),
                              **{"k": 8, **kw})


@pytest.mark.parametrize("precision,arch", [("bf16", "batchtopk_crosscoder"), ("fp32", "crosscoder")])
def test_runner_end_to_end(precision, arch, tiny_model_dir, text_dataset_path, tmp_path):
    bf16 = precision == "bf16"
    cfg = _runner_cfg(tiny_model_dir, text_dataset_path, tmp_path / "out", architecture=arch, autocast=bf16,
                      autocast_lm=bf16, training_tokens=64 * 20, wandb_log_frequency=5, eval_every_n_wandb_logs=2,
                      lr=3e-3, l1_coefficient=0.05)
    crosscoder = LanguageModelCrosscoderTrainingRunner(cfg).run()
    out = tmp_path / "out"
    assert crosscoder.W_enc.device.type == DEVICE.type and crosscoder.W_enc.dtype == torch.float32
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [5, 10, 15, 20]
    assert [json.loads(line)["step"] for line in (out / "eval_log.jsonl").read_text().splitlines()] == [10, 20]
    assert log[-1]["losses/mse"] < log[0]["losses/mse"] and all(math.isfinite(r["loss"]) for r in log)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 1 and metrics["l0"] > 0
    for hook in cfg.hook_names_out:
        assert 0 <= metrics[f"fvu/{hook}"] < 1.5 and math.isfinite(metrics[f"ce_loss_score/{hook}"])
    reloaded = Crosscoder.from_pretrained(out).to(DEVICE).eval()
    x = torch.randn(32, len(cfg.hook_names_in), cfg.d_model, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.testing.assert_close(reloaded(x).reconstruction, crosscoder.eval()(x).reconstruction)
    if arch == "batchtopk_crosscoder":
        assert float(reloaded.threshold) > 0  # set in training, saved, used by the inference gate
        assert reloaded._gated()


def test_runner_logs_to_wandb_offline(tiny_model_dir, text_dataset_path, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (bench/gpu_wheels.sh brings it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = _runner_cfg(tiny_model_dir, text_dataset_path, tmp_path / "out", training_tokens=64 * 4,
                      wandb_log_frequency=2, log_to_wandb=True)
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    runs = list((tmp_path / "out" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


@pytest.mark.parametrize("arch", ["crosscoder", "topk_crosscoder"])
def test_resume_equals_uninterrupted(arch, tiny_model_dir, text_dataset_path, tmp_path):
    """Bitwise on CPU and for the dense crosscoder on CUDA. TopK's sparse backward sums with CUDA's atomic
    index_add_, whose order varies from run to run: there the weights agree to fp32 rounding."""
    common = dict(architecture=arch, training_tokens=64 * 16, n_checkpoints=1, wandb_log_frequency=4,
                  eval_every_n_wandb_logs=2)
    LanguageModelCrosscoderTrainingRunner(_runner_cfg(tiny_model_dir, text_dataset_path, tmp_path / "a",
                                                      **common)).run()
    half = tmp_path / "a" / "checkpoints" / "step_8"
    AcceleratorState._reset_state(reset_partial_state=True)
    LanguageModelCrosscoderTrainingRunner(_runner_cfg(tiny_model_dir, text_dataset_path, tmp_path / "b",
                                                      resume_from_checkpoint=str(half), **common)).run()
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys()
    bitwise = not ON_CUDA or arch == "crosscoder"
    for key in a:
        if bitwise:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


# ------------------------------------------------------------------ accelerate launch, world size 1
LAUNCH_CONFIGS = ("single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
DISTRIBUTED_TYPE = {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                    "deepspeed_zero3": "DEEPSPEED"}
LAUNCH_TIMEOUT_S = 180  # from the first test of this module: the launches run while the other tests do


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_launch(name: str, cfg, root: Path) -> subprocess.Popen:
    config_json = root / f"{name}.json"
    config_json.write_text(json.dumps(dataclasses.asdict(cfg)))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "accelerate_configs" / f"{name}.yaml"), "--num_processes", "1", "--main_process_port",
           str(_free_port()), "scripts/train.py", "--config", str(config_json)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(root / f"{name}.log", "w") as log:
        # a session of its own: a kill reaches the launcher's workers too (os.killpg)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class Launches:
    """The configs' launches, started together in the background; `result(name)` waits for one."""

    def __init__(self, procs: dict, root: Path) -> None:
        self.procs, self.root = procs, root
        self.deadline = time.monotonic() + LAUNCH_TIMEOUT_S

    def result(self, name: str) -> tuple:
        """(exit code or "timeout", output folder, log text)."""
        proc = self.procs[name]
        try:
            code = proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill(proc)
            code = "timeout"
        return code, self.root / name, (self.root / f"{name}.log").read_text()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                _kill(proc)


@pytest.fixture(scope="module", autouse=True)
def launches(request, tmp_path_factory):
    """Starts every launch at the first test of this module when any launch test was selected (each is
    a few seconds of work after its start-up, which overlaps the other tests); killed at the end."""
    wanted = any(item.name.startswith("test_accelerate_launch") for item in request.session.items)
    if DEVICE is None or not wanted:
        yield None
        return
    root = tmp_path_factory.mktemp("launch")
    model_dir, corpus = request.getfixturevalue("tiny_model_dir"), request.getfixturevalue("text_dataset_path")
    procs = {}
    for name in LAUNCH_CONFIGS:
        cfg = make_runner_config(model_dir, corpus, device=None, output_path=str(root / name),
                                 architecture="topk_crosscoder", k=8, training_tokens=64 * 8,
                                 wandb_log_frequency=2, eval_every_n_wandb_logs=2)
        procs[name] = _start_launch(name, cfg, root)
    running = Launches(procs, root)
    yield running
    running.stop()


def _launch_failure(name: str, result) -> str:
    code, _, text = result
    lines = [ln for ln in text.splitlines() if "training:" not in ln]
    return f"accelerate launch with {name}.yaml exited {code}:\n" + "\n".join(lines[-80:])


@pytest.mark.parametrize("name", LAUNCH_CONFIGS)
def test_accelerate_launch_world_size_1(name, launches):
    code, out, text = result = launches.result(name)
    if name == "fsdp" and not ON_CUDA:  # by design: accelerate would silently fall back to DDP on CPU
        assert code != 0 and "FSDP needs GPUs" in text, _launch_failure(name, result)
        return
    assert code == 0, _launch_failure(name, result)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 1
    if ON_CUDA:
        assert metrics["distributed_type"] == DISTRIBUTED_TYPE[name]
    loaded = Crosscoder.from_pretrained(out).to(DEVICE).eval()
    assert loaded.config.architecture == "topk_crosscoder" and loaded.config.activation_norm_folded
    x = torch.randn(16, loaded.config.n_in, loaded.config.d_model, generator=torch.Generator().manual_seed(0))
    recon = loaded(x.to(DEVICE)).reconstruction
    assert recon.shape == (16, loaded.config.n_out, loaded.config.d_model) and torch.isfinite(recon).all()
    # one process sees every batch whatever the config: the same training as the plain launch
    base_code, base_out, _ = launches.result("single_gpu")
    if name != "single_gpu" and base_code == 0:
        reference, weights = load_file(base_out / "model.safetensors"), load_file(out / "model.safetensors")
        assert reference.keys() == weights.keys()
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-4, atol=1e-5, msg=key)


# ------------------------------------------------------------------ host synchronization per step
def _src_line() -> str:
    """The innermost line of the hf_crosscoder package on the stack (file:line and code)."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(PACKAGE_DIR):
            return f"{Path(frame.filename).name}:{frame.lineno} `{(frame.line or '').strip()}`"
    return "(outside hf_crosscoder)"


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _sync_reason(func, args, kwargs) -> str | None:
    """Why this op makes the host wait for a CUDA device, or None. CUDA's implementations: a Python scalar
    read is a copy to the host; ops with a data-dependent output size read that size back; bincount reads
    the input's min and max; sparse COO matmuls coalesce (thrust unique, whose count comes back)."""
    name = func.name()
    if name == "aten::_local_scalar_dense":
        return "tensor -> Python scalar (.item() / int() / bool() / if)"
    if name in ("aten::nonzero", "aten::masked_select", "aten::argwhere") or name.startswith("aten::unique") \
            or name.startswith("aten::_unique"):
        return "data-dependent output size"
    if name == "aten::bincount":
        return "bincount reads min/max back to size its output"
    if name == "aten::_coalesce" or (name == "aten::_sparse_addmm" and any(
            isinstance(a, torch.Tensor) and a.layout == torch.sparse_coo for a in args)):
        return "sparse COO matmul coalesces its operand"  # (a CSR operand is used as it is)
    if name == "aten::index.Tensor" and _has_bool_index(args[1]):
        return "boolean-mask indexing (nonzero)"
    if name in ("aten::index_put_", "aten::index_put", "aten::_index_put_impl_") and _has_bool_index(args[1]):
        value = args[2]
        if not (value.dim() == 0 and value.device.type == "cpu"):  # else CUDA takes masked_fill_
            return "boolean-mask assignment of a tensor (nonzero)"
    if name == "aten::repeat_interleave.Tensor" and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if name in ("aten::_to_copy", "aten::copy_"):
        src, dst = (args[0], kwargs.get("device")) if name == "aten::_to_copy" else (args[1], args[0].device)
        if dst is not None and torch.device(dst).type == "cpu" and src.device.type != "cpu":
            return "copy to the host"
    return None


class SyncOps(TorchDispatchMode):
    """Records every op that synchronizes on CUDA, with the source line that called it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = _sync_reason(func, args, kwargs)
        if reason is not None:
            self.calls.append(f"{_src_line()}: {func.name()} ({reason})")
        return func(*args, **kwargs)


def _profiled_syncs(run_steps, n_steps: int) -> tuple[int, int, int]:
    """(host syncs inside the steps, device-to-host copies, kernel launches) seen by the CUDA profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run_steps()
        torch.cuda.synchronize()
    events = prof.events()
    cpu = torch.autograd.DeviceType.CPU  # record_function ranges also appear on the GPU timeline
    steps = [(e.time_range.start, e.time_range.end) for e in events
             if e.name.startswith("hf_crosscoder_step") and e.device_type == cpu]
    assert len(steps) == n_steps, [(e.name, e.device_type) for e in events if "step" in e.name][:10]

    def inside(e):
        return any(a <= e.time_range.start <= b for a, b in steps)

    syncs = sum(1 for e in events if ("Synchronize" in e.name or e.name in ("cudaMemcpy", "cudaMemcpy2D"))
                and e.device_type == cpu and inside(e))
    dtoh = sum(1 for e in events if "DtoH" in e.name or "Device -> Pageable" in e.name)
    launches = sum(1 for e in events if e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel")) and inside(e))
    return syncs, dtoh, launches


def _sync_trainer(arch: str) -> tuple[CrosscoderTrainer, list]:
    """A trainer on the device with dead latents (AuxK / pre-activation paths run) and batches on the device."""
    cfg = small_runner_config(architecture=arch, dead_feature_window=2, wandb_log_frequency=10_000,
                              feature_sampling_window=10_000)
    torch.manual_seed(0)
    model = Crosscoder(cfg.crosscoder_config())
    with torch.no_grad():
        model.b_enc[:64] = -1e3  # never fire: dead after dead_feature_window steps
    trainer = CrosscoderTrainer(cfg, model.to(DEVICE), Accelerator(cpu=DEVICE.type == "cpu"))
    g = torch.Generator().manual_seed(2)
    batches = [tuple(torch.randn(256, 2, 32, generator=g).to(DEVICE) for _ in range(2)) for _ in range(4)]
    return trainer, batches


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_no_host_sync_in_a_training_step_that_does_not_log(arch, record_property, monkeypatch):
    """Goal: 0 host syncs per non-log step (train_step: forward, backward, clipping, fused Adam, schedule,
    dead-latent tracking), so the CPU can run ahead and queue the next steps. On CUDA the profiler counts
    cudaStreamSynchronize / cudaDeviceSynchronize / synchronous cudaMemcpy calls inside the steps and
    device-to-host copies; the failure message names the source lines (sync debug mode and the op list).
    On CPU (where a host read is free, so the package takes data-dependent shortcuts) the accelerator's
    branch-free path is forced, and the ops that would sync on CUDA are counted."""
    monkeypatch.setattr(kernels, "host_reads_are_free", lambda device: False)
    trainer, batches = _sync_trainer(arch)
    for i in range(5):  # warm-up: kernels loaded, workspaces allocated, latents 0-63 counted dead
        trainer.train_step(*batches[i % 4])
    assert bool(trainer.dead_mask().any())
    n_steps = 3

    def run_steps():
        for i in range(n_steps):
            with torch.profiler.record_function(f"hf_crosscoder_step_{i}"):
                trainer.train_step(*batches[i % 4])

    ops = SyncOps()
    with warnings.catch_warnings(record=True) as caught, ops:
        warnings.simplefilter("always")
        if ON_CUDA:
            torch.cuda.set_sync_debug_mode("warn")
            try:
                syncs, dtoh, launches = _profiled_syncs(run_steps, n_steps)
            finally:
                torch.cuda.set_sync_debug_mode("default")
            assert launches > 0, "the profiler saw no kernel launch: CUPTI is not recording"
        else:
            run_steps()
            syncs, dtoh = len(ops.calls), 0
    lines = sorted(set(ops.calls) | {f"{Path(w.filename).name}:{w.lineno}: {w.message}" for w in caught
                                     if "synchroniz" in str(w.message).lower()})
    record_property("host_syncs_per_step", syncs / n_steps)
    record_property("dtoh_copies_per_step", dtoh / n_steps)
    record_property("sync_sites", " ;; ".join(lines))
    assert syncs == 0 and dtoh == 0, (f"{syncs / n_steps:g} host syncs and {dtoh / n_steps:g} device-to-host "
                                      f"copies per step ({'CUDA profiler' if ON_CUDA else 'ops that sync on CUDA'});"
                                      " from:\n  " + "\n  ".join(lines))
