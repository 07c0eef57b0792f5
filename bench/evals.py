"""Seconds and peak RSS of one evaluation with CE metrics on the pythia-70m-shaped random GPT-NeoX
(vocab 50304), 32 x 128 tokens, layers 0-2 -> 3-5 (7 LM forwards: clean, and spliced + zero-ablated per
output hook). Prints one JSON line. Run: python bench/evals.py"""

import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import setup  # noqa: E402

setup(2)
import lm  # noqa: E402

from hf_crosscoder import ActivationsStore, Crosscoder  # noqa: E402
from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig  # noqa: E402
from hf_crosscoder.evals import evaluate  # noqa: E402

root = tempfile.mkdtemp(prefix="bench_evals_")
lm.build(root)
cfg = LanguageModelCrosscoderRunnerConfig(
    model_name=os.path.join(root, "model"), dataset_path=os.path.join(root, "corpus.jsonl"), d_model=512,
    hook_names_in=[f"blocks.{i}.hook_resid_post" for i in range(3)],
    hook_names_out=[f"blocks.{i}.hook_resid_post" for i in range(3, 6)], d_sae=4096, context_size=128,
    store_batch_size_prompts=32, train_batch_size_tokens=4096, n_batches_in_buffer=2, device="cpu")
store = ActivationsStore(cfg, device="cpu")
crosscoder = Crosscoder(cfg.crosscoder_config())
store.estimate_norm_scaling()  # outside the timed calls
seconds = []
for _ in range(2):
    t0 = time.perf_counter()
    metrics = evaluate(crosscoder, store, 1)
    seconds.append(time.perf_counter() - t0)
print(json.dumps({"seconds": seconds, "peak_rss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  "ce_loss_without_sae": metrics["ce_loss_without_sae"]}))
