"""End-to-end runner throughput (worker for bench/run.py; prints one JSON line):
LanguageModelCrosscoderTrainingRunner(cfg).run() on the pythia-70m-shaped random GPT-NeoX and a generated
.jsonl corpus, layers 0-2 -> 3-5, d_sae 4096. tokens/s is read off training_log.jsonl's `elapsed_s` between
the end of step --warm and the last step: the steady state, harvest refills included (the buffer holds 4
batches, so every 2 steps refill 2 batches), without the fixed costs (model load, norm estimate, first
buffer fill, final eval, saving), which are reported apart as the run's wall time.
Also runs under `accelerate launch` (bench/run.py's distributed section): the main process reports."""

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit, setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=16, help="run length")
p.add_argument("--warm", type=int, default=4, help="steps before the timed span (even: refill-aligned)")
p.add_argument("--d-sae", type=int, default=4096)
p.add_argument("--architecture", default="crosscoder")
p.add_argument("--threads", type=int, default=2, help="torch threads per process")
p.add_argument("--root", default=None, help="work directory (shared by the processes of a launch)")
args = p.parse_args()
setup(args.threads)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import lm  # noqa: E402
from accelerate import PartialState  # noqa: E402

from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig  # noqa: E402
from hf_crosscoder.llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner  # noqa: E402

state = PartialState(cpu=True)  # as the runner sets it up on CPU (device="cpu" below)
root = args.root or tempfile.mkdtemp(prefix="bench_e2e_")
with state.main_process_first():  # one copy of the model and corpus, written by the main process
    if state.is_main_process:
        lm.build(root)
model_path, corpus = os.path.join(root, "model"), os.path.join(root, "corpus.jsonl")
batch = 4096
out = os.path.join(root, "out")
cfg = LanguageModelCrosscoderRunnerConfig(
    model_name=model_path, dataset_path=corpus, d_model=512, architecture=args.architecture,
    hook_names_in=[f"blocks.{i}.hook_resid_post" for i in range(3)],
    hook_names_out=[f"blocks.{i}.hook_resid_post" for i in range(3, 6)],
    d_sae=args.d_sae, context_size=128, store_batch_size_prompts=32, train_batch_size_tokens=batch,
    n_batches_in_buffer=4, n_batches_for_norm_estimate=2, training_tokens=batch * args.steps, n_eval_batches=1,
    wandb_log_frequency=2, log_to_wandb=False, device="cpu", output_path=out, overwrite_output=True)
t0 = time.perf_counter()
LanguageModelCrosscoderTrainingRunner(cfg).run()
wall = time.perf_counter() - t0
if state.is_main_process:
    rows = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(os.path.join(out, "training_log.jsonl")))}
    span = rows[args.steps] - rows[args.warm]
    emit({"steps": args.steps, "warm": args.warm, "wall_s": wall, "threads": args.threads,
          "processes": state.num_processes, "step_s": span / (args.steps - args.warm),
          "tokens_per_s": (args.steps - args.warm) * batch / span})
