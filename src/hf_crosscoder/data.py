"""Token pipeline: a `datasets` dataset -> documents -> one packed stream cut into `context_size` rows.

Documents are tokenized in batches (no special tokens added by the tokenizer) and, with
`prepend_bos`, each starts with the tokenizer's BOS token (fallback EOS, then CLS). The rows are
consecutive slices of that single stream: no token is lost or repeated, and a row may span documents.
Each process reads its own shard (`split_dataset_by_node`). When the shard is exhausted the stream
wraps around to a new epoch (with a warning), so `training_tokens` may exceed the corpus.

The position is `(epoch, doc_index, offset)`: where the next row starts. It is saved as plain ints
and restored exactly; resuming skips `doc_index` documents without tokenizing them.

Held-out evaluation (`train_and_eval_streams`): with `eval_dataset_path` the eval rows come from that
dataset (sharded the same way); otherwise the first `eval_holdout_sequences` rows of each process's shard
(default n_eval_batches * store_batch_size_prompts) are the eval split, and that process's training stream
starts at the first document after them and wraps back there at each epoch: no token of a held-out
document is ever trained on, streaming or not, on any number of processes (shards are disjoint).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from datasets.distributed import split_dataset_by_node
from torch import Tensor

logger = logging.getLogger(__name__)

SUFFIX_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv",
                   ".parquet": "parquet", ".arrow": "arrow"}
TEXT_COLUMNS = ("text", "content", "story", "document", "body", "article", "raw_content", "sentence",
                "passage")
TOKEN_COLUMNS = ("input_ids", "tokens")
DOCS_PER_TOKENIZER_CALL = 256


def _local_data_files(path: str) -> tuple[str, list[str]] | None:
    """(datasets builder, files) for a data file or a directory of them; None if there are none."""
    if os.path.isfile(path):
        builder = SUFFIX_BUILDERS.get(Path(path).suffix.lower())
        return (builder, [path]) if builder else None
    if not os.path.isdir(path):
        return None
    files = sorted(str(p) for p in Path(path).rglob("*") if p.suffix.lower() in SUFFIX_BUILDERS)
    builders = {SUFFIX_BUILDERS[Path(f).suffix.lower()] for f in files}
    if len(builders) > 1:
        raise ValueError(f"dataset_path {path} mixes file formats ({', '.join(sorted(builders))}); keep one "
                         "format per directory or point dataset_path at a single file.")
    return (builders.pop(), files) if files else None


def _is_saved_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json"))


def _is_empty_saved_dataset(path: str) -> bool:
    # datasets cannot load a save_to_disk dataset of 0 rows (it has no data files): detect it first
    state = os.path.join(path, "state.json")
    return os.path.isfile(state) and json.loads(Path(state).read_text()).get("_data_files") == []


def _no_tokens_error(name: str) -> ValueError:
    return ValueError(f"dataset {name} yielded no tokens on this process; check dataset_path / dataset_split "
                      "/ dataset_text_column (and that documents are not empty).")


def load_dataset_from_config(cfg: Any) -> Dataset | IterableDataset:
    """`cfg.dataset_path` as a dataset: a save_to_disk directory, local data file(s), or a Hub name."""
    path, split = os.path.expanduser(cfg.dataset_path), cfg.dataset_split
    if os.path.isdir(path) and _is_saved_dataset(path):
        if _is_empty_saved_dataset(path):
            raise _no_tokens_error(path)
        ds = load_from_disk(path)
        if isinstance(ds, DatasetDict):
            if split not in ds:
                raise ValueError(f"dataset {path} has no split {split!r}; set dataset_split to one of "
                                 f"{', '.join(ds)}.")
            ds = ds[split]
        if len(ds) == 0:
            raise _no_tokens_error(path)
        return ds.to_iterable_dataset() if cfg.streaming else ds
    local = _local_data_files(path)
    if local is not None:
        builder, files = local
        if all(os.path.getsize(f) == 0 for f in files):  # datasets' own errors on empty files are cryptic
            raise _no_tokens_error(path)
        return load_dataset(builder, data_files={split: files}, split=split, streaming=cfg.streaming)
    if os.path.exists(path):
        raise ValueError(f"dataset_path {path} is neither a save_to_disk directory nor a "
                         f"{'/'.join(SUFFIX_BUILDERS)} file or directory of such files.")
    if path.startswith(("/", "./", "../", "~")) or Path(path).suffix.lower() in SUFFIX_BUILDERS:
        raise FileNotFoundError(f"dataset_path {path} does not exist; give an existing local file or folder, "
                                "or a Hub dataset id such as roneneldan/TinyStories.")
    return load_dataset(path, name=cfg.dataset_name, split=split, streaming=cfg.streaming)


def _column_names(ds: Dataset | IterableDataset) -> list[str]:
    if ds.column_names is not None:
        return list(ds.column_names)
    first = next(iter(ds), None)  # streaming datasets without declared features
    return list(first) if first is not None else []


def text_column(ds: Dataset | IterableDataset, requested: str | None, tokenized: bool,
                name: str = "the dataset") -> str:
    """The column holding text (or token ids when `tokenized`); ValueError listing the columns."""
    columns = _column_names(ds)
    if requested is not None:
        if requested in columns:
            return requested
        raise ValueError(f"dataset {name} has no column {requested!r}; columns: {', '.join(columns)}. "
                         "Set dataset_text_column to one of them.")
    candidates = TOKEN_COLUMNS if tokenized else TEXT_COLUMNS
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        kind = "token" if tokenized else "text"
        raise ValueError(f"dataset {name} has no {kind} column (looked for {', '.join(candidates)}); "
                         f"columns: {', '.join(columns) or 'none'}. Set dataset_text_column"
                         + ("." if tokenized else ", or is_dataset_tokenized=True for token ids."))
    return found


def shard_for_process(ds: Dataset | IterableDataset, process_index: int,
                      num_processes: int) -> Dataset | IterableDataset:
    """This process's disjoint part of `ds` (data parallelism); the whole of it for one process."""
    if num_processes <= 1:
        return ds
    return split_dataset_by_node(ds, rank=process_index, world_size=num_processes)


def document_separator(tokenizer: Any) -> int:
    """The token that starts every document: BOS, else EOS, else CLS."""
    for attr in ("bos_token_id", "eos_token_id", "cls_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            return token_id
    raise ValueError(f"{type(tokenizer).__name__} has no BOS, EOS or CLS token to put between documents; "
                     "set prepend_bos=False.")


def special_token_ids(tokenizer: Any) -> list[int]:
    """BOS/EOS/PAD (and CLS/SEP) ids: positions left out of training and of the norm estimate."""
    attrs = ("bos_token_id", "eos_token_id", "pad_token_id", "cls_token_id", "sep_token_id")
    return sorted({i for i in (getattr(tokenizer, a, None) for a in attrs) if i is not None})


def special_token_mask(tokens: Tensor, tokenizer: Any) -> Tensor:
    """Bool mask, True where `tokens` holds a BOS/EOS/PAD (or CLS/SEP) id."""
    ids = torch.tensor(special_token_ids(tokenizer), dtype=tokens.dtype, device=tokens.device)
    return torch.isin(tokens, ids)


class TokenStream:
    """This process's endless (or `max_epochs`-long) stream of packed rows [n, context_size].

    `cfg` needs the data fields of `LanguageModelCrosscoderRunnerConfig` (dataset_path, dataset_name,
    dataset_split, streaming, dataset_text_column, is_dataset_tokenized, context_size, prepend_bos).
    Only this shard's documents `start_doc <= i < end_doc` are read (every epoch starts at `start_doc`):
    the held-out split's documents are outside the training stream's range.
    """

    def __init__(self, cfg: Any, tokenizer: Any, process_index: int | None = None,
                 num_processes: int | None = None, dataset: Dataset | IterableDataset | None = None,
                 max_epochs: int | None = None, start_doc: int = 0, end_doc: int | None = None) -> None:
        if process_index is None or num_processes is None:
            state = PartialState()
            process_index, num_processes = state.process_index, state.num_processes
        self.name = cfg.dataset_path
        self.context_size = cfg.context_size
        self.tokenizer = tokenizer
        self.tokenized = cfg.is_dataset_tokenized
        self.separator = document_separator(tokenizer) if cfg.prepend_bos else None
        ds = dataset if dataset is not None else load_dataset_from_config(cfg)
        self.column = text_column(ds, cfg.dataset_text_column, cfg.is_dataset_tokenized, self.name)
        self.dataset = shard_for_process(ds.select_columns([self.column]), process_index, num_processes)
        self.max_epochs, self.start_doc, self.end_doc = max_epochs, start_doc, end_doc
        self.epoch = self.offset = self.sequences_yielded = 0
        self.doc_index = start_doc
        self._rows: Iterator[list[int]] | None = None

    def _tokenize(self, values: list[Any]) -> list[list[int]]:
        if self.tokenized:
            docs = [list(v) if v is not None else [] for v in values]
        else:
            texts = [v if isinstance(v, str) else "" for v in values]
            # verbose=False: documents longer than model_max_length are fine, they are packed, not fed whole
            docs = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        sep = self.separator
        return [[sep, *d] if sep is not None and d and d[0] != sep else d for d in docs]

    def _columns_from(self, start: int) -> Iterator[list[Any]]:
        """This shard's column values in batches, from its document `start`. A streaming shard is not
        `.skip()`ped: after split_dataset_by_node, IterableDataset.skip counts the examples of the whole
        dataset when its shards do not divide among the processes, so a resumed process would land on
        another position (and other processes' documents). It reads past them instead."""
        if start and isinstance(self.dataset, Dataset):
            yield from (b[self.column] for b in self.dataset.skip(start).iter(DOCS_PER_TOKENIZER_CALL))
            return
        for batch in self.dataset.iter(DOCS_PER_TOKENIZER_CALL):
            values = batch[self.column]
            if start >= len(values):
                start -= len(values)
                continue
            yield values[start:]
            start = 0

    def _documents(self) -> Iterator[tuple[int, int, list[int], int]]:
        """(epoch, doc_index, tokens, first unconsumed token) of non-empty documents, from the position."""
        epoch, start, offset = self.epoch, self.doc_index, self.offset
        while self.max_epochs is None or epoch < self.max_epochs:
            index, found = start, False
            for values in self._columns_from(start):
                if self.end_doc is not None:
                    values = values[:max(0, self.end_doc - index)]
                    if not values:
                        break
                for tokens in self._tokenize(values):
                    if len(tokens) > offset:
                        found = True
                        yield epoch, index, tokens, offset
                    index, offset = index + 1, 0
            if not found and start == self.start_doc:
                if self.start_doc:
                    raise ValueError(f"dataset {self.name}: the held-out eval split takes all {self.start_doc} "
                                     "documents of this process's shard; lower eval_holdout_sequences or pass "
                                     "eval_dataset_path.")
                raise _no_tokens_error(self.name)
            epoch, start = epoch + 1, self.start_doc
            if self.max_epochs is None or epoch < self.max_epochs:
                logger.warning("dataset %s exhausted after %d sequences on this process; starting epoch %d "
                               "(tokens repeat).", self.name, self.sequences_yielded, epoch)

    def _generate_rows(self) -> Iterator[list[int]]:
        """Cut the document stream into rows, keeping `(epoch, doc_index, offset)` at the next row start."""
        ctx, pending, n_pending = self.context_size, deque(), 0
        docs, last = self._documents(), (self.epoch, self.doc_index - 1)
        while True:
            while n_pending < ctx:
                item = next(docs, None)
                if item is None:
                    return  # finite stream: a final partial row cannot be emitted
                pending.append(list(item))
                n_pending += len(item[2]) - item[3]
                last = item[:2]
            row: list[int] = []
            while len(row) < ctx:
                segment = pending[0]
                _, _, tokens, used = segment
                take = min(ctx - len(row), len(tokens) - used)
                row.extend(tokens[used:used + take])
                segment[3] = used + take
                if segment[3] == len(tokens):
                    pending.popleft()
            n_pending -= ctx
            self.epoch, self.doc_index, self.offset = (
                pending[0][0], pending[0][1], pending[0][3]) if pending else (last[0], last[1] + 1, 0)
            self.sequences_yielded += 1
            yield row

    def restricted(self, start_doc: int = 0, end_doc: int | None = None,
                   max_epochs: int | None = None) -> TokenStream:
        """A fresh stream over this one's (already opened and sharded) dataset, documents
        `start_doc <= i < end_doc` of the shard, from its start."""
        other = copy.copy(self)
        other.start_doc, other.end_doc, other.max_epochs = start_doc, end_doc, max_epochs
        other.epoch = other.offset = other.sequences_yielded = 0
        other.doc_index, other._rows = start_doc, None
        return other

    def next_batch(self, n: int) -> Tensor:
        """The next `n` rows, LongTensor [n, context_size] (fewer, or StopIteration, when a finite
        stream ends)."""
        if self._rows is None:
            self._rows = self._generate_rows()
        rows = []
        for row in self._rows:
            rows.append(row)
            if len(rows) == n:
                break
        if not rows:
            raise StopIteration
        return torch.tensor(rows, dtype=torch.long)

    def iter_batches(self, n: int) -> Iterator[Tensor]:
        """Batches of `n` rows until the stream ends (never, unless `max_epochs` is set)."""
        while True:
            try:
                yield self.next_batch(n)
            except StopIteration:
                return

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "doc_index": self.doc_index, "offset": self.offset,
                "sequences_yielded": self.sequences_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.doc_index = int(state["epoch"]), int(state["doc_index"])
        self.offset, self.sequences_yielded = int(state["offset"]), int(state["sequences_yielded"])
        self._rows = None  # regenerated lazily from the restored position


def eval_holdout_rows(cfg: Any) -> int:
    """Rows per process held out for evaluation: `eval_holdout_sequences`, by default what one evaluation
    reads (n_eval_batches * store_batch_size_prompts)."""
    n = getattr(cfg, "eval_holdout_sequences", None)
    return cfg.n_eval_batches * cfg.store_batch_size_prompts if n is None else n


def train_and_eval_streams(cfg: Any, tokenizer: Any, process_index: int, num_processes: int,
                           dataset: Dataset | IterableDataset | None = None) -> tuple[TokenStream, TokenStream | None]:
    """(training stream, eval stream) of this process (see the module docstring). The eval stream is None
    when nothing is held out (eval_holdout_sequences=0 without eval_dataset_path)."""
    eval_path = getattr(cfg, "eval_dataset_path", None)
    if eval_path:
        eval_cfg = copy.copy(cfg)  # the same data fields, another dataset (or split)
        eval_cfg.dataset_split = getattr(cfg, "eval_dataset_split", None) or cfg.dataset_split
        if eval_path != cfg.dataset_path:
            eval_cfg.dataset_path, eval_cfg.dataset_name = eval_path, None
        return (TokenStream(cfg, tokenizer, process_index, num_processes, dataset),
                TokenStream(eval_cfg, tokenizer, process_index, num_processes))
    n_rows = eval_holdout_rows(cfg)
    if n_rows == 0:
        return TokenStream(cfg, tokenizer, process_index, num_processes, dataset), None
    probe = TokenStream(cfg, tokenizer, process_index, num_processes, dataset, max_epochs=1)
    with contextlib.suppress(StopIteration):  # shorter than the held-out rows: the training stream says so
        probe.next_batch(n_rows)
    # the held-out rows end inside document doc_index (offset > 0) or just before it
    boundary = probe.doc_index + (1 if probe.offset else 0)
    return probe.restricted(start_doc=boundary), probe.restricted(end_doc=boundary)
