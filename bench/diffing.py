"""Model diffing throughput (issue #15): the runner over two models vs the same runner over one.

    python bench/diffing.py [--steps 10] [--warm 2] [--d-sae 16384] [--out bench/results_diffing.json]

Two pythia-70m-shaped random GPT-NeoX models (bench/lm.py; the second is the first with one MLP's
weights perturbed), the same corpus and tokens. For 1 hook (blocks.3.hook_resid_post -> itself) and 3 hooks
(blocks.0-2 -> blocks.3-5) per model, d_sae 16384, TopK k 32, batch 4096: tokens/s of
`LanguageModelCrosscoderTrainingRunner(cfg).run()` with `model_names=[base, chat]` divided by the run with
`model_name=base` (steady state from training_log.jsonl's `elapsed_s`, as bench/e2e.py). The diff harvests
twice as much (two LM forwards per token) and trains a crosscoder whose d_in and d_out double; the goal is
that nothing else costs extra (issue #15: ratio >= 0.45 on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import setup  # noqa: E402

BATCH = 4096
SHAPES = {"1 hook": (["blocks.3.hook_resid_post"], ["blocks.3.hook_resid_post"]),
          "3 hooks": ([f"blocks.{i}.hook_resid_post" for i in range(3)],
                      [f"blocks.{i}.hook_resid_post" for i in range(3, 6)])}


def build_pair(root: Path) -> tuple[str, str, str]:
    """(base model dir, chat model dir, corpus): chat = base with layer 2's MLP output weights perturbed."""
    import lm
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, corpus = lm.build(root)
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(1)
    with torch.no_grad():
        w = model.gpt_neox.layers[2].mlp.dense_4h_to_h.weight
        w.add_(0.5 * w.std() * torch.randn_like(w))
    chat = str(root / "chat")
    model.save_pretrained(chat)
    AutoTokenizer.from_pretrained(base).save_pretrained(chat)
    return base, chat, corpus


def run(models: list[str], corpus: str, hooks: tuple[list[str], list[str]], a, out: Path) -> dict:
    from hf_crosscoder import LanguageModelCrosscoderRunnerConfig, LanguageModelCrosscoderTrainingRunner

    names = {"model_name": models[0]} if len(models) == 1 else {"model_names": models}
    if a.k_aux == "single":  # the diff's AuxK as wide as the single run's default (len(hooks_out) * d_model / 2)
        names["k_aux"] = len(hooks[1]) * 512 // 2
    cfg = LanguageModelCrosscoderRunnerConfig(
        **names, dataset_path=corpus, d_model=512, architecture="topk_crosscoder", k=32,
        hook_names_in=hooks[0], hook_names_out=hooks[1], d_sae=a.d_sae, context_size=128,
        store_batch_size_prompts=32, train_batch_size_tokens=BATCH, n_batches_in_buffer=4,
        n_batches_for_norm_estimate=2, training_tokens=BATCH * a.steps, n_eval_batches=1,
        wandb_log_frequency=1, log_to_wandb=False, device="cpu", output_path=str(out), overwrite_output=True)
    t0 = time.perf_counter()
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    wall = time.perf_counter() - t0
    rows = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(out / "training_log.jsonl"))}
    span = rows[a.steps] - rows[a.warm]
    return {"models": len(models), "wall_s": wall, "tokens_per_s": (a.steps - a.warm) * BATCH / span}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warm", type=int, default=2, help="steps before the timed span (even: refill-aligned)")
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results_diffing.json"))
    p.add_argument("--k-aux", choices=("default", "single"), default="default",
                   help="single: give the diff the single run's k_aux (the default doubles with the models)")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--only-diff", action="store_true", help="time the diff runs only (single from --out)")
    a = p.parse_args(argv)
    setup(a.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    root = Path(tempfile.mkdtemp(prefix="bench_diffing_"))
    base, chat, corpus = build_pair(root)
    earlier = json.loads(Path(a.out).read_text())["results"] if a.only_diff else {}
    results = {}
    for shape in a.shapes.split(","):
        hooks = SHAPES[shape]
        one = earlier[shape]["single"] if a.only_diff else run([base], corpus, hooks, a, root / "one")
        two = run([base, chat], corpus, hooks, a, root / "two")
        results[shape] = {"single": one, "diff": two, "ratio": two["tokens_per_s"] / one["tokens_per_s"]}
        print(json.dumps({shape: results[shape]}), flush=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
