"""End-to-end runner throughput (worker for bench/run.py; prints one JSON line):
LanguageModelCrosscoderTrainingRunner(cfg).run() on the pythia-70m-shaped random GPT-NeoX and a generated
.jsonl corpus, layers 0-2 -> 3-5, d_sae 4096. Two runs of different lengths; tokens/s is the difference
quotient, so the fixed costs (model load, norm estimate, buffer fill, final eval, saving) cancel out."""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit, setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, nargs=2, default=[4, 16])
p.add_argument("--d-sae", type=int, default=4096)
p.add_argument("--architecture", default="crosscoder")
args = p.parse_args()
setup()
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import lm  # noqa: E402

from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig  # noqa: E402
from hf_crosscoder.llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner  # noqa: E402

root = tempfile.mkdtemp(prefix="bench_e2e_")
model_path, corpus = lm.build(root)
batch = 4096
walls = []
for steps in args.steps:
    cfg = LanguageModelCrosscoderRunnerConfig(
        model_name=model_path, dataset_path=corpus, d_model=512, architecture=args.architecture,
        hook_names_in=[f"blocks.{i}.hook_resid_post" for i in range(3)],
        hook_names_out=[f"blocks.{i}.hook_resid_post" for i in range(3, 6)],
        d_sae=args.d_sae, context_size=128, store_batch_size_prompts=32, train_batch_size_tokens=batch,
        n_batches_in_buffer=4, n_batches_for_norm_estimate=2, training_tokens=batch * steps, n_eval_batches=1,
        log_to_wandb=False, device="cpu", output_path=os.path.join(root, f"out{steps}"))
    t0 = time.perf_counter()
    LanguageModelCrosscoderTrainingRunner(cfg).run()
    walls.append(time.perf_counter() - t0)
(s1, s2), (w1, w2) = args.steps, walls
emit({"steps": args.steps, "wall_s": walls, "tokens_per_s": (s2 - s1) * batch / (w2 - w1),
      "step_s": (w2 - w1) / (s2 - s1)})
