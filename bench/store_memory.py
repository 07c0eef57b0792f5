"""Peak RSS of the ActivationsStore (pythia-70m-shaped random GPT-NeoX, 3 -> 3 hooks, buffer of 8 x 4096
tokens) against buffer + one harvest chunk. Run: python bench/store_memory.py (needs tests/ on the path)."""
import json
import os
import resource
import sys
import tempfile

sys.path.insert(0, "/work/main/tests")
import torch
from conftest import build_tokenizer
from helpers import make_documents
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from hf_crosscoder import ActivationsStore, LanguageModelCrosscoderRunnerConfig

docs = make_documents(3000)
tok = build_tokenizer(docs)
d = tempfile.mkdtemp()
path = os.path.join(d, "t.jsonl")
open(path, "w").write("\n".join(json.dumps({"text": t}) for t in docs))
torch.manual_seed(0)
model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8,
    intermediate_size=2048, vocab_size=len(tok), max_position_embeddings=256)).eval()
cfg = LanguageModelCrosscoderRunnerConfig(model_name=d, dataset_path=path, d_model=512,
    hook_names_in=[f"blocks.{i}.hook_resid_post" for i in range(3)],
    hook_names_out=[f"blocks.{i}.hook_resid_post" for i in range(3, 6)],
    n_batches_in_buffer=8, train_batch_size_tokens=4096, store_batch_size_prompts=32, context_size=128, device="cpu")
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
before = rss()
store = ActivationsStore(cfg, model, tok, device="cpu")
for _ in range(12):
    store.next_batch()
peak = rss()
buffer = 8 * 4096 * 6 * 512 * 4
harvest_chunk = 32 * 128 * 6 * 512 * 4  # one store_batch of captured activations
print(json.dumps({"peak_over_before_MiB": (peak - before) / 2**20, "buffer_MiB": buffer / 2**20,
      "formula_MiB": (buffer + harvest_chunk) / 2**20, "ratio": (peak - before) / (buffer + harvest_chunk)}))
