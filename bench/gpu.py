"""GPU benchmarks (one process; bench/gpu_suite.sh runs it after the CUDA tests):

    python bench/gpu.py [--out DIR] [--sections peak,archs,decode,e2e] [--budget-s 240] [--dry-run]

- peak: the device's bf16 and fp32 matmul rates (8192^3, random data, CUDA events), measured in this run;
- archs: CrosscoderTrainer.train_step of every registered architecture at d_in = d_out = 3 x 512
  (pythia-70m-shaped hooks), batch 4096 and 16384, d_sae 16384 and 131072, bf16 autocast and fp32: step
  time, tokens/s, FLOP/s of the 5 matmuls of a dense step over the measured peak, and peak GPU memory
  (torch.cuda.max_memory_allocated) against a formula;
- decode: TopK's sparse decode (embedding_bag, sparse backward) against the dense decode of the same
  activations, k 32;
- e2e: LanguageModelCrosscoderTrainingRunner on a random-init pythia-70m-shaped GPT-NeoX (no download) and
  a generated corpus, blocks.0-2 -> blocks.3-5 resid_post, d_sae 16384, bf16: steady-state tokens/s off
  training_log.jsonl, next to each stage alone (token stream on the CPU, LM harvest, train step).

Writes DIR/results_gpu.json (after every section, so a time-out keeps what was measured) and
DIR/BENCHMARKS_gpu.md, a section ready for BENCHMARKS.md. `--dry-run` runs the same code on CPU with tiny
shapes in seconds (what CI checks); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SECTIONS = ("peak", "archs", "e2e", "decode")  # in order of the goals they measure
GOALS = {"dense_bf16_peak_fraction": 0.5, "runner_tokens_per_s": 1e6, "topk_decode_speedup": 1.0}


@dataclasses.dataclass
class Shapes:
    d_model: int
    hooks: int
    batches: tuple[int, ...]
    d_saes: tuple[int, ...]
    k: int
    peak_n: int
    decode: tuple[tuple[int, int], ...]  # (batch, d_sae) at d_out = hooks * d_model
    lm: dict
    e2e: dict


REAL = Shapes(d_model=512, hooks=3, batches=(4096, 16384), d_saes=(16384, 131072), k=32, peak_n=8192,
              decode=((4096, 16384), (16384, 16384), (4096, 131072), (16384, 131072)),
              lm=dict(hidden=512, layers=6, heads=8, intermediate=2048, vocab=50304, n_docs=4000),
              e2e=dict(d_sae=16384, batch=16384, prompts=128, context=128, steps=80, warm=20, buffer=8))
DRY = Shapes(d_model=16, hooks=3, batches=(64, 128), d_saes=(256, 512), k=4, peak_n=256,
             decode=((64, 256), (128, 512)),
             lm=dict(hidden=16, layers=6, heads=2, intermediate=32, vocab=128, n_docs=60),
             e2e=dict(d_sae=256, batch=128, prompts=4, context=32, steps=8, warm=4, buffer=4))


# ---------------------------------------------------------------------------------------------- timing
class Clock:
    """Wall time of device work: CUDA events on a GPU (the host returns before the kernels finish),
    perf_counter on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, reps: int) -> list[float]:
        """Seconds of each of `reps` calls of fn."""
        if not self.cuda:
            out = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
            return out
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in events]

    def median(self, fn, warmup: int = 2, budget_s: float = 1.0, min_reps: int = 3, max_reps: int = 20) -> dict:
        """Median of as many calls as fit `budget_s` (between min_reps and max_reps) after `warmup` calls."""
        for _ in range(warmup):
            fn()
        self.sync()
        one = statistics.median(self.time(fn, 1))
        reps = int(min(max_reps, max(min_reps, budget_s / max(one, 1e-9))))
        times = self.time(fn, reps)
        return {"median_s": statistics.median(times), "min_s": min(times), "reps": reps}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_accelerate() -> None:
    """Accelerate keeps one process-wide state: a bf16 Accelerator after an fp32 one would be refused."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


# ---------------------------------------------------------------------------------------------- peak
def matmul_rate(n: int, dtype: torch.dtype, clock: Clock, device: torch.device) -> dict:
    """FLOP/s of an n^3 matmul on random operands (zeros run faster and would flatter the peak)."""
    g = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
    res = torch.empty(n, n, device=device, dtype=dtype)
    t = clock.median(lambda: torch.mm(x, y, out=res), warmup=3, budget_s=0.5, min_reps=10, max_reps=10)
    return {"n": n, **t, "flops": 2 * n**3 / t["median_s"]}


def run_peak(a, shapes: Shapes, clock: Clock, device: torch.device) -> dict:
    """The device's dense matmul rates, measured in this run: the ceilings the steps are compared with."""
    out = {name: matmul_rate(shapes.peak_n, dtype, clock, device)
           for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}
    out["fp32_matmul_allow_tf32"] = torch.backends.cuda.matmul.allow_tf32
    free_memory()
    return out


# ---------------------------------------------------------------------------------------------- archs
def dense_flops(batch: int, d_in: int, d_out: int, d_sae: int) -> float:
    """The 5 matmuls of a dense step: encoder forward, decoder forward, decoder weight grad, decoder input
    grad, encoder weight grad (the encoder input gradient is not needed: activations are data)."""
    return 2 * batch * d_sae * (2 * d_in + 3 * d_out)


# [batch, d_sae] tensors one step holds at its peak: ReLU f and dL/dh; JumpReLU h, f, dL/dh; TopK /
# BatchTopK the dense feature_acts output (fp32: values are gathered in fp32) and one 32 MiB scoring chunk
LIVE = {"crosscoder": 2, "skip_crosscoder": 2, "jumprelu_crosscoder": 3, "topk_crosscoder": 1,
        "batchtopk_crosscoder": 1}


def memory_formula(model, arch: str, batch: int, bf16: bool) -> tuple[float, str]:
    """Bytes: 16 P (fp32 weights, gradients, Adam's two moments) + bf16 copies of W_enc and W_dec under
    autocast (forward and backward casts: 2 x 2 bytes each) + the live [batch, d_sae] tensors (2 bytes each
    under autocast for the dense paths, 4 otherwise) + the input and target batch (fp32)."""
    c = model.config
    params = sum(p.numel() for p in model.parameters())
    weights = model.W_enc.numel() + model.W_dec.numel()
    live = LIVE.get(arch, 3)
    elem = 4 if (not bf16 or arch in ("topk_crosscoder", "batchtopk_crosscoder")) else 2
    casts = 4 * weights if bf16 else 0
    total = 16 * params + casts + live * elem * batch * c.d_sae + 4 * batch * (c.d_in + c.d_out)
    text = f"16 P{' + 4 W' if bf16 else ''} + {live} x {elem} B d_sae + 4 B (d_in + d_out)"
    return float(total), text


def make_trainer(shapes: Shapes, arch: str, d_sae: int, bf16: bool, device: torch.device):
    """A trainer on the device, its crosscoder built on the meta device and initialized in place (a
    400M-parameter CPU init would cost seconds per configuration)."""
    from accelerate import Accelerator

    from hf_crosscoder import Crosscoder, LanguageModelCrosscoderRunnerConfig
    from hf_crosscoder.trainer import CrosscoderTrainer

    reset_accelerate()
    h = shapes.hooks
    cfg = LanguageModelCrosscoderRunnerConfig(
        architecture=arch, d_model=shapes.d_model, d_sae=d_sae, k=shapes.k,
        hook_names_in=[f"blocks.{i}.hook_resid_post" for i in range(h)],
        hook_names_out=[f"blocks.{i + h}.hook_resid_post" for i in range(h)],
        train_batch_size_tokens=max(shapes.batches), training_tokens=max(shapes.batches) * 10**6,
        autocast=bf16, device=device.type)
    with torch.device("meta"):
        model = Crosscoder(cfg.crosscoder_config())
    model = model.to_empty(device=device)
    model.reset_parameters()
    acc = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no")
    return CrosscoderTrainer(cfg, model.train(), acc)


def time_batch(trainer, shapes: Shapes, batch: int, clock: Clock, device: torch.device, budget_s: float) -> dict:
    g = torch.Generator(device=device).manual_seed(batch)
    x, y = (torch.randn(batch, shapes.hooks, shapes.d_model, generator=g, device=device) for _ in range(2))
    trainer.train_step(x, y)  # Adam states exist from here on: the peak below is a steady step's
    if clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = clock.median(lambda: trainer.train_step(x, y), warmup=1, budget_s=budget_s)
    peak = torch.cuda.max_memory_allocated() if clock.cuda else None
    return {**t, "tokens_per_s": batch / t["median_s"], "peak_memory_bytes": peak}


def arch_config(a, shapes, arch, d_sae, bf16, clock, device, peak) -> list[dict]:
    """Both batch sizes of one (architecture, d_sae, precision) on one trainer."""
    trainer = make_trainer(shapes, arch, d_sae, bf16, device)
    d_in = d_out = shapes.hooks * shapes.d_model
    rows = []
    for batch in shapes.batches:
        r = time_batch(trainer, shapes, batch, clock, device, a.step_budget_s)
        formula, text = memory_formula(trainer.crosscoder, arch, batch, bf16)
        flops = dense_flops(batch, d_in, d_out, d_sae) / r["median_s"]
        rows.append({"architecture": arch, "d_sae": d_sae, "batch": batch, "precision": "bf16" if bf16 else "fp32",
                     **r, "flops": flops, "peak_fraction": flops / peak["bf16" if bf16 else "fp32"]["flops"],
                     "memory_formula_bytes": formula, "memory_formula": text,
                     "memory_ratio": r["peak_memory_bytes"] / formula if r["peak_memory_bytes"] else None})
    del trainer
    free_memory()
    return rows


def run_archs(a, shapes: Shapes, clock: Clock, device: torch.device, results: dict) -> dict:
    from hf_crosscoder import ARCHITECTURES

    peak = results["peak"]
    rows, skipped = [], []
    for d_sae in shapes.d_saes:
        for bf16 in (True, False):
            for arch in ARCHITECTURES:
                label = f"{arch} d_sae {d_sae} {'bf16' if bf16 else 'fp32'}"
                if a.out_of_time():
                    skipped.append(f"{label}: out of time")
                    continue
                try:
                    rows += arch_config(a, shapes, arch, d_sae, bf16, clock, device, peak)
                except Exception as err:  # one failing configuration must not lose the others
                    skipped.append(f"{label}: {type(err).__name__}: {str(err)[:300]}")
                    free_memory()
    return {"rows": rows, "skipped": skipped}


# ---------------------------------------------------------------------------------------------- decode
def _backward(out: torch.Tensor, grad: torch.Tensor, *leaves: torch.Tensor) -> None:
    """out.backward(grad) into fresh .grad tensors (accumulating into old ones would add a pass)."""
    for leaf in leaves:
        leaf.grad = None
    out.backward(grad)


def decode_passes(batch: int, d_sae: int, d_out: int, k: int, device: torch.device) -> dict:
    """Dense (a [batch, d_sae] activation matrix times W_dec, fp32 and bf16; autograd backward) and sparse
    (hf_crosscoder's embedding_bag decode and hand-written sparse backward, fp32) on the same k-sparse rows."""
    from hf_crosscoder.kernels import Selection, SparseDecode, WholeLayout

    g = torch.Generator(device=device).manual_seed(0)
    lat = torch.rand(batch, d_sae, generator=g, device=device).topk(k, dim=-1).indices.flatten()
    tok = torch.arange(batch, device=device).repeat_interleave(k)
    offsets = torch.arange(0, batch * k, k, device=device)
    W = torch.randn(d_sae, d_out, generator=g, device=device, requires_grad=True)
    vals = torch.rand(batch * k, generator=g, device=device, requires_grad=True)
    grad = torch.randn(batch, d_out, generator=g, device=device)
    dense = torch.zeros(batch, d_sae, device=device).index_put_((tok, lat), vals.detach())
    passes = {}
    for name, dtype in (("dense_fp32", torch.float32), ("dense_bf16", torch.bfloat16)):
        A, B = dense.to(dtype).requires_grad_(), W.detach().to(dtype).requires_grad_()
        passes[f"{name}_forward"] = lambda A=A, B=B: torch.mm(A.detach(), B.detach())
        passes[f"{name}_forward_backward"] = lambda A=A, B=B: _backward(torch.mm(A, B), grad.to(A.dtype), A, B)
    passes["sparse_forward"] = lambda: torch.nn.functional.embedding_bag(
        lat, W.detach(), offsets, per_sample_weights=vals.detach(), mode="sum")
    passes["sparse_forward_backward"] = lambda: _backward(SparseDecode.apply(vals, W, WholeLayout, [Selection(tok, lat, offsets)], d_out), grad,
                                                          vals, W)
    return passes


def run_decode(a, shapes: Shapes, clock: Clock, device: torch.device, results: dict) -> dict:
    d_out, rows, skipped = shapes.hooks * shapes.d_model, [], []
    for batch, d_sae in shapes.decode:
        if a.out_of_time():
            skipped.append(f"batch {batch} d_sae {d_sae}: out of time")
            continue
        try:
            times = {name: clock.median(fn, budget_s=0.3)["median_s"]
                     for name, fn in decode_passes(batch, d_sae, d_out, shapes.k, device).items()}
        except Exception as err:
            skipped.append(f"batch {batch} d_sae {d_sae}: {type(err).__name__}: {str(err)[:300]}")
            free_memory()
            continue
        free_memory()
        for kind in ("forward", "forward_backward"):
            best_dense = min(times[f"dense_fp32_{kind}"], times[f"dense_bf16_{kind}"])
            rows.append({"batch": batch, "d_sae": d_sae, "d_out": d_out, "k": shapes.k, "pass": kind,
                         "dense_fp32_s": times[f"dense_fp32_{kind}"], "dense_bf16_s": times[f"dense_bf16_{kind}"],
                         "sparse_s": times[f"sparse_{kind}"], "speedup_vs_best_dense": best_dense / times[f"sparse_{kind}"]})
    return {"rows": rows, "skipped": skipped}


# ---------------------------------------------------------------------------------------------- e2e
def build_lm(directory: Path, lm: dict) -> tuple[str, str]:
    """A random-init GPT-NeoX (pythia-70m's shape at full size: hidden 512, 6 layers, 8 heads, intermediate
    2048, vocab 50304, rotary_pct 0.25, 2048 positions), a word-level tokenizer trained on generated text,
    and that text as a .jsonl corpus."""
    import lm as bench_lm
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    docs = bench_lm.documents(lm["n_docs"])
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "<pad>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = GPTNeoXConfig(hidden_size=lm["hidden"], num_hidden_layers=lm["layers"], num_attention_heads=lm["heads"],
                           intermediate_size=lm["intermediate"], vocab_size=max(lm["vocab"], len(tokenizer)),
                           max_position_embeddings=2048, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    # rotary on 25% of each head (pythia's rotary_pct) is GPTNeoXConfig's default
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(directory / "model"), str(corpus)


def e2e_config(shapes: Shapes, model: str, corpus: str, out: Path, device: torch.device, steps: int):
    from hf_crosscoder import LanguageModelCrosscoderRunnerConfig

    e, d = shapes.e2e, shapes.lm["hidden"]
    return LanguageModelCrosscoderRunnerConfig(
        model_name=model, dataset_path=corpus, d_model=d, architecture="crosscoder", d_sae=e["d_sae"],
        hook_names_in=[f"blocks.{i}.hook_resid_post" for i in range(3)],
        hook_names_out=[f"blocks.{i}.hook_resid_post" for i in range(3, 6)],
        context_size=e["context"], store_batch_size_prompts=e["prompts"], train_batch_size_tokens=e["batch"],
        n_batches_in_buffer=e["buffer"], n_batches_for_norm_estimate=2, training_tokens=e["batch"] * steps,
        n_eval_batches=1, wandb_log_frequency=5 if steps > 10 else 2, eval_every_n_wandb_logs=10**6,
        autocast=device.type == "cuda", autocast_lm=device.type == "cuda", device=device.type,
        output_path=str(out), overwrite_output=True, log_to_wandb=False)


def stages_alone(cfg, clock: Clock, device: torch.device) -> dict:
    """tokens/s of the token stream (CPU: tokenize and pack), of the LM harvest on the device (what the
    store runs per chunk) and of the train step at the runner's shape."""
    from hf_crosscoder.data import TokenStream
    from hf_crosscoder.harvest import ActivationHarvester, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(cfg, device)
    stream = TokenStream(cfg, tokenizer, 0, 1)
    per_call = cfg.store_batch_size_prompts * cfg.context_size
    host = Clock(torch.device("cpu"))  # CPU work: CUDA events would see none of it
    t_stream = host.median(lambda: stream.next_batch(cfg.store_batch_size_prompts), warmup=1, budget_s=1.0)
    harvest = ActivationHarvester(model, tokenizer, [*cfg.hook_names_in, *cfg.hook_names_out], cfg)
    tokens = stream.next_batch(cfg.store_batch_size_prompts)
    t_harvest = clock.median(lambda: harvest(tokens, drop_special=cfg.exclude_special_tokens), budget_s=1.0)
    harvest = model = None  # the LM leaves the device before the runner loads its own copy
    free_memory()
    return {"stream_tokens_per_s": per_call / t_stream["median_s"],
            "harvest_tokens_per_s": per_call / t_harvest["median_s"], "tokens_per_harvest": per_call}


def train_alone(shapes: Shapes, clock: Clock, device: torch.device) -> float:
    e = shapes.e2e
    lm_shapes = dataclasses.replace(shapes, d_model=shapes.lm["hidden"], batches=(e["batch"],))
    trainer = make_trainer(lm_shapes, "crosscoder", e["d_sae"], device.type == "cuda", device)
    r = time_batch(trainer, lm_shapes, e["batch"], clock, device, budget_s=1.0)
    del trainer
    free_memory()
    return r["tokens_per_s"]


def run_e2e(a, shapes: Shapes, clock: Clock, device: torch.device, results: dict) -> dict:
    from hf_crosscoder.llm_crosscoder_training_runner import LanguageModelCrosscoderTrainingRunner

    e = shapes.e2e
    with tempfile.TemporaryDirectory(prefix="bench_gpu_e2e_") as tmp:
        model, corpus = build_lm(Path(tmp), shapes.lm)
        cfg = e2e_config(shapes, model, corpus, Path(tmp) / "out", device, e["steps"])
        alone = stages_alone(cfg, clock, device)
        alone["train_tokens_per_s"] = train_alone(shapes, clock, device)
        reset_accelerate()
        t0 = time.perf_counter()
        LanguageModelCrosscoderTrainingRunner(cfg).run()
        wall = time.perf_counter() - t0
        rows = {r["step"]: r["elapsed_s"] for r in map(json.loads, open(Path(tmp) / "out" / "training_log.jsonl"))}
    warm = max(s for s in rows if s <= e["warm"])
    span = rows[e["steps"]] - rows[warm]
    runner = (e["steps"] - warm) * e["batch"] / span
    h, t, s = alone["harvest_tokens_per_s"], alone["train_tokens_per_s"], alone["stream_tokens_per_s"]
    return {"config": {k: getattr(cfg, k) for k in ("d_model", "d_sae", "train_batch_size_tokens", "context_size",
                                                    "store_batch_size_prompts", "n_batches_in_buffer", "autocast",
                                                    "autocast_lm", "training_tokens")},
            "runner_tokens_per_s": runner, "steady_steps": [warm, e["steps"]], "wall_s": wall, **alone,
            "slower_stage_tokens_per_s": min(h, t, s), "serial_bound_tokens_per_s": 1 / (1 / h + 1 / t + 1 / s),
            "runner_over_slower_stage": runner / min(h, t, s)}


# ---------------------------------------------------------------------------------------------- report
def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def goals(results: dict) -> list[dict]:
    """The issue's goals on one H200, each measured (or None when its section did not run)."""
    arch_rows = results.get("archs", {}).get("rows", [])
    largest = max((r["d_sae"] for r in arch_rows), default=None)
    dense = [r["peak_fraction"] for r in arch_rows
             if r["architecture"] == "crosscoder" and r["precision"] == "bf16" and r["d_sae"] == largest]
    decode = [r["speedup_vs_best_dense"] for r in results.get("decode", {}).get("rows", [])]
    runner = results.get("e2e", {}).get("runner_tokens_per_s")
    out = []
    for name, value, what in (
            ("dense_bf16_peak_fraction", max(dense) if dense else None,
             "dense (crosscoder) bf16 step FLOP/s / measured bf16 matmul peak, largest d_sae, best batch"),
            ("runner_tokens_per_s", runner, "runner end to end, steady state, pythia-70m shape, d_sae 16384"),
            ("topk_decode_speedup", min(decode) if decode else None,
             "TopK sparse decode vs the faster dense decode (fp32/bf16), worst shape and pass")):
        met = None if value is None else value >= GOALS[name]
        out.append({"goal": name, "what": what, "target": GOALS[name], "value": value, "met": met})
    return out


def markdown(results: dict) -> str:
    m = results["meta"]
    parts = [f"## GPU: {m['device']}\n",
             f"`{m['command']}`; {m['date']}; torch {m['torch']} (CUDA {m['cuda']}), Python {m['python']}."
             + (" **Dry run on CPU with tiny shapes: these numbers measure nothing.**" if m["dry_run"] else ""),
             "\n### Goals\n", table(["goal", "measured", "target", "status"],
                                   [[g["what"], g["value"], f">= {g['target']:g}",
                                     {None: "not measured", True: "met", False: "NOT met"}[g["met"]]]
                                    for g in results["goals"]])]
    if "peak" in results:
        p = results["peak"]
        parts.append(f"\nMatmul peak ({p['bf16']['n']}^3, random data, median of 10 after 3 warm-ups): "
                     f"bf16 {p['bf16']['flops'] / 1e12:.3g} TFLOP/s, fp32 {p['fp32']['flops'] / 1e12:.3g} TFLOP/s "
                     f"(allow_tf32={p['fp32_matmul_allow_tf32']}).")
    parts += [_archs_md(results), _decode_md(results), _e2e_md(results)]
    return "\n".join(p for p in parts if p) + "\n"


def _archs_md(results: dict) -> str:
    if "archs" not in results:
        return ""
    rows = [[r["architecture"], r["d_sae"], r["batch"], r["precision"], r["median_s"] * 1e3, r["tokens_per_s"],
             r["flops"] / 1e12, r["peak_fraction"],
             None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / 2**30, r["memory_ratio"]]
            for r in results["archs"]["rows"]]
    skipped = "".join(f"\n- skipped: {s}" for s in results["archs"]["skipped"])
    shape = results["meta"]["shapes"]
    return (f"\n### Training step (CrosscoderTrainer.train_step), d_in = d_out = {shape['hooks']} x {shape['d_model']}\n\n"
            "FLOP/s counts the 5 matmuls of a dense step, 2 B d_sae (2 d_in + 3 d_out) (for TopK an effective "
            "rate); the fraction is of the measured peak of the step's precision. Memory: "
            "torch.cuda.max_memory_allocated over steady steps / the formula in bench/gpu.py (16 P + bf16 weight "
            "copies + live [B, d_sae] tensors + the batch).\n\n"
            + table(["architecture", "d_sae", "batch", "precision", "step ms", "tokens/s", "TFLOP/s",
                     "/ peak", "peak GiB", "peak / formula"], rows) + skipped)


def _decode_md(results: dict) -> str:
    if "decode" not in results:
        return ""
    rows = [[r["batch"], r["d_sae"], r["d_out"], r["pass"], r["dense_fp32_s"] * 1e3, r["dense_bf16_s"] * 1e3,
             r["sparse_s"] * 1e3, r["speedup_vs_best_dense"]] for r in results["decode"]["rows"]]
    return ("\n### TopK decode: sparse (embedding_bag + sparse backward, fp32) vs dense, k 32\n\n"
            + table(["batch", "d_sae", "d_out", "pass", "dense fp32 ms", "dense bf16 ms", "sparse ms",
                     "speed-up vs faster dense"], rows)
            + "".join(f"\n- skipped: {s}" for s in results["decode"]["skipped"]))


def _e2e_md(results: dict) -> str:
    r = results.get("e2e")
    if not r:
        return ""
    c = r["config"]
    first, last = r["steady_steps"]
    rows = [[f"runner .run(), steady state (steps {first}-{last})", r["runner_tokens_per_s"]],
            ["token stream alone (CPU: tokenize + pack)", r["stream_tokens_per_s"]],
            ["LM harvest alone (device)", r["harvest_tokens_per_s"]],
            ["train_step alone (device)", r["train_tokens_per_s"]],
            ["the three one after the other, 1 / (1/s + 1/h + 1/t)", r["serial_bound_tokens_per_s"]]]
    return (f"\n### End to end: the runner on a random-init pythia-70m-shaped GPT-NeoX, blocks.0-2 -> 3-5, "
            f"d_sae {c['d_sae']}, batch {c['train_batch_size_tokens']}, {c['store_batch_size_prompts']} x "
            f"{c['context_size']} tokens per harvest, bf16 autocast (crosscoder and LM): {c['autocast']}\n\n"
            + table(["what", "tokens/s"], rows)
            + f"\n\nrunner / slower stage: {r['runner_over_slower_stage']:.2f}; whole run {r['wall_s']:.0f} s "
              "(model load, norm estimate, final eval, save and plots included).")


# ---------------------------------------------------------------------------------------------- main
def meta(a, device: torch.device) -> dict:
    cuda = device.type == "cuda"
    return {"command": "python " + " ".join(["bench/gpu.py", *sys.argv[1:]]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "dry_run": a.dry_run,
            "device": torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if cuda else None}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "out"), help="folder for results_gpu.json and BENCHMARKS_gpu.md")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the code, measures nothing")
    p.add_argument("--budget-s", type=float, default=240.0, help="sections and configurations that would start "
                   "after this many seconds are skipped (and listed)")
    p.add_argument("--step-budget-s", type=float, default=None, help="seconds of timed steps per configuration")
    a = p.parse_args()
    a.step_budget_s = a.step_budget_s or (0.05 if a.dry_run else 1.0)
    return a


def main() -> None:
    a = parse_args()
    started = time.perf_counter()
    a.out_of_time = lambda: time.perf_counter() - started > a.budget_s
    device = torch.device("cpu" if a.dry_run or not torch.cuda.is_available() else "cuda")
    if not a.dry_run and device.type != "cuda":
        sys.exit("bench/gpu.py needs a CUDA device (use --dry-run to check the code on CPU)")
    shapes, clock = (DRY if a.dry_run else REAL), Clock(device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"meta": {**meta(a, device), "shapes": dataclasses.asdict(shapes)}, "failed": {}}
    for name in a.sections.split(","):
        if name != "peak" and a.out_of_time():
            results["failed"][name] = "out of time"
            continue
        t0 = time.perf_counter()
        try:
            results[name] = (run_peak(a, shapes, clock, device) if name == "peak"
                             else globals()[f"run_{name}"](a, shapes, clock, device, results))
        except Exception as err:  # a failing section must not lose the others' numbers
            results["failed"][name] = f"{type(err).__name__}: {str(err)[-1500:]}"
        print(f"[bench/gpu.py] {name}: {time.perf_counter() - t0:.1f} s"
              + (f" FAILED {results['failed'][name]}" if name in results["failed"] else ""), flush=True)
        write(results, out)
    print(markdown(results))


def write(results: dict, out: Path) -> None:
    results["goals"] = goals(results)
    (out / "results_gpu.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "BENCHMARKS_gpu.md").write_text(markdown(results))


if __name__ == "__main__":
    main()
