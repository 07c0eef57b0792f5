"""Sparse (TopK) decode vs dense decode of the same [batch, d_sae] activations with k nonzeros per row
(worker for bench/run.py; prints one JSON line). Sparse = hf_crosscoder's embedding_bag decode with its
sparse backward; dense = addmm of the dense activations, autograd backward."""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import emit, median_time, setup  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=4096)
p.add_argument("--d-sae", type=int, default=16384)
p.add_argument("--d-out", type=int, nargs="+", default=[512, 1536])
p.add_argument("--k", type=int, default=32)
p.add_argument("--reps", type=int, default=5)
args = p.parse_args()
setup()
from hf_crosscoder.kernels import Selection, SparseDecode, WholeLayout  # noqa: E402

B, S, k = args.batch, args.d_sae, args.k
lat = torch.rand(B, S).topk(k, dim=-1).indices.flatten()
tok = torch.arange(B).repeat_interleave(k)
offsets = torch.arange(0, B * k, k)


def passes(d_out: int) -> dict:
    W = torch.randn(S, d_out, requires_grad=True)
    vals = torch.rand(B * k, requires_grad=True)
    dense = torch.zeros(B, S).index_put_((tok, lat), vals.detach()).requires_grad_()
    g = torch.randn(B, d_out)

    def fwd_dense():
        with torch.no_grad():
            return dense @ W

    def fwd_sparse():
        with torch.no_grad():
            return torch.nn.functional.embedding_bag(lat, W, offsets, per_sample_weights=vals, mode="sum")

    def step_dense():
        W.grad = dense.grad = None
        (dense @ W).backward(g)

    def step_sparse():
        W.grad = vals.grad = None
        SparseDecode.apply(vals, W, WholeLayout, [Selection(tok, lat, offsets)], W.shape[1]).backward(g)

    return {"dense_forward": fwd_dense, "sparse_forward": fwd_sparse,
            "dense_forward_backward": step_dense, "sparse_forward_backward": step_sparse}


results = {d_out: {name: median_time(fn, args.reps)["median_s"] for name, fn in passes(d_out).items()}
           for d_out in args.d_out}
emit({"results": results})
