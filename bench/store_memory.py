"""Peak memory of the ActivationsStore against its documented bound (issue #8 target: ratio <= 1.3).

pythia-70m-shaped random GPT-NeoX (d_model 512, 6 layers), 3 -> 3 resid_post hooks, buffer of 8 x 4096
tokens, harvests of 32 x 128 tokens, on CPU. The bound is the one in activations.py's docstring:

    buffer + max(chunk + LM forward transient, 2 * chunk, chunk + batch) + token stream + LM warm-up
    buffer = n_batches_in_buffer * B * n_hooks * d_model * 4,  B = train_batch_size_tokens
    chunk  = store_batch_size_prompts * context_size * n_hooks * d_model * 4
    batch  = B * (n_in + n_out) * d_model * 4

"chunk + LM forward transient" is measured on its own: the peak of a bare truncated forward
(capture_activations, stop_early) on one harvest batch in a fresh process, after a one-row warm-up
forward (its one-time cost is "LM warm-up"); it includes the hooked outputs (the chunk). The token
stream (dataset reader, tokenizer state) is the store's RSS growth on construction, before any
harvest. "before" is the RSS once the LM is built, so its weights are not counted.
Linux only (/proc/self/status). Run: python bench/store_memory.py; with MALLOC_MMAP_THRESHOLD_=131072
glibc returns freed tensors at once, which shows the peak without heap retention.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch
from conftest import build_tokenizer
from helpers import make_documents
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_crosscoder import ActivationsStore, LanguageModelCrosscoderRunnerConfig
from hf_crosscoder.hooks import capture_activations

MiB = 2**20
HOOKS_IN = [f"blocks.{i}.hook_resid_post" for i in range(3)]
HOOKS_OUT = [f"blocks.{i}.hook_resid_post" for i in range(3, 6)]
HARVEST = dict(store_batch_size_prompts=32, context_size=128)


def status(key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset_peak) in bytes."""
    line = next(line for line in open("/proc/self/status") if line.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset VmHWM to the current RSS
        f.write("5")


def build_model(vocab_size: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
        intermediate_size=2048, vocab_size=vocab_size, max_position_embeddings=256)).eval()


def lm_forward_peak() -> None:
    """(child process) Peak RSS growth of one bare truncated forward on a harvest batch, in bytes, after
    a one-row forward that pays the one-time costs (thread pools, lazy imports; reported apart)."""
    model = build_model(int(sys.argv[2]))
    tokens = torch.randint(int(sys.argv[2]), (HARVEST["store_batch_size_prompts"], HARVEST["context_size"]))
    start = status("VmRSS")
    capture_activations(model, HOOKS_IN + HOOKS_OUT, tokens[:1], stop_early=True)
    reset_peak()
    before = status("VmRSS")
    acts = capture_activations(model, HOOKS_IN + HOOKS_OUT, tokens, stop_early=True)
    print(json.dumps({"peak": status("VmHWM") - before, "outputs": sum(a.nbytes for a in acts.values()),
                      "warmup": before - start}))


def main() -> None:
    docs = make_documents(3000)
    tok = build_tokenizer(docs)
    # the child's glibc hands freed tensors straight back, so its peak is the forward's tensor bytes,
    # not what this allocator happens to retain
    child = subprocess.run([sys.executable, __file__, "--lm-forward", str(len(tok))], check=True,
                           capture_output=True, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"})
    lm = json.loads(child.stdout.strip().splitlines()[-1])
    d = tempfile.mkdtemp()
    path = os.path.join(d, "t.jsonl")
    Path(path).write_text("\n".join(json.dumps({"text": t}) for t in docs))
    model = build_model(len(tok))
    cfg = LanguageModelCrosscoderRunnerConfig(model_name=d, dataset_path=path, d_model=512,
        hook_names_in=HOOKS_IN, hook_names_out=HOOKS_OUT, n_batches_in_buffer=8, train_batch_size_tokens=4096,
        device="cpu", **HARVEST)
    n_hooks, row = len(HOOKS_IN + HOOKS_OUT), cfg.d_model * 4
    buffer = cfg.n_batches_in_buffer * cfg.train_batch_size_tokens * n_hooks * row
    chunk = cfg.store_batch_size_prompts * cfg.context_size * n_hooks * row
    batch = cfg.train_batch_size_tokens * n_hooks * row  # n_in + n_out = n_hooks here

    before = status("VmRSS")  # the LM is built: its weights are in here, not in what is measured
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # == before: no earlier spike
    weights = sum(p.nbytes for p in model.parameters())
    store = ActivationsStore(cfg, model, tok, device="cpu")
    reader = status("VmRSS") - before  # token stream: dataset reader, tokenizer state
    reset_peak()
    store.next_batch()  # the norm estimate and the first fill of the whole buffer
    first = status("VmHWM") - before
    reset_peak()
    for _ in range(11):  # 5 refills of half the buffer
        store.next_batch()
    steady, end = status("VmHWM") - before, status("VmRSS") - before
    peak = max(first, steady)

    # documented bound (activations.py) + the fixed costs measured on their own
    harvest = max(lm["peak"], chunk)  # chunk + the LM forward's own transient
    working_set = max(harvest, 2 * chunk, chunk + batch)
    formula = buffer + working_set + reader + lm["warmup"]
    mib = {"before (RSS, LM built)": before, "max RSS before": max_before, "LM weights (in before)": weights,
           "buffer": buffer, "chunk": chunk, "batch": batch,
           "LM forward peak = chunk + LM transient (bare, fresh process)": lm["peak"],
           "  of which hooked outputs": lm["outputs"], "  of which LM transient": lm["peak"] - lm["outputs"],
           "working set = max(LM forward peak, 2 chunk, chunk + batch)": working_set,
           "token stream (store construction)": reader, "LM one-time warm-up (first forward)": lm["warmup"],
           "formula = buffer + working set + token stream + warm-up": formula,
           "peak over before, first fill": first, "peak over before, refills": steady,
           "RSS over before at the end": end, "peak over before": peak}
    print(json.dumps({**{k: round(v / MiB, 1) for k, v in mib.items()}, "ratio": round(peak / formula, 3)},
                     indent=1))


if __name__ == "__main__":
    lm_forward_peak() if sys.argv[1:2] == ["--lm-forward"] else main()
