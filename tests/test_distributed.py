"""Data parallelism on CPU (gloo): 2 processes train exactly like 1 process on the same global batches."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

from hf_crosscoder import Crosscoder, LanguageModelCrosscoderRunnerConfig
from hf_crosscoder.trainer import CrosscoderTrainer

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 64
STEPS = 12


# "diff": a model diff (two models' layers, model-major) with decoder vectors tied across the models for the
# first latents, whose copies get the summed gradient: that sum and DDP's all-reduce must commute
DIFF = dict(architecture="crosscoder", model_names=["base", "chat"], hook_names_in=["a"], hook_names_out=["a"],
            n_shared_latents=8, shared_sparsity_scale=0.2)


def _cfg(arch: str) -> LanguageModelCrosscoderRunnerConfig:
    fields = DIFF if arch == "diff" else dict(architecture=arch, hook_names_in=["a", "b"], hook_names_out=["c"])
    return LanguageModelCrosscoderRunnerConfig(
        **fields, d_model=8, d_sae=32, k=4, training_tokens=GLOBAL_BATCH * STEPS,
        train_batch_size_tokens=GLOBAL_BATCH, lr=1e-2, dead_feature_window=3, wandb_log_frequency=4,
        l1_coefficient=0.1)


def _global_batches(n_in: int, n_out: int):
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (torch.randn(GLOBAL_BATCH, n_in, 8, generator=g, dtype=torch.float64),
               torch.randn(GLOBAL_BATCH, n_out, 8, generator=g, dtype=torch.float64))


def _train(arch: str, accelerator: Accelerator) -> dict:
    torch.manual_seed(0)
    config = _cfg(arch).crosscoder_config()
    model = Crosscoder(config).double()
    with torch.no_grad():
        model.b_enc[-6:] = -50.0  # some latents never fire: the dead mask (and AuxK) must agree globally
    trainer = CrosscoderTrainer(_cfg(arch), model, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    share = GLOBAL_BATCH // world
    # test-only data order: the union of the per-process batches is the single-process batch
    local = ((x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
             for x, y in _global_batches(config.n_in, config.n_out))
    trainer.train(local)
    state = {k: v.detach().clone() for k, v in trainer.crosscoder.state_dict().items()}
    state["steps_since_fired"] = trainer.state.steps_since_fired.clone()
    return state


ARCHS = ["crosscoder", "topk_crosscoder", "jumprelu_crosscoder", "diff"]


def two_process_worker(out_dir: str) -> None:
    """Run under `accelerate launch` (fresh processes: forking a pytest process that already has
    threads can deadlock gloo)."""
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert acc.num_processes == 2, "the launcher did not start two processes"
    for arch in ARCHS:
        state = _train(arch, acc)
        if acc.is_main_process:
            save_file(state, f"{out_dir}/{arch}.safetensors")
        acc.wait_for_everyone()


def accelerate_launch(config_file: str, *args: str, timeout: int = 300, cpu: bool = True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / config_file),
           "--main_process_port", str(port), *args]
    # tests/ for the worker modules, then the caller's PYTHONPATH (a checkout's src/ run without installing)
    paths = [str(ROOT / "tests"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    if cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:  # show each rank's own traceback, not only the launcher's summary
        lines = [ln for ln in proc.stderr.splitlines() if "training:" not in ln]
        pytest.fail("accelerate launch failed:\n" + "\n".join(lines[-120:]))
    return proc


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    accelerate_launch("accelerate_configs/cpu_2proc.yaml", "-m", "test_distributed", str(out))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_two_processes_equal_one(arch, two_process_results):
    single = _train(arch, Accelerator(cpu=True))
    double = load_file(two_process_results / f"{arch}.safetensors")
    assert single.keys() == double.keys()
    assert torch.equal(single["steps_since_fired"], double["steps_since_fired"])
    assert single["steps_since_fired"][-6:].min() == STEPS
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-10, atol=1e-12, msg=key)
    if arch == "diff":  # the shared latents' decoder copies stayed identical across the models
        W = double["W_dec"]  # [d_sae, n_models * n_hooks, d_model]
        assert torch.equal(W[:8, 0], W[:8, 1]) and not torch.allclose(W[8:, 0], W[8:, 1])


def _runner_config_file(path: Path, cfg) -> str:
    import dataclasses
    import json

    path.write_text(json.dumps(dataclasses.asdict(cfg)))
    return str(path)


def test_runner_two_processes_one_output_and_exact_resume(tiny_model_dir, text_dataset_path, tmp_path):
    import json

    from helpers import make_runner_config

    from hf_crosscoder import Crosscoder

    common = dict(training_tokens=64 * 8, n_checkpoints=1, wandb_log_frequency=2, eval_every_n_wandb_logs=2)
    full = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "full"), **common)
    accelerate_launch("accelerate_configs/cpu_2proc.yaml", "scripts/train.py",
                      "--config", _runner_config_file(tmp_path / "full.json", full))
    out = tmp_path / "full"
    assert json.loads((out / "metrics.json").read_text())["num_processes"] == 2
    log_steps = [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert log_steps == [2, 4, 6, 8]  # one process logs, once per log step
    assert (out / "checkpoints" / "step_4" / "activations_store_1").is_dir()
    Crosscoder.from_pretrained(out)

    resumed = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "resumed"),
                                 resume_from_checkpoint=str(out / "checkpoints" / "step_4"), **common)
    accelerate_launch("accelerate_configs/cpu_2proc.yaml", "scripts/train.py",
                      "--config", _runner_config_file(tmp_path / "resumed.json", resumed))
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_runner_diff_on_two_processes(tiny_model_dir, documents, text_dataset_path, tmp_path):
    """A model diff under DDP: each process harvests both models on its own token shard, one output."""
    import json

    from conftest import build_tokenizer
    from helpers import make_runner_config
    from test_multimodel import HOOKS, save_tiny

    chat = save_tiny(tmp_path / "chat", build_tokenizer(documents))
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, model_names=[tiny_model_dir, chat], **HOOKS,
                             architecture="topk_crosscoder", k=8, n_shared_latents=16, training_tokens=64 * 6,
                             output_path=str(tmp_path / "out"))
    accelerate_launch("accelerate_configs/cpu_2proc.yaml", "scripts/train.py",
                      "--config", _runner_config_file(tmp_path / "diff.json", cfg))
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and sum(v for k, v in metrics.items() if k.startswith("diff_latents/")) == 128
    cc = Crosscoder.from_pretrained(tmp_path / "out")
    assert cc.config.model_names == ["tiny_gpt_neox0", "chat"] and cc.config.n_out == 4
    W = cc.W_dec.detach() * torch.tensor(cc.config.activation_scale_out)[None, :, None]  # training space
    torch.testing.assert_close(W[:16, :2], W[:16, 2:], rtol=1e-5, atol=0)  # the shared latents stayed tied


def _launch_runner(config_file: str, cfg, out: Path, cpu: bool) -> dict:
    accelerate_launch(config_file, "scripts/train.py", "--config", _runner_config_file(out.with_suffix(".json"), cfg),
                      timeout=600, cpu=cpu)
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def ddp_runs(tiny_model_dir, text_dataset_path, tmp_path_factory):
    """Final weights of 2-process DDP runner runs, per architecture (computed on first use)."""
    from helpers import make_runner_config

    runs: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in runs:
            out = tmp_path_factory.mktemp("ddp_runner") / arch
            cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(out), **_ds_common(arch))
            runs[arch] = _launch_runner("accelerate_configs/cpu_2proc.yaml", cfg, out, cpu=True)
        return runs[arch]
    return get


def _ds_common(arch: str) -> dict:
    # max_grad_norm 0.5 clips in these runs: DeepSpeed must take it from the runner config
    return dict(architecture=arch, k=8, training_tokens=64 * 8, max_grad_norm=0.5, n_checkpoints=1,
                wandb_log_frequency=2, eval_every_n_wandb_logs=2)


@pytest.mark.parametrize("stage,arch", [(2, "topk_crosscoder"), (3, "topk_crosscoder"), (3, "crosscoder")])
def test_deepspeed_zero_equals_ddp(stage, arch, ddp_runs, tiny_model_dir, text_dataset_path, tmp_path):
    """ZeRO-2 (optimizer state and gradients sharded) and ZeRO-3 (parameters sharded too: the frozen LM
    must still load whole, the final model is gathered) on 2 CPU processes train the same weights as
    DDP, up to float32 summation order; the output loads with from_pretrained. Slow-ish (DeepSpeed
    compiles its CPU comm op on first use), but it runs in CI."""
    import json

    from helpers import make_runner_config

    from hf_crosscoder import Crosscoder

    config_file = f"accelerate_configs/cpu_deepspeed_zero{stage}.yaml"
    out = tmp_path / "ds"
    cfg = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(out), **_ds_common(arch))
    weights = _launch_runner(config_file, cfg, out, cpu=False)
    reference = ddp_runs(arch)
    for key in reference:
        torch.testing.assert_close(weights[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distributed_type"] == "DEEPSPEED" and metrics["num_processes"] == 2
    loaded = Crosscoder.from_pretrained(out)
    assert loaded.config.architecture == arch and loaded.config.activation_norm_folded
    if stage == 3 and arch == "topk_crosscoder":  # sharded optimizer/parameter state resumes exactly
        resumed = make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "resumed"),
                                     resume_from_checkpoint=str(out / "checkpoints" / "step_4"), **_ds_common(arch))
        again = _launch_runner(config_file, resumed, tmp_path / "resumed", cpu=False)
        assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_fsdp_on_cpu_is_refused_loudly(monkeypatch):
    from hf_crosscoder.llm_crosscoder_training_runner import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP needs GPUs"):
        make_accelerator(_cfg("crosscoder"))


def test_launch_that_did_not_set_up_its_processes_is_refused(monkeypatch):
    """E.g. a GPU-only accelerate config on a CPU machine: each launched process would train alone."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import hf_crosscoder.llm_crosscoder_training_runner as runner

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runner, "Accelerator",
                        lambda **kw: SimpleNamespace(num_processes=1, distributed_type=DistributedType.NO))
    with pytest.raises(ValueError, match="2 processes were launched but accelerate set up 1"):
        runner.make_accelerator(_cfg("crosscoder"))


if __name__ == "__main__":
    two_process_worker(sys.argv[1])
