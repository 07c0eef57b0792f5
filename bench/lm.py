"""A pythia-70m-shaped GPT-NeoX with random weights (d_model 512, 6 layers, 8 heads, intermediate 2048,
vocab 50304) and a word-level tokenizer built with `tokenizers`, saved to a directory, plus a generated
.jsonl corpus: the offline stand-ins used by the harvest and end-to-end benchmarks."""

import json
import random
from pathlib import Path

import torch

WORDS = ("the cat dog bird river teacher child queen farmer robot fox sees likes finds carries paints "
         "follows remembers builds hears opens red green old long quiet bright wooden warm blue tiny ball "
         "door bread road song map star box coat sea seed today morning rain night dinner day").split()


def documents(n: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400))) + "." for _ in range(n)]


def build(directory: str | Path, n_docs: int = 2000) -> tuple[str, str]:
    """Save the model and tokenizer to `directory`/model and the corpus to `directory`/corpus.jsonl."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    directory = Path(directory)
    docs = documents(n_docs)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(docs, trainers.WordLevelTrainer(special_tokens=["<|endoftext|>", "<pad>", "<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = GPTNeoXConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048,
                           vocab_size=50304, max_position_embeddings=2048, bos_token_id=0, eos_token_id=0,
                           pad_token_id=1)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(directory / "model")
    tokenizer.save_pretrained(directory / "model")
    corpus = directory / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(directory / "model"), str(corpus)
