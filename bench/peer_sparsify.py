"""EleutherAI sparsify TopK SAE step (forward + fvu/auxk loss + backward + Adam + zero_grad) on the
activations in a .safetensors file. Run with bench/.venv-sparsify/bin/python; prints one JSON line."""

import argparse
import os
import sys
from importlib.metadata import version

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from sparsify import SparseCoder, SparseCoderConfig  # noqa: E402
from timing import emit, load_acts, median_time, setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("acts")
p.add_argument("--d-sae", type=int, default=16384)
p.add_argument("--k", type=int, default=32)
p.add_argument("--reps", type=int, default=5)
args = p.parse_args()
setup()
x = load_acts(args.acts)
sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=args.d_sae, k=args.k), device="cpu")
opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
dead = torch.zeros(args.d_sae, dtype=torch.bool)  # their trainer always passes a mask


def step():
    out = sae(x, dead_mask=dead)
    (out.fvu + out.auxk_loss / 32).backward()
    opt.step()
    opt.zero_grad()


emit({"library": f"eai-sparsify {version('eai-sparsify')}", "results": {"topk": median_time(step, args.reps)}})
