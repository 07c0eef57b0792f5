"""Model diffing on CPU, offline: two tiny random GPT-NeoX models where the second ("chat") is the first
("base") with one layer's MLP weights changed; one crosscoder over both, then the diffing analysis.

    python scripts/diffing_example.py [WORKDIR]      # about a minute on 2 CPU cores

Everything is generated locally (word-level tokenizer, corpus, models): nothing is downloaded.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from hf_crosscoder import LanguageModelCrosscoderRunnerConfig, LanguageModelCrosscoderTrainingRunner
from hf_crosscoder.diffing import classify_latents, decoder_cosines, relative_norms

WORDS = ("the cat dog bird fox river tree house road song map star box coat sea seed sees likes finds carries "
         "paints follows builds hears opens red green old long quiet bright wooden warm blue tiny today night").split()
CHANGED_LAYER = 1  # chat = base with a low-rank change to this layer's MLP output weights
RANK = 8  # new directions the "fine-tune" writes


def corpus(path: Path, n_docs: int = 400) -> None:
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 80))) for _ in range(n_docs)]
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<unk>")


def models_pair(root: Path) -> tuple[str, str]:
    tok = tokenizer()
    config = GPTNeoXConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                           vocab_size=len(tok), max_position_embeddings=128, bos_token_id=tok.bos_token_id,
                           eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    base = GPTNeoXForCausalLM(config)
    base.save_pretrained(root / "base")
    with torch.no_grad():  # the "fine-tune": RANK new output directions of some MLP neurons in one layer
        mlp = base.gpt_neox.layers[CHANGED_LAYER].mlp.dense_4h_to_h  # weight [d_model, d_mlp]
        new = torch.randn(mlp.weight.shape[0], RANK) @ torch.randn(RANK, mlp.weight.shape[1]).relu()
        mlp.weight.add_(new * 2 * mlp.weight.norm() / new.norm())
    base.save_pretrained(root / "chat")
    for name in ("base", "chat"):
        tok.save_pretrained(root / name)
    return str(root / "base"), str(root / "chat")


def main(workdir: str | None = None) -> dict:
    root = Path(workdir or tempfile.mkdtemp(prefix="diffing_example_"))
    root.mkdir(parents=True, exist_ok=True)
    base, chat = models_pair(root)
    corpus(root / "corpus.jsonl")
    hooks = [f"blocks.{CHANGED_LAYER}.hook_resid_post"]  # right after the changed MLP
    cfg = LanguageModelCrosscoderRunnerConfig(
        model_names=[base, chat], d_model=64, hook_names_in=hooks, hook_names_out=hooks, d_sae=512,
        architecture="crosscoder", l1_coefficient=1.0, dataset_path=str(root / "corpus.jsonl"), context_size=64,
        store_batch_size_prompts=16, train_batch_size_tokens=512, training_tokens=512 * 300, lr=1e-3,
        l1_warmup_steps=30, n_eval_batches=4, device="cpu", output_path=str(root / "out"), overwrite_output=True)
    crosscoder = LanguageModelCrosscoderTrainingRunner(cfg).run()
    classes = classify_latents(crosscoder)
    shared = classes.labels == 2
    summary = {"counts": classes.counts, "relative_norm_mean": relative_norms(crosscoder).mean().item(),
               "shared_decoder_cosine_median": decoder_cosines(crosscoder)[shared].median().item(),
               "output": str(root / "out")}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
