"""Trainer unit tests on synthetic activations (no language model)."""

import math

import pytest
import torch
from accelerate import Accelerator

from hf_crosscoder import Crosscoder, LanguageModelCrosscoderRunnerConfig
from hf_crosscoder.trainer import CrosscoderTrainer, lr_lambda, sparsity_scale

HOOKS_IN = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
HOOKS_OUT = ["blocks.2.hook_resid_post"]


def _cfg(**overrides) -> LanguageModelCrosscoderRunnerConfig:
    base = dict(hook_names_in=HOOKS_IN, hook_names_out=HOOKS_OUT, d_model=8, d_sae=32, k=4,
                training_tokens=64 * 200, train_batch_size_tokens=64, lr=3e-3, wandb_log_frequency=10,
                l1_coefficient=0.01)
    base.update(overrides)
    return LanguageModelCrosscoderRunnerConfig(**base)


def _batches(seed: int = 0, batch: int = 64):
    """A linear map from 2 input layers to 1 output layer through 16 sparse features."""
    g = torch.Generator().manual_seed(seed)
    enc = torch.randn(16, 16, generator=g)
    dec = torch.randn(16, 8, generator=g)
    while True:
        z = torch.relu(torch.randn(batch, 16, generator=g)) * (torch.rand(batch, 16, generator=g) < 0.2)
        yield (z @ enc).view(batch, 2, 8), (z @ dec).view(batch, 1, 8)


def _trainer(cfg) -> CrosscoderTrainer:
    torch.manual_seed(0)
    return CrosscoderTrainer(cfg, Crosscoder(cfg.crosscoder_config()), Accelerator(cpu=True))


def test_lr_schedule_warmup_constant_decay():
    cfg = _cfg(lr=1.0, lr_end=0.1, lr_warmup_steps=4, lr_decay_steps=10)
    f = lr_lambda(cfg, total_steps=100)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(50) == 1.0 and f(89) == 1.0
    assert f(90) == pytest.approx(1 - 0.9 * 1 / 10)
    assert f(99) == pytest.approx(0.1)


@pytest.mark.parametrize("name", ["cosineannealing", "linear"])
def test_lr_schedule_reaches_lr_end(name):
    f = lr_lambda(_cfg(lr=2.0, lr_scheduler_name=name), total_steps=50)
    assert f(0) == 1.0
    assert f(50) == pytest.approx(0.1)  # default lr_end = lr / 10
    assert all(f(s) >= f(s + 1) for s in range(50))


def test_sparsity_warmup_ramps_linearly():
    cfg = _cfg(l1_warmup_steps=4)
    assert [sparsity_scale(cfg, s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert sparsity_scale(_cfg(), 0) == 1.0


@pytest.mark.parametrize("arch", ["crosscoder", "topk_crosscoder", "jumprelu_crosscoder"])
def test_loss_decreases(arch):
    cfg = _cfg(architecture=arch, training_tokens=64 * 300)
    trainer = _trainer(cfg)
    logged = []
    trainer.train(_batches(), log_fn=lambda step, m: logged.append(m))
    assert trainer.state.step == 300 and trainer.state.n_tokens == 300 * 64
    first, last = logged[0], logged[-1]
    assert last["losses/mse"] < 0.3 * first["losses/mse"]
    assert all(k in last for k in ("loss", "l0", "lr", "dead_fraction", "fvu/blocks.2.hook_resid_post"))


def test_dead_latents_are_tracked_and_feed_auxk():
    cfg = _cfg(architecture="topk_crosscoder", dead_feature_window=3, training_tokens=64 * 5)
    trainer = _trainer(cfg)
    with torch.no_grad():
        trainer.crosscoder.b_enc[:8] = -1e4  # these 8 latents can never fire
    trainer.train(_batches())
    dead = trainer.dead_mask()
    assert dead[:8].all()
    assert trainer.state.steps_since_fired[:8].eq(5).all()
    out = trainer.model(*next(_batches()), dead_mask=dead)
    assert out.losses["aux"] > 0


def test_default_dead_window_is_10m_tokens_capped_at_a_tenth_of_the_run():
    from hf_crosscoder.config import TrainerArgs

    args = TrainerArgs(train_batch_size_tokens=4096)
    assert args.dead_feature_window is None
    assert args.dead_window_steps(100_000) == math.ceil(10_000_000 / 4096)  # long run: 10M tokens
    assert args.dead_window_steps(488) == 49  # short run: a tenth of it
    assert args.dead_window_steps(3) == 1
    assert TrainerArgs(dead_feature_window=7).dead_window_steps(10) == 7


def test_nan_loss_stops_with_clear_error():
    cfg = _cfg(wandb_log_frequency=1)
    trainer = _trainer(cfg)

    def poisoned():
        acts_in, acts_out = next(_batches())
        acts_in[0, 0, 0] = math.nan
        while True:
            yield acts_in, acts_out

    with pytest.raises(FloatingPointError, match="checkpoints are intact"):
        trainer.train(poisoned())


def test_stop_request_raises_after_a_full_step():
    from hf_crosscoder.trainer import StopTraining

    trainer = _trainer(_cfg())
    trainer.stop_requested = "SIGTERM"
    with pytest.raises(StopTraining):
        trainer.train(_batches())
    assert trainer.state.step == 1


def test_compiled_crosscoder_trains_like_eager():
    cfg = _cfg(training_tokens=64 * 3)
    eager = _trainer(cfg)
    eager.train(_batches())
    compiled = _trainer(_cfg(training_tokens=64 * 3, compile_crosscoder=True))
    compiled.train(_batches())
    for (name, a), b in zip(eager.crosscoder.state_dict().items(), compiled.crosscoder.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
