"""hf_crosscoder training steps (worker for bench/run.py; prints one JSON line).

`--mode model`: forward + loss + backward + Adam + zero_grad, the step the peers are timed on.
`--mode trainer`: CrosscoderTrainer.train_step (adds grad clipping, the lr schedule, dead-latent tracking).
Always reports this process's peak RSS and its RSS before the first model existed (run one architecture
per process to read one step's memory)."""

import argparse
import os
import sys
from importlib.metadata import version

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit, load_acts, median_time, peak_rss_bytes, setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("acts", help=".safetensors with 'acts' [batch, n_hooks * d_model] (inputs; targets too "
               "when --hooks-out is 0)")
p.add_argument("--hooks", type=int, default=1, help="input hooks (d_model = width / hooks)")
p.add_argument("--separate-out", action="store_true", help="outputs are other hooks (a fresh tensor "
               "of the same shape) instead of the inputs")
p.add_argument("--d-sae", type=int, default=16384)
p.add_argument("--k", type=int, default=32)
p.add_argument("--reps", type=int, default=5)
p.add_argument("--archs", default="all", help="comma-separated, or 'all' (every registered architecture)")
p.add_argument("--mode", choices=["model", "trainer"], default="model")
p.add_argument("--peak", action="store_true", help="also time the fp32 matmul peak in this process")
args = p.parse_args()
setup()
x = load_acts(args.acts)
y = torch.randn_like(x) if args.separate_out else x

from accelerate import Accelerator  # noqa: E402

from hf_crosscoder.config import CrosscoderConfig, LanguageModelCrosscoderRunnerConfig  # noqa: E402
from hf_crosscoder.modeling import ARCHITECTURES, Crosscoder  # noqa: E402
from hf_crosscoder.trainer import CrosscoderTrainer  # noqa: E402

rss_before = peak_rss_bytes()  # data loaded, libraries imported, no model yet

d_model = x.shape[1] // args.hooks
hooks_in = [f"blocks.{i}.hook_resid_post" for i in range(args.hooks)]
hooks_out = [f"blocks.{i + args.hooks}.hook_resid_post" for i in range(args.hooks)] if args.separate_out else hooks_in
result = {"library": f"hf_crosscoder {version('hf_crosscoder')}", "mode": args.mode, "results": {}}
if args.peak:
    a, b = torch.randn(4096, 512), torch.randn(512, 16384)
    out = torch.empty(4096, 16384)
    t = median_time(lambda: torch.mm(a, b, out=out), max(args.reps, 5))
    result["matmul_peak_flops"] = 2 * 4096 * 512 * 16384 / t["median_s"]
    del a, b, out


def make_step(arch: str):
    hyper = dict(architecture=arch, d_model=d_model, hook_names_in=hooks_in, hook_names_out=hooks_out,
                 d_sae=args.d_sae, k=args.k, l1_coefficient=5.0)
    if args.mode == "trainer":
        cfg = LanguageModelCrosscoderRunnerConfig(**hyper, train_batch_size_tokens=x.shape[0], device="cpu",
                                                  training_tokens=x.shape[0] * 1000)
        trainer = CrosscoderTrainer(cfg, Crosscoder(cfg.crosscoder_config()).train(), Accelerator(cpu=True))
        return lambda: trainer.train_step(x, y)
    model = Crosscoder(CrosscoderConfig(**hyper)).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    dead = torch.zeros(args.d_sae, dtype=torch.bool)  # the trainer always passes a mask

    def step():
        model(x, y, dead_mask=dead).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


for arch in (list(ARCHITECTURES) if args.archs == "all" else args.archs.split(",")):
    result["results"][arch] = median_time(make_step(arch), args.reps)
result["rss_before_bytes"] = rss_before
result["peak_rss_bytes"] = peak_rss_bytes()
emit(result)
