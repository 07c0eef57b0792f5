"""Harvest throughput (worker for bench/run.py; prints one JSON line): hf_crosscoder's
ActivationHarvester (hooks on layers 0-2 and 3-5, early stop after layer 5) vs the bare model truncated
at the last hook (the base GPT-NeoX without LM head: the least any harvester must run), and the full
forward with LM head (what a harvester without early stop pays)."""

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit, median_time, setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--prompts", type=int, default=32)
p.add_argument("--context", type=int, default=128)
p.add_argument("--reps", type=int, default=5)
args = p.parse_args()
setup()
import lm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig  # noqa: E402
from hf_crosscoder.harvest import ActivationHarvester  # noqa: E402

path, _ = lm.build(tempfile.mkdtemp(prefix="bench_lm_"), n_docs=10)
model = AutoModelForCausalLM.from_pretrained(path).eval()
tokenizer = AutoTokenizer.from_pretrained(path)
hooks_in = [f"blocks.{i}.hook_resid_post" for i in range(3)]
hooks_out = [f"blocks.{i}.hook_resid_post" for i in range(3, 6)]
cfg = LanguageModelCrosscoderRunnerConfig(model_name=path, d_model=512, hook_names_in=hooks_in,
                                          hook_names_out=hooks_out, device="cpu")
harvester = ActivationHarvester(model, tokenizer, hooks_in + hooks_out, cfg)
tokens = torch.randint(3, 60, (args.prompts, args.context))
n = tokens.numel()


def bare():
    with torch.no_grad():
        model.gpt_neox(input_ids=tokens, use_cache=False)


def full():
    with torch.no_grad():
        model(input_ids=tokens, use_cache=False)


times = {name: median_time(fn, args.reps)["median_s"] for name, fn in
         [("harvest", lambda: harvester(tokens)), ("bare_truncated", bare), ("full_forward", full)]}
emit({"tokens_per_call": n, "results": {name: {"s": t, "tokens_per_s": n / t} for name, t in times.items()}})
