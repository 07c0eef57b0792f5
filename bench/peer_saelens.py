"""SAELens training step (loss forward + backward + Adam + zero_grad) on the activations in a
.safetensors file. Run with bench/.venv-saelens/bin/python; prints one JSON line."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sae_lens  # noqa: E402
from sae_lens.saes.sae import TrainStepInput  # noqa: E402
from timing import emit, load_acts, median_time, setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("acts")
p.add_argument("--d-sae", type=int, default=16384)
p.add_argument("--k", type=int, default=32)
p.add_argument("--reps", type=int, default=5)
p.add_argument("--archs", default="standard,topk,batchtopk,jumprelu")
args = p.parse_args()
setup()
x = load_acts(args.acts)
d_in = x.shape[1]

ARCHS = {  # our architecture name -> (SAELens training classes, extra config, coefficients)
    "standard": (sae_lens.StandardTrainingSAE, sae_lens.StandardTrainingSAEConfig, {"l1_coefficient": 5.0}, {"l1": 5.0}),
    "topk": (sae_lens.TopKTrainingSAE, sae_lens.TopKTrainingSAEConfig, {"k": args.k}, {}),
    "batchtopk": (sae_lens.BatchTopKTrainingSAE, sae_lens.BatchTopKTrainingSAEConfig, {"k": args.k}, {}),
    "jumprelu": (sae_lens.JumpReLUTrainingSAE, sae_lens.JumpReLUTrainingSAEConfig, {"l0_coefficient": 1.0}, {"l0": 1.0}),
}


def make_step(name: str):
    cls, cfg_cls, extra, coefficients = ARCHS[name]
    sae = cls(cfg_cls(d_in=d_in, d_sae=args.d_sae, dtype="float32", device="cpu", **extra)).train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    step_input = TrainStepInput(sae_in=x, coefficients=coefficients, is_logging_step=False, n_training_steps=0,
                                dead_neuron_mask=torch.zeros(args.d_sae, dtype=torch.bool))  # as their trainer

    def step():
        sae.training_forward_pass(step_input).loss.backward()
        opt.step()
        opt.zero_grad()

    return step


results = {name: median_time(make_step(name), args.reps) for name in args.archs.split(",")}
emit({"library": f"sae-lens {sae_lens.__version__}", "results": results})
