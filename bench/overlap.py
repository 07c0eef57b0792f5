"""Can harvest and training overlap on this machine? (worker for bench/run.py; prints one JSON line)

Throughput of the two stages of the end-to-end pipeline (the pythia-70m-shaped harvest, 32 x 128 tokens,
layers 0-2 -> 3-5, and the crosscoder train step at d_sae 4096, batch 4096), each alone with 2 threads and
with 1 thread, then both at once in two Python threads with 1 torch thread each (the best split of 2
cores). If each stage already scales to both cores, running them concurrently cannot beat running them
one after the other: 1 / (1/h + 1/t) with 2 threads is then the bound for any overlap."""

import os
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit, setup  # noqa: E402

setup()
import lm  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from hf_crosscoder import Crosscoder  # noqa: E402
from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig  # noqa: E402
from hf_crosscoder.harvest import ActivationHarvester  # noqa: E402
from hf_crosscoder.trainer import make_optimizer  # noqa: E402

B, REPS = 4096, 6
path, _ = lm.build(tempfile.mkdtemp(prefix="bench_overlap_"), n_docs=10)
model = AutoModelForCausalLM.from_pretrained(path).eval()
hooks_in = [f"blocks.{i}.hook_resid_post" for i in range(3)]
hooks_out = [f"blocks.{i}.hook_resid_post" for i in range(3, 6)]
cfg = LanguageModelCrosscoderRunnerConfig(model_name=path, d_model=512, hook_names_in=hooks_in,
                                          hook_names_out=hooks_out, d_sae=4096, device="cpu")
harvester = ActivationHarvester(model, AutoTokenizer.from_pretrained(path), hooks_in + hooks_out, cfg)
tokens = torch.randint(3, 60, (32, 128))
crosscoder = Crosscoder(cfg.crosscoder_config())
optimizer = make_optimizer(cfg, crosscoder)
x, y = torch.randn(B, 3, 512), torch.randn(B, 3, 512)


def harvest():
    harvester(tokens)


def train():
    crosscoder(x, y).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rate(fn, threads: int, result: dict | None = None, key: str = "") -> float:
    torch.set_num_threads(threads)
    fn()
    t0 = time.perf_counter()
    for _ in range(REPS):
        fn()
    tokens_per_s = REPS * B / (time.perf_counter() - t0)
    if result is not None:
        result[key] = tokens_per_s
    return tokens_per_s


alone = {f"{name}_{t}_threads": rate(fn, t) for t in (2, 1) for name, fn in (("harvest", harvest), ("train", train))}
both: dict = {}
workers = [threading.Thread(target=rate, args=(fn, 1, both, name)) for name, fn in (("harvest", harvest),
                                                                                     ("train", train))]
for w in workers:
    w.start()
for w in workers:
    w.join()
h, t = alone["harvest_2_threads"], alone["train_2_threads"]
emit({"alone": alone, "concurrent_1_thread_each": both, "pipeline_concurrent": min(both.values()),
      "sequential_2_threads": 1 / (1 / h + 1 / t), "slower_alone": min(h, t)})
