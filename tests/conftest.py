"""Offline fixtures: a tiny random GPT-NeoX with a locally trained tokenizer, and a generated corpus."""

from __future__ import annotations

import json
import os
import tempfile

# before transformers / datasets are imported anywhere: never touch the network, keep caches in tmp
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="hf_datasets_cache_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import D_MODEL, N_LAYERS, make_documents, make_runner_config  # noqa: E402,F401
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    PreTrainedTokenizerFast,
)

torch.set_num_threads(min(2, torch.get_num_threads()))


def build_tokenizer(documents: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on `documents`; <|endoftext|> is BOS and EOS, as in pythia."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(documents, trainers.WordLevelTrainer(
        special_tokens=["<|endoftext|>", "<pad>", "<unk>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, documents) -> str:
    """A saved random GPTNeoXForCausalLM (d_model 64, 4 layers) + tokenizer: model_name=<this dir>."""
    path = tmp_path_factory.mktemp("tiny_gpt_neox")
    tokenizer = build_tokenizer(documents)
    config = GPTNeoXConfig(hidden_size=D_MODEL, num_hidden_layers=N_LAYERS, num_attention_heads=4,
                           intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=256,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_and_tokenizer(tiny_model_dir):
    """The tiny model loaded back (eval mode) with its tokenizer. Shared: do not modify it."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def text_dataset_path(tmp_path_factory, documents) -> str:
    """The generated corpus as a .jsonl file, one {"text": ...} document per line."""
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    return str(path)


@pytest.fixture
def runner_config(tiny_model_dir, text_dataset_path, tmp_path):
    """make_runner_config with its output in this test's tmp dir."""
    return make_runner_config(tiny_model_dir, text_dataset_path, output_path=str(tmp_path / "out"))
