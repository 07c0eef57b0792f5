import json
import logging

import pytest
import torch
from datasets import Dataset, load_dataset
from helpers import make_runner_config

from hf_crosscoder.data import TokenStream, shard_for_process, special_token_mask

CTX = 32


@pytest.fixture
def tokenizer(tiny_model_and_tokenizer):
    return tiny_model_and_tokenizer[1]


@pytest.fixture
def cfg_for(tiny_model_dir):
    def make(path, **overrides):
        return make_runner_config(tiny_model_dir, path, **{"context_size": CTX, **overrides})
    return make


def _expected_stream(tokenizer, documents, bos=True):
    stream = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        if ids:
            stream += ([tokenizer.bos_token_id] if bos else []) + ids
    return stream


def _one_epoch(cfg, tokenizer):
    batches = list(TokenStream(cfg, tokenizer, max_epochs=1).iter_batches(7))
    assert all(len(b) == 7 for b in batches[:-1]) and 0 < len(batches[-1]) <= 7
    return torch.cat(batches)


@pytest.mark.parametrize("streaming", [True, False])
def test_packing_loses_and_repeats_no_token(cfg_for, tokenizer, text_dataset_path, documents, streaming):
    rows = _one_epoch(cfg_for(text_dataset_path, streaming=streaming), tokenizer)
    expected = _expected_stream(tokenizer, documents)
    assert rows.shape[1] == CTX and rows.dtype == torch.long
    flat = rows.flatten().tolist()
    assert flat == expected[:len(flat)]
    assert 0 <= len(expected) - len(flat) < CTX  # only the final partial row is dropped
    starts = [i for i, t in enumerate(flat) if t == tokenizer.bos_token_id]
    assert len(starts) > len(rows) / 2  # documents are shorter than rows: most rows span several
    assert starts[0] == 0


def test_without_bos_and_with_pre_tokenized_input(cfg_for, tokenizer, documents, tmp_path):
    ids = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in documents[:40]]
    Dataset.from_dict({"input_ids": ids, "meta": list(range(40))}).save_to_disk(tmp_path / "tok")
    no_bos = _one_epoch(cfg_for(str(tmp_path / "tok"), is_dataset_tokenized=True, prepend_bos=False), tokenizer)
    flat = no_bos.flatten().tolist()
    assert flat == [t for doc in ids for t in doc][:len(flat)]
    with_bos = _one_epoch(cfg_for(str(tmp_path / "tok"), is_dataset_tokenized=True), tokenizer)
    assert with_bos.flatten().tolist() == _expected_stream(tokenizer, documents[:40])[:with_bos.numel()]


def test_local_formats_read_the_same_documents(cfg_for, tokenizer, text_dataset_path, documents, tmp_path):
    (tmp_path / "corpus.txt").write_text("\n".join(documents[:50]) + "\n")
    (tmp_path / "dir").mkdir()
    for i in range(2):
        (tmp_path / "dir" / f"part{i}.jsonl").write_text(
            "".join(json.dumps({"story": d}) + "\n" for d in documents[25 * i:25 * (i + 1)]))
    load_dataset("json", data_files=text_dataset_path, split="train").select(range(50)).save_to_disk(
        tmp_path / "saved")
    expected = _one_epoch(cfg_for(text_dataset_path), tokenizer)
    for path in ("corpus.txt", "dir", "saved"):
        rows = _one_epoch(cfg_for(str(tmp_path / path)), tokenizer)
        assert torch.equal(rows, expected[:len(rows)]), path


@pytest.mark.parametrize("streaming", [True, False])
def test_shards_are_disjoint_and_cover_the_data(cfg_for, text_dataset_path, documents, streaming):
    from hf_crosscoder.data import load_dataset_from_config

    ds = load_dataset_from_config(cfg_for(text_dataset_path, streaming=streaming))
    parts = [[ex["text"] for ex in shard_for_process(ds, rank, 3)] for rank in range(3)]
    assert sorted(sum(parts, [])) == sorted(documents)
    assert all(len(p) > 0 for p in parts)
    assert len(set(parts[0]) & set(parts[1])) == 0


def test_token_streams_of_two_processes_differ(cfg_for, tokenizer, text_dataset_path):
    cfg = cfg_for(text_dataset_path)
    a = TokenStream(cfg, tokenizer, 0, 2).next_batch(4)
    b = TokenStream(cfg, tokenizer, 1, 2).next_batch(4)
    assert not torch.equal(a, b)


def test_epoch_wraps_around_and_resume_is_exact(cfg_for, tokenizer, documents, tmp_path, caplog):
    path = tmp_path / "small.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[:6]))
    cfg = cfg_for(str(path))
    per_epoch = len(_expected_stream(tokenizer, documents[:6]))
    stream = TokenStream(cfg, tokenizer, 0, 1)
    with caplog.at_level(logging.WARNING):
        full = torch.cat([stream.next_batch(3) for _ in range(8)])
    assert full.numel() > 2 * per_epoch and "starting epoch" in caplog.text
    assert full.flatten().tolist() == (_expected_stream(tokenizer, documents[:6]) * 10)[:full.numel()]
    for k in (1, 3, 5):  # positions inside and across epochs
        first = TokenStream(cfg, tokenizer, 0, 1)
        for _ in range(k):
            first.next_batch(3)
        state = json.loads(json.dumps(first.state_dict()))  # plain ints
        resumed = TokenStream(cfg, tokenizer, 0, 1)
        resumed.load_state_dict(state)
        rest = torch.cat([resumed.next_batch(3) for _ in range(8 - k)])
        assert torch.equal(rest, full[3 * k:])


def test_missing_text_column_lists_columns(cfg_for, tokenizer, tmp_path):
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"prose": "a b", "id": 1}) + "\n")
    with pytest.raises(ValueError, match="no text column.*columns: prose, id.*dataset_text_column"):
        TokenStream(cfg_for(str(path)), tokenizer, 0, 1)
    with pytest.raises(ValueError, match="no column 'body'; columns: prose, id"):
        TokenStream(cfg_for(str(path), dataset_text_column="body"), tokenizer, 0, 1)
    rows = TokenStream(cfg_for(str(path), dataset_text_column="prose", context_size=2), tokenizer, 0, 1)
    assert rows.next_batch(1).shape == (1, 2)


def test_empty_dataset_and_empty_documents_raise(cfg_for, tokenizer, tmp_path):
    Dataset.from_dict({"text": []}).save_to_disk(tmp_path / "empty")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": "  "}) + "\n")
    (tmp_path / "empty.jsonl").write_text("")
    for path in (tmp_path / "empty", tmp_path / "empty.jsonl"):
        with pytest.raises(ValueError, match="yielded no tokens.*dataset_text_column"):
            TokenStream(cfg_for(str(path)), tokenizer, 0, 1)
    stream = TokenStream(cfg_for(str(tmp_path / "blank.jsonl")), tokenizer, 0, 1)
    with pytest.raises(ValueError, match="yielded no tokens.*dataset_text_column"):
        stream.next_batch(1)


def test_special_token_mask(tokenizer):
    tokens = torch.tensor([[tokenizer.bos_token_id, 5, 6, tokenizer.pad_token_id, tokenizer.eos_token_id]])
    assert special_token_mask(tokens, tokenizer).tolist() == [[True, False, False, True, True]]


# ------------------------------------------------------------------ held-out eval split
def _unique_id_documents(n_docs=80, seed=0):
    """Token-id documents whose ids are unique to each document (1000 + 100 * doc + position)."""
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 13, (n_docs,), generator=rng).tolist()
    return [[1000 + 100 * i + t for t in range(n)] for i, n in enumerate(lengths)]


def _write_token_dataset(directory, documents, n_files):
    directory.mkdir()
    for f in range(n_files):  # several files: a streaming dataset of several shards
        rows = documents[f::n_files]
        (directory / f"part{f}.jsonl").write_text("".join(json.dumps({"input_ids": d}) + "\n" for d in rows))
    return str(directory)


def _ids(rows):
    return {t for row in rows for t in row.flatten().tolist()} - {0}  # 0: the document separator


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("num_processes", [1, 2])
@pytest.mark.parametrize("n_files", [1, 2])
def test_held_out_tokens_never_reach_the_training_stream(tiny_model_dir, tmp_path, streaming, num_processes,
                                                         n_files):
    from types import SimpleNamespace

    from hf_crosscoder.data import train_and_eval_streams

    documents = _unique_id_documents()
    path = _write_token_dataset(tmp_path / "tokens", documents, n_files)
    cfg = make_runner_config(tiny_model_dir, path, is_dataset_tokenized=True, context_size=8, streaming=streaming,
                             store_batch_size_prompts=2, n_eval_batches=3)  # 6 held-out rows per process
    separator = SimpleNamespace(bos_token_id=0)
    held_out, trained = set(), set()
    for p in range(num_processes):
        train, evals = train_and_eval_streams(cfg, separator, p, num_processes)
        eval_rows = [evals.next_batch(2) for _ in range(3)]
        assert sum(len(r) for r in eval_rows) == 6 and train.start_doc == evals.end_doc > 0
        held_out |= _ids(eval_rows)
        # two epochs: the second starts after the held-out documents again
        trained |= _ids(train.restricted(train.start_doc, max_epochs=2).iter_batches(5))
        again = train_and_eval_streams(cfg, separator, p, num_processes)[1]  # deterministic split
        assert all(torch.equal(a, again.next_batch(2)) for a in eval_rows)
    assert held_out and trained and not held_out & trained
    assert len(held_out) >= num_processes * (6 * 8 - 6 * 8 // 3)  # most of each row is real tokens
    every = {t for d in documents for t in d}
    # nothing but the held-out documents is lost (the last of them may be cut, its rest is not trained on)
    assert len(every - held_out - trained) < num_processes * 12 * (1 + 8 // 3)


def test_eval_dataset_path_is_a_separate_dataset(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from hf_crosscoder.data import train_and_eval_streams

    documents = _unique_id_documents()
    train_path = _write_token_dataset(tmp_path / "train", documents[:40], 1)
    eval_path = _write_token_dataset(tmp_path / "eval", documents[40:], 1)
    cfg = make_runner_config(tiny_model_dir, train_path, is_dataset_tokenized=True, context_size=8,
                             eval_dataset_path=eval_path)
    train, evals = train_and_eval_streams(cfg, SimpleNamespace(bos_token_id=0), 0, 1)
    assert train.start_doc == 0  # nothing held out of the training data
    assert _ids([evals.next_batch(4)]) <= {t for d in documents[40:] for t in d}
    assert _ids([train.next_batch(4)]) <= {t for d in documents[:40] for t in d}


def test_holdout_taking_the_whole_shard_names_the_fix(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from hf_crosscoder.data import train_and_eval_streams

    path = _write_token_dataset(tmp_path / "small", _unique_id_documents(6), 1)
    cfg = make_runner_config(tiny_model_dir, path, is_dataset_tokenized=True, context_size=8,
                             eval_holdout_sequences=100)
    train, _ = train_and_eval_streams(cfg, SimpleNamespace(bos_token_id=0), 0, 1)
    with pytest.raises(ValueError, match="eval_holdout_sequences"):
        train.next_batch(1)
