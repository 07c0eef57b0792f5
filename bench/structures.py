"""CLT vs dense crosscoder train-step time at the same total d_sae (issue #16's benchmark).

    python bench/structures.py [--layers 6 --d_model 512 --width 4096 --batch 4096 --k 32 --reps 3]

One Adam step (forward, backward, optimizer) of a topk_crosscoder with layer_structure cross_layer
(k per layer group: L0 = layers * k) against the dense one of the same total d_sae (layers * width) and
the same L0 (k = layers * k), on random rows of `layers` hooks in and out. Prints one JSON line with the
median step seconds of each and their ratio (goal: CLT <= 0.7x dense).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import median_time  # noqa: E402

from hf_crosscoder import Crosscoder, CrosscoderConfig  # noqa: E402


def step_time(structure: str, args: argparse.Namespace) -> dict:
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(args.layers)]
    k = args.k if structure != "dense" else args.k * args.layers  # the same L0 per token
    torch.manual_seed(0)
    cc = Crosscoder(CrosscoderConfig(architecture="topk_crosscoder", layer_structure=structure,
                                     d_model=args.d_model, d_sae=args.layers * args.width, k=k,
                                     hook_names_in=hooks, hook_names_out=hooks)).train()
    opt = torch.optim.Adam(cc.parameters(), lr=1e-4)
    x = torch.randn(args.batch, args.layers, args.d_model)

    def step() -> None:
        loss = cc(x, x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return median_time(step, reps=args.reps, warmup=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d_model", type=int, default=512)
    p.add_argument("--width", type=int, default=4096, help="latents per layer group")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32, help="TopK per group (the dense model gets layers * k)")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    result = {"config": vars(args), "threads": torch.get_num_threads()}
    for structure in ("cross_layer", "dense"):
        result[structure] = step_time(structure, args)
    result["ratio_cross_layer_over_dense"] = result["cross_layer"]["median_s"] / result["dense"]["median_s"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
