"""Shared test helpers (importable from any test module: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig

D_MODEL = 64
N_LAYERS = 4

_SUBJECTS = ["the cat", "a small dog", "my old friend", "the teacher", "every child", "the river", "a bird",
             "the farmer", "our neighbour", "the little robot", "a tired fox", "the queen"]
_VERBS = ["sees", "likes", "finds", "carries", "paints", "follows", "remembers", "builds", "hears", "opens"]
_OBJECTS = ["a red ball", "the green door", "some bread", "the long road", "a quiet song", "the old map",
            "a bright star", "the wooden box", "a warm coat", "the blue sea", "a tiny seed"]
_TAILS = ["today", "in the morning", "after the rain", "with great care", "near the house", "at night",
          "before dinner", "every day", "once again", "without a word"]


def make_documents(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Deterministic English-like documents of 1 to 12 sentences (about 5 to 120 words)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                     f"{rng.choice(_TAILS)}." for _ in range(rng.randint(1, 12))]
        docs.append(" ".join(s[0].upper() + s[1:] for s in sentences))
    return docs


def make_runner_config(tiny_model_dir: str | Path, text_dataset_path: str | Path,
                       **overrides: Any) -> LanguageModelCrosscoderRunnerConfig:
    """A small, fast runner config on the tiny GPT-NeoX: blocks.0/1 -> blocks.2/3 resid_post."""
    kwargs: dict[str, Any] = dict(
        model_name=str(tiny_model_dir),
        d_model=D_MODEL,
        hook_names_in=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
        hook_names_out=["blocks.2.hook_resid_post", "blocks.3.hook_resid_post"],
        d_sae=128,
        dataset_path=str(text_dataset_path),
        streaming=True,
        context_size=32,
        store_batch_size_prompts=4,
        train_batch_size_tokens=64,
        n_batches_in_buffer=4,
        n_batches_for_norm_estimate=2,
        training_tokens=64 * 20,
        n_eval_batches=2,
        log_to_wandb=False,
        device="cpu",
        seed=0,
        output_path=tempfile.mkdtemp(prefix="hf_crosscoder_test_"),
    )
    kwargs.update(overrides)
    return LanguageModelCrosscoderRunnerConfig(**kwargs)
