"""Data parallelism on CPU (gloo): 2 processes train exactly like 1 process on the same global batches."""

import pytest
import torch
from accelerate import Accelerator, debug_launcher
from accelerate.state import AcceleratorState
from accelerate.utils import InitProcessGroupKwargs
from safetensors.torch import load_file, save_file

from hf_crosscoder import Crosscoder, LanguageModelCrosscoderRunnerConfig
from hf_crosscoder.trainer import CrosscoderTrainer

GLOBAL_BATCH = 64
STEPS = 12


def _cfg(arch: str) -> LanguageModelCrosscoderRunnerConfig:
    return LanguageModelCrosscoderRunnerConfig(
        architecture=arch, hook_names_in=["a", "b"], hook_names_out=["c"], d_model=8, d_sae=32, k=4,
        training_tokens=GLOBAL_BATCH * STEPS, train_batch_size_tokens=GLOBAL_BATCH, lr=1e-2,
        dead_feature_window=3, wandb_log_frequency=4, l1_coefficient=0.1)


def _global_batches():
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        yield (torch.randn(GLOBAL_BATCH, 2, 8, generator=g, dtype=torch.float64),
               torch.randn(GLOBAL_BATCH, 1, 8, generator=g, dtype=torch.float64))


def _train(arch: str, accelerator: Accelerator) -> dict:
    torch.manual_seed(0)
    model = Crosscoder(_cfg(arch).crosscoder_config()).double()
    with torch.no_grad():
        model.b_enc[:6] = -50.0  # some latents never fire: the dead mask (and AuxK) must agree globally
    trainer = CrosscoderTrainer(_cfg(arch), model, accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    share = GLOBAL_BATCH // world
    # test-only data order: the union of the per-process batches is the single-process batch
    local = ((x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share])
             for x, y in _global_batches())
    trainer.train(local)
    state = {k: v.detach().clone() for k, v in trainer.crosscoder.state_dict().items()}
    state["steps_since_fired"] = trainer.state.steps_since_fired.clone()
    return state


def _two_process_worker(arch: str, out_file: str) -> None:
    AcceleratorState._reset_state(True)  # the forked child inherits the parent's single-process state
    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert acc.num_processes == 2, "the launcher did not start two processes"
    state = _train(arch, acc)
    if acc.is_main_process:
        save_file(state, out_file)
    acc.wait_for_everyone()


@pytest.mark.parametrize("arch", ["crosscoder", "topk_crosscoder", "jumprelu_crosscoder"])
def test_two_processes_equal_one(arch, tmp_path):
    out = tmp_path / "ddp.safetensors"
    debug_launcher(_two_process_worker, args=(arch, str(out)), num_processes=2)
    AcceleratorState._reset_state(True)
    single = _train(arch, Accelerator(cpu=True))
    double = load_file(out)
    assert single.keys() == double.keys()
    assert torch.equal(single["steps_since_fired"], double["steps_since_fired"])
    assert single["steps_since_fired"][:6].min() == STEPS
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-10, atol=1e-12, msg=key)
