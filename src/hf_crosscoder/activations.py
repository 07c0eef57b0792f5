"""The activations store: raw activation rows from a source, normalized and shuffled into batches.

`ActivationsStore` turns the rows of an activation source into training batches `(acts_in, acts_out)`.
The source is injected (`source=`): `harvest.LMActivationSource` (the frozen model on the token stream),
`cache.CachedActivationsReader` (an activation cache, no model loaded), or any object with the same
methods (`hook_names`, `next_chunk() -> (rows, special)`, `mean_norms()`, `state_dict()`,
`load_state_dict()`); without one, `activation_source(cfg)` picks the one the config names.

1. rows: the source yields [m, n_hooks, d_model] float32 raw activations of every hook used as input
   and/or output, each once (the LM source: `store_batch_size_prompts` rows per forward, stopping after
   the last hooked layer, special-token positions dropped when `exclude_special_tokens`).
2. buffer: one preallocated float32 tensor [n_batches_in_buffer * B, n_hooks, d_model] of *raw*
   activations, filled in place. Each cycle refills the slots served last cycle, draws a permutation
   of all slots (torch.Generator seeded with seed + process index) and serves the first half of it,
   so, as in SAELens, every batch mixes fresh rows with rows kept from earlier cycles (many documents).
   Memory: the buffer, n_batches_in_buffer * B * n_hooks * d_model * 4 bytes (B = per-process batch),
   plus a working set freed between steps. With chunk = store_batch_size_prompts * context_size *
   n_hooks * d_model * 4 bytes (one harvest as float32; at most one lives at a time, a carry being the
   unwritten rest of one) and batch = B * (n_in + n_out) * d_model * 4 bytes (a served pair), the
   working set is at most the largest of
   - chunk + the LM forward's own transient on one harvest (its hooked outputs are the chunk),
   - 2 * chunk: the hooked outputs while they are copied, hook by hook, into the float32 chunk,
   - chunk + batch: a carry and the pair being served;
   pairs the caller still holds come on top.
   Rows go from the chunk straight into their slots (index_copy_), pairs are gathered from the buffer
   directly, and neither the NaN/inf check nor the norm statistics copy a chunk.
3. normalization: served rows are multiplied by one scalar per hook, s_h = sqrt(d_model) / mean ||a_h||,
   estimated from the first `n_batches_for_norm_estimate` harvest chunks (the ones that fill the
   buffer first, so no harvest is wasted unless the estimate asks for more chunks than the buffer
   holds), leaving special-token positions out, mean-reduced across processes.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import reduce
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .cache import CachedActivationsReader
from .config import hook_union, layer_labels, stored_layers
from .harvest import LMActivationSource, mean_norm_stats
from .multimodel import MultiModelActivationSource

logger = logging.getLogger(__name__)

STATE_TENSORS = "activations_store.safetensors"
STATE_JSON = "activations_store.json"


def per_process_batch_size(train_batch_size_tokens: int, num_processes: int) -> int:
    if train_batch_size_tokens % num_processes:
        raise ValueError(f"train_batch_size_tokens={train_batch_size_tokens} is not divisible by the "
                         f"{num_processes} processes; use a multiple of {num_processes}.")
    return train_batch_size_tokens // num_processes


# Below this many sequences in the buffer, batches mix too few documents (bench/fidelity.py: MiniLM 3 -> 3 layers,
# TopK, 250k tokens: held-out FVU 0.289 with 80 sequences against 0.271 with 640, +6%)
MIN_BUFFER_SEQUENCES = 100
# The default buffer holds what SAELens's does (n_batches_in_buffer 20 harvests of store_batch_size_prompts
# sequences), and at least 20 training batches
DEFAULT_BUFFER_HARVESTS = 20


def buffer_batches(cfg: Any, batch_size: int) -> int:
    """Training batches the shuffle buffer holds: `n_batches_in_buffer`, or by default as many as hold
    20 harvests (20 x store_batch_size_prompts x context_size tokens), at least 20 (and an even number, so
    that half the buffer is whole batches)."""
    if cfg.n_batches_in_buffer is not None:
        return cfg.n_batches_in_buffer
    harvest_rows = DEFAULT_BUFFER_HARVESTS * cfg.store_batch_size_prompts * cfg.context_size
    n = max(DEFAULT_BUFFER_HARVESTS, math.ceil(harvest_rows / batch_size))
    return n + n % 2


def _warn_if_buffer_mixes_poorly(buffer_rows: int, context_size: int) -> None:
    sequences = buffer_rows / context_size
    if sequences < MIN_BUFFER_SEQUENCES:
        logger.warning("the shuffle buffer holds %d rows, %.0f sequences of %d tokens: batches then mix few "
                       "documents, which costs reconstruction quality (measured: held-out FVU +6%% at 80 sequences "
                       "against 640; BENCHMARKS.md, fidelity). Raise "
                       "n_batches_in_buffer (or leave it unset) to hold at least %d sequences.", buffer_rows,
                       sequences, context_size, MIN_BUFFER_SEQUENCES)


def activation_source(cfg: Any, hook_names: list[str], model: nn.Module | None = None, tokenizer: Any = None,
                      device: str | torch.device | None = None) -> Any:
    """The source a config asks for: an activation cache (`cached_activations_path`, no model loaded; one
    written for the same `model_names` when diffing), else the language model (loaded from `model_name` unless
    given), or several on the same tokens (`model_names`: model diffing; `model` may then be a list of models)."""
    if cfg.cached_activations_path:
        state = PartialState()
        return CachedActivationsReader(cfg.cached_activations_path, hook_names, cfg.d_model, state.process_index,
                                       state.num_processes, cfg.store_batch_size_prompts * cfg.context_size,
                                       cfg.exclude_special_tokens, getattr(cfg, "model_names", None))
    if getattr(cfg, "model_names", None):
        return MultiModelActivationSource(cfg, hook_union(cfg.hook_names_in, cfg.hook_names_out), model,
                                          tokenizer, device)
    return LMActivationSource(cfg, hook_names, model, tokenizer, device)


class ActivationsStore:
    """Endless normalized, shuffled `(acts_in [B, n_in, d_model], acts_out [B, n_out, d_model])` batches.

    `B = train_batch_size_tokens // num_processes`. `model`/`tokenizer` default to
    `load_model_and_tokenizer(cfg, device)`; with `cfg.cached_activations_path` no model is loaded
    (`model` and `tokenizer` are None, and the token-based methods used by CE evals raise).
    The first normalization estimate is a collective call under data parallelism: every process must
    make it (the first `next_batch()` does). See the module docstring for the buffer and its memory.
    """

    def __init__(self, cfg: Any, model: nn.Module | None = None, tokenizer: Any = None,
                 device: str | torch.device | None = None, source: Any = None) -> None:
        state = PartialState()
        self.cfg, self.process_index, self.num_processes = cfg, state.process_index, state.num_processes
        self.batch_size = per_process_batch_size(cfg.train_batch_size_tokens, self.num_processes)
        self.device = torch.device(device or cfg.device or state.device)
        # the layers: hooks, or (model, hook) pairs `model/hook` model-major (model diffing)
        self.hook_names_in, self.hook_names_out = layer_labels(cfg, "in"), layer_labels(cfg, "out")
        self.hook_names = stored_layers(cfg)  # each stored once
        self.source = source if source is not None else activation_source(cfg, self.hook_names, model, tokenizer,
                                                                          self.device)
        if list(self.source.hook_names) != self.hook_names:
            raise ValueError(f"the activation source yields hooks {list(self.source.hook_names)}, but the store "
                             f"needs {self.hook_names} (hook_names_in then hook_names_out, each once).")
        self._in_index = torch.tensor([self.hook_names.index(h) for h in self.hook_names_in], device=self.device)
        self._out_index = torch.tensor([self.hook_names.index(h) for h in self.hook_names_out], device=self.device)
        self.n_batches_in_buffer = buffer_batches(cfg, self.batch_size)
        self.buffer_rows = self.n_batches_in_buffer * self.batch_size
        _warn_if_buffer_mixes_poorly(self.buffer_rows, cfg.context_size)
        self._generator = torch.Generator().manual_seed(cfg.seed + self.process_index)
        self._scale: Tensor | None = None
        self._stats: list[Any] | None = None  # [norm sums, row count, chunks seen] while estimating
        self._buffer: Tensor | None = None
        self._free: Tensor | None = None   # slots to (re)fill, filled in order up to _n_filled
        self._n_filled = 0
        self._order: Tensor | None = None  # slots served this cycle, served up to _served
        self._served = 0
        self._carry: Tensor | None = None  # harvested rows that did not fit the last fill
        self.harvest_seconds, self.harvested_rows = 0.0, 0  # this process's harvest cost (progress bar)

    @property
    def model(self) -> nn.Module | None:
        """The frozen language model when the source has one (None for an activation cache)."""
        return getattr(self.source, "model", None)

    @property
    def tokenizer(self) -> Any:
        return getattr(self.source, "tokenizer", None)

    # --- harvesting ---

    def _next_chunk(self) -> Tensor:
        """The next raw training rows [m, n_hooks, d_model] on the store's device."""
        t0 = time.perf_counter()
        acts, special = self.source.next_chunk()
        self.harvest_seconds += time.perf_counter() - t0
        self.harvested_rows += len(acts)
        if self._stats is not None and self._stats[2] < self.cfg.n_batches_for_norm_estimate:
            sums, count = mean_norm_stats(acts, special)
            self._stats = [self._stats[0] + sums, self._stats[1] + count, self._stats[2] + 1]
        return acts.to(self.device)

    def _fill(self) -> None:
        """Write the carry, then fresh chunks, into the free slots until none is left."""
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_rows, len(self.hook_names), self.cfg.d_model,
                                       dtype=torch.float32, device=self.device)
            self._free, self._n_filled = torch.arange(self.buffer_rows, device=self.device), 0
        while self._n_filled < len(self._free):
            # no local keeps a written chunk alive while the next one is harvested
            self._carry = self._put(self._carry if self._carry is not None else self._next_chunk())

    def _put(self, rows: Tensor) -> Tensor | None:
        """Write the leading rows into the next free slots; returns the rows that did not fit, if any."""
        take = min(len(rows), len(self._free) - self._n_filled)
        self._buffer.index_copy_(0, self._free[self._n_filled:self._n_filled + take], rows[:take])
        self._n_filled += take
        # a view, not a copy: the chunk lives on until its last rows are written (at most one chunk lives)
        return rows[take:] if take < len(rows) else None

    # --- normalization ---

    def estimate_norm_scaling(self) -> Tensor:
        """Per-hook scales [n_hooks] (raw -> normalized), estimated once (ones for 'none')."""
        if self._scale is not None:
            return self._scale
        d_model, n_hooks = self.cfg.d_model, len(self.hook_names)
        if self.cfg.normalize_activations == "none":
            scale = torch.ones(n_hooks, dtype=torch.float64)
        elif (known := self.source.mean_norms()) is not None:  # an activation cache's statistics
            scale = math.sqrt(d_model) / known
        else:
            scale = math.sqrt(d_model) / self._estimate_mean_norms()
        self._scale = scale.to(self.device, torch.float32)
        return self._scale

    def _estimate_mean_norms(self) -> Tensor:
        zeros = torch.zeros(len(self.hook_names), dtype=torch.float64, device=self.device)
        self._stats = [zeros, torch.zeros((), dtype=torch.float64, device=self.device), 0]
        self._fill()  # the first chunks are the estimate's and fill the buffer
        while self._stats[2] < self.cfg.n_batches_for_norm_estimate:
            self._next_chunk()  # only when the estimate wants more chunks than the buffer holds
        sums, count, _ = self._stats
        self._stats = None
        if count.item() == 0:
            raise ValueError("no non-special token positions to estimate the activation norms from; check "
                             "the dataset or set normalize_activations='none'.")
        means = reduce(sums / count, reduction="mean")
        zero = [h for h, m in zip(self.hook_names, means.tolist()) if not m > 0]
        if zero:
            raise ValueError(f"hook(s) {zero} have zero mean activation norm; cannot normalize them. Pick "
                             "other hooks or set normalize_activations='none'.")
        return means

    @property
    def provenance(self) -> dict[str, Any]:
        """Where the rows come from, when that is not the run's config: an activation cache's model,
        dataset and context size (for the trained crosscoder's config.json and model card)."""
        return dict(getattr(self.source, "provenance", {}))

    def mean_out(self) -> Tensor:
        """[n_out, d_model]: the mean normalized activation of each output hook over the buffer's rows (filled
        first if needed), averaged over the processes: b_dec's data init."""
        scale = self.estimate_norm_scaling()  # (fills the buffer unless the scales are known)
        self._fill()
        rows = self._buffer[:self._n_filled or self.buffer_rows][:, self._out_index]
        mean = rows.double().mean(0) * scale[self._out_index, None].double()
        return reduce(mean, reduction="mean").float()

    @property
    def scale_in(self) -> Tensor:
        return self.estimate_norm_scaling()[self._in_index]

    @property
    def scale_out(self) -> Tensor:
        return self.estimate_norm_scaling()[self._out_index]

    # --- serving ---

    def next_batch(self) -> tuple[Tensor, Tensor]:
        """(acts_in [B, n_in, d_model], acts_out [B, n_out, d_model]), normalized float32."""
        scale = self.estimate_norm_scaling()
        if self._order is None or self._served >= len(self._order):
            if self._order is not None:
                self._free, self._n_filled = self._order.sort().values, 0  # refill what was served
            self._fill()
            half = (self.n_batches_in_buffer // 2) * self.batch_size
            self._order = torch.randperm(self.buffer_rows, generator=self._generator)[:half].to(self.device)
            self._served = 0
        index = self._order[self._served:self._served + self.batch_size, None]
        self._served += self.batch_size
        # gather each side straight from the buffer (no [B, n_hooks, d] copy to split); the gathers are
        # copies, so they are scaled in place
        acts_in = self._buffer[index, self._in_index].mul_(scale[self._in_index, None])
        return acts_in, self._buffer[index, self._out_index].mul_(scale[self._out_index, None])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            yield self.next_batch()

    # --- token-level access for evals ---

    @property
    def serves_tokens(self) -> bool:
        """Whether the source reads a token stream (the LM or several models), so evals can run on fresh
        tokens; an activation cache does not."""
        return hasattr(self.source, "next_tokens")

    def _require_model(self, what: str) -> None:
        if not self.serves_tokens:
            raise ValueError(f"{what} needs the language model, but this store reads an activation cache "
                             "(cached_activations_path); run evals that need tokens without the cache.")

    def next_tokens(self) -> Tensor:
        """The next `store_batch_size_prompts` packed rows [n, context_size] on the model's device
        (consumed from the training stream)."""
        self._require_model("next_tokens()")
        return self.source.next_tokens()

    def reset_eval_tokens(self) -> None:
        """Start the eval split over: every evaluation reads the same held-out rows."""
        reset = getattr(self.source, "reset_eval_tokens", None)
        if reset is not None:
            reset()

    def next_eval_tokens(self) -> Tensor:
        """The next `store_batch_size_prompts` rows of the eval split (held out from training: data.py,
        train_and_eval_streams), or of the training stream when nothing is held out."""
        self._require_model("next_eval_tokens()")
        eval_tokens = getattr(self.source, "next_eval_tokens", None)
        return eval_tokens() if eval_tokens is not None else self.source.next_tokens()

    def activations_from_tokens(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(acts_in [b*s, n_in, d], acts_out [b*s, n_out, d], keep [b*s] bool), normalized, on the
        store's device; `keep` marks the positions training uses (special tokens excluded if asked)."""
        self._require_model("activations_from_tokens()")
        scale = self.estimate_norm_scaling()
        acts, special = self.source.harvester(tokens)
        acts = acts.to(self.device)
        keep = ~special if self.cfg.exclude_special_tokens else torch.ones_like(special)
        return (acts[:, self._in_index].mul_(scale[self._in_index, None]),
                acts[:, self._out_index].mul_(scale[self._out_index, None]), keep.to(self.device))

    # --- exact resume ---

    def state_dict(self) -> dict[str, Any]:
        """Everything that determines the rest of the stream: tensors (the buffer's raw rows, slot
        indices, RNG, scales; the buffer is n_batches_in_buffer * B * n_hooks * d_model * 4 bytes) and
        plain ints/lists (positions). `save()` writes it as safetensors + json."""
        carry = None if self._carry is None else self._carry.clone()  # a view into a chunk: only its rows
        tensors = {"buffer": self._buffer, "free": self._free, "order": self._order, "carry": carry,
                   "scale": self._scale, "generator": self._generator.get_state()}
        state: dict[str, Any] = {k: v.detach().cpu() for k, v in tensors.items() if v is not None}
        state.update(n_filled=self._n_filled, served=self._served, source=self.source.state_dict(),
                     hook_names=self.hook_names, batch_size=self.batch_size, buffer_rows=self.buffer_rows)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = (list(state["hook_names"]), state["batch_size"], state["buffer_rows"])
        if saved != (self.hook_names, self.batch_size, self.buffer_rows):
            raise ValueError(f"activations-store state was saved with hooks {saved[0]}, per-process batch "
                             f"{saved[1]} and buffer {saved[2]} rows; this run has {self.hook_names}, "
                             f"{self.batch_size}, {self.buffer_rows}. Resume with the same hook names, "
                             "train_batch_size_tokens, n_batches_in_buffer and number of processes.")

        def tensor(name: str) -> Tensor | None:
            return state[name].to(self.device) if name in state else None

        self._buffer, self._free, self._order = tensor("buffer"), tensor("free"), tensor("order")
        self._carry, self._scale = tensor("carry"), tensor("scale")
        self._generator.set_state(state["generator"].cpu())
        self._n_filled, self._served = int(state["n_filled"]), int(state["served"])
        self.source.load_state_dict(state["source"])

    def save(self, directory: str | Path) -> None:
        """Write `state_dict()` to `directory` as activations_store.safetensors + .json (no pickle)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {k: v.contiguous() for k, v in state.items() if isinstance(v, Tensor)}
        save_file(tensors, str(directory / STATE_TENSORS))
        rest = {k: v for k, v in state.items() if not isinstance(v, Tensor)}
        (directory / STATE_JSON).write_text(json.dumps(rest))

    def load(self, directory: str | Path) -> None:
        """Restore what `save(directory)` wrote: the stream continues exactly where it was."""
        directory = Path(directory)
        try:
            state = {**json.loads((directory / STATE_JSON).read_text()),
                     **load_file(str(directory / STATE_TENSORS))}
        except (OSError, ValueError, SafetensorError) as err:
            raise ValueError(f"cannot read the activations-store state in {directory} ({err}); resume from a "
                             "complete checkpoint.") from err
        self.load_state_dict(state)
