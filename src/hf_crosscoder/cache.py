"""Activation cache: harvest once, train many dictionaries from disk without the language model.

Layout of `new_cached_activations_path`:

- `shard_{process:05d}_{index:05d}.safetensors`: one tensor per hook, named by the hook (for a model diff,
  `model_names`, one per model and hook, named `model/hook`: every model read on the same tokens), [tokens,
  d_model] in raw scale and the config's dtype, plus `is_special` [tokens] (bool: BOS/EOS/PAD
  positions; absent rows if the cache was written with exclude_special_tokens). Rows are in stream
  order (packed sequences, row-major). Each shard is written under a temporary name and renamed, so a
  file with the final name is always complete.
- `metadata.json`, written last (by the main process): model (and model_names), hooks, d_model, context size, dtype,
  token count, per-hook mean norm over non-special positions (the normalization statistic), and the
  list of shards with their token counts. A directory without it is an incomplete cache.

A reader refuses a cache of another model set: a diff's cache for a single-model run and the reverse, and
a diff of models the cache does not hold (a subset of its models reads fine: every model saw the same tokens).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import HarvestArgs, arg, check_positive, hook_union, stored_layers, torch_dtype
from .data import TokenStream
from .harvest import ActivationHarvester, load_model_and_tokenizer, mean_norm_stats
from .multimodel import MultiModelHarvester, models_for

logger = logging.getLogger(__name__)

METADATA = "metadata.json"
CACHE_FORMAT_VERSION = 1


@dataclass
class CacheActivationsRunnerConfig(HarvestArgs):
    """What `CacheActivationsRunner` harvests: the training runner's model, data and harvesting fields
    (`HarvestArgs`: same names, defaults and flags) plus where and how the cache is written."""

    new_cached_activations_path: str | None = arg(None, "Directory to write the cache to (must be new or "
                                                  "empty); it holds the union of hook_names_in and "
                                                  "hook_names_out, each hook once. Train from it with "
                                                  "--cached_activations_path.")
    shard_size_tokens: int = arg(16_384, "Tokens per shard file; memory while writing is about "
                                 "shard_size_tokens * n_hooks * d_model * bytes per value.")

    def __post_init__(self) -> None:
        if not self.new_cached_activations_path:
            raise ValueError("new_cached_activations_path is required: the directory to write the cache to.")
        super().__post_init__()
        check_positive(self, ("shard_size_tokens",))

    @property
    def hook_names(self) -> list[str]:
        return hook_union(self.hook_names_in, self.hook_names_out)

    @property
    def layer_names(self) -> list[str]:
        """The tensors of each shard: the hooks, or with model_names every model's hooks as `model/hook`."""
        return stored_layers(self)


def _check_output_dir(path: Path) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ValueError(f"new_cached_activations_path {path} already exists and is not an empty directory; "
                         "choose a new path or delete it (an interrupted cache cannot be resumed).")


class _ShardWriter:
    """Fills preallocated per-hook tensors and writes each full shard atomically (temp name + rename)."""

    def __init__(self, root: Path, process_index: int, cfg: CacheActivationsRunnerConfig) -> None:
        self.root, self.process_index, self.size = root, process_index, cfg.shard_size_tokens
        self.hook_names, dtype = cfg.layer_names, torch_dtype(cfg.dtype)
        self.buffers = [torch.empty(self.size, cfg.d_model, dtype=dtype) for _ in self.hook_names]
        self.special = torch.empty(self.size, dtype=torch.bool)
        self.n, self.shards = 0, []  # rows in the open shard; (file, tokens) of the written ones

    def add(self, acts: Tensor, special: Tensor) -> None:
        """Append rows [m, n_hooks, d_model] with their special-token flags [m]."""
        acts, special = acts.cpu(), special.cpu()
        while len(acts):
            take = min(len(acts), self.size - self.n)
            for h, buffer in enumerate(self.buffers):
                buffer[self.n:self.n + take] = acts[:take, h]
            self.special[self.n:self.n + take] = special[:take]
            self.n, acts, special = self.n + take, acts[take:], special[take:]
            if self.n == self.size:
                self.flush()

    def flush(self) -> None:
        if self.n == 0:
            return
        name = f"shard_{self.process_index:05d}_{len(self.shards):05d}.safetensors"
        tensors = {hook: buffer[:self.n].contiguous() for hook, buffer in zip(self.hook_names, self.buffers)}
        tensors["is_special"] = self.special[:self.n].contiguous()
        tmp = self.root / f".{name}.tmp"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.root / name)
        self.shards.append({"file": name, "tokens": self.n})
        self.n = 0

    @property
    def n_written(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self.n


def _share(total: int, process_index: int, num_processes: int) -> int:
    return total * (process_index + 1) // num_processes - total * process_index // num_processes


class CacheActivationsRunner:
    """Harvests `training_tokens` activation rows of the union of hooks into a sharded cache.

    Under data parallelism each process harvests its own dataset shard and writes its own files; the
    main process writes metadata.json once all are done."""

    def __init__(self, cfg: CacheActivationsRunnerConfig, model: nn.Module | None = None,
                 tokenizer: Any = None) -> None:
        self.cfg, self.model, self.tokenizer = cfg, model, tokenizer

    def _open_tokens(self, tokenizer: Any) -> TokenStream:
        state = PartialState()
        self._tokens = TokenStream(self.cfg, tokenizer, state.process_index, state.num_processes)
        return self._tokens

    def run(self) -> Path:
        """Write the cache; returns its directory."""
        cfg, state = self.cfg, PartialState()
        root = Path(cfg.new_cached_activations_path)
        _check_output_dir(root)  # on every process, so none waits for one that failed
        self._tokens = None
        harvester, tokenizer = self._harvester(cfg.device or state.device)
        tokens = self._tokens or self._open_tokens(tokenizer)
        if state.is_main_process:  # only once the model, hooks and data passed their checks
            root.mkdir(parents=True, exist_ok=True)
        state.wait_for_everyone()
        writer = _ShardWriter(root, state.process_index, cfg)
        target = _share(cfg.training_tokens, state.process_index, state.num_processes)
        sums = torch.zeros(len(cfg.layer_names), dtype=torch.float64, device=harvester.device)
        count = torch.zeros((), dtype=torch.float64, device=harvester.device)
        while writer.n_written < target:
            acts, special = harvester(tokens.next_batch(cfg.store_batch_size_prompts))
            chunk_sums, chunk_count = mean_norm_stats(acts, special)
            sums, count = sums + chunk_sums, count + chunk_count
            if cfg.exclude_special_tokens:
                acts, special = acts[~special], special[~special]
            need = target - writer.n_written
            writer.add(acts[:need], special[:need])
        writer.flush()
        self._write_metadata(root, writer.shards, reduce(sums, "sum"), reduce(count, "sum"), state)
        return root

    def _harvester(self, device: Any) -> tuple[Any, Any]:
        """(the harvester of the model, or of every model of model_names on the same tokens, the tokenizer);
        the models load unless given, the dataset opened (and checked) before their weights."""
        cfg, model, tokenizer = self.cfg, self.model, self.tokenizer
        if not cfg.model_names:
            if model is None:
                model, tokenizer = load_model_and_tokenizer(cfg, device, before_weights=self._open_tokens)
            return ActivationHarvester(model, tokenizer, cfg.hook_names, cfg), tokenizer
        models, tokenizer = models_for(cfg, model, tokenizer, device, self._open_tokens)
        return MultiModelHarvester.for_models(models, tokenizer, cfg.hook_names, cfg, device), tokenizer

    def _write_metadata(self, root: Path, shards: list[dict], sums: Tensor, count: Tensor,
                        state: PartialState) -> None:
        all_shards = gather_object(shards)
        if state.is_main_process:
            cfg = self.cfg
            means = (sums / count.clamp(min=1)).tolist()
            meta = {"format_version": CACHE_FORMAT_VERSION, "model_name": cfg.model_name,
                    "model_names": cfg.model_names, "hook_names": cfg.layer_names, "d_model": cfg.d_model,
                    "context_size": cfg.context_size, "n_tokens": sum(s["tokens"] for s in all_shards),
                    "dtype": cfg.dtype, "mean_norms": dict(zip(cfg.layer_names, means)), "shards": all_shards,
                    "config": asdict(cfg)}
            tmp = root / f".{METADATA}.tmp"
            tmp.write_text(json.dumps(meta, indent=1))
            os.replace(tmp, root / METADATA)
        state.wait_for_everyone()


def read_cache_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """metadata.json of a complete cache; ValueError if there is none."""
    file = Path(path) / METADATA
    if not file.is_file():
        raise ValueError(f"{path} is not a complete activation cache (no {METADATA}; an interrupted "
                         "CacheActivationsRunner leaves none). Write one with CacheActivationsRunner.")
    meta = json.loads(file.read_text())
    if meta.get("format_version", 0) > CACHE_FORMAT_VERSION:
        raise ValueError(f"activation cache {path} has format version {meta['format_version']}; this "
                         f"hf_crosscoder reads up to {CACHE_FORMAT_VERSION}. Upgrade hf_crosscoder.")
    return meta


def _check_models(meta: dict[str, Any], path: str | os.PathLike, model_names: list[str] | None) -> None:
    """A cache serves a run of the same model set: one model, or (model diffing) models it holds."""
    cached = meta.get("model_names")
    if model_names is None and cached is None:
        return
    if model_names is None or cached is None or not set(model_names) <= set(cached):
        holds = f"the models {cached}" if cached else f"one model ({meta['model_name']})"
        runs = f"diffs {list(model_names)}" if model_names else "reads one model (no model_names)"
        raise ValueError(f"activation cache {path} holds {holds}, but this run {runs}; write a cache with "
                         "CacheActivationsRunner for the same model_names (or none), or train without the cache.")


def _check_metadata(meta: dict[str, Any], path: str | os.PathLike, hook_names: list[str], d_model: int) -> None:
    missing = [h for h in hook_names if h not in meta["hook_names"]]
    if missing or meta["d_model"] != d_model:
        raise ValueError(f"activation cache {path} holds hooks {meta['hook_names']} with d_model="
                         f"{meta['d_model']}, but this run needs {hook_names} with d_model={d_model}; "
                         "write a cache with these hooks (CacheActivationsRunner) or fix hook_names_in/"
                         "hook_names_out / d_model.")


class CachedActivationsReader:
    """This process's rows of a cache, in order, `chunk_rows` at a time, wrapping around at the end.

    Each process reads a contiguous 1/num_processes slice of every shard. Reads are lazy slices of the
    memory-mapped safetensors files (a shard is never loaded whole). Position: (epoch, shard, row)."""

    def __init__(self, path: str | os.PathLike, hook_names: list[str], d_model: int, process_index: int,
                 num_processes: int, chunk_rows: int, exclude_special: bool,
                 model_names: list[str] | None = None) -> None:
        meta = read_cache_metadata(path)
        _check_models(meta, path, model_names)
        _check_metadata(meta, path, hook_names, d_model)
        # what the rows were harvested from: a crosscoder trained on them records this, not the run's defaults
        self.provenance = {"model_name": meta["model_name"], "context_size": meta["context_size"],
                           "dataset_path": meta.get("config", {}).get("dataset_path")}
        self.root, self.hook_names = Path(path), list(hook_names)
        self.chunk_rows, self.exclude_special = chunk_rows, exclude_special
        self.shards = []
        for shard in meta["shards"]:
            n = shard["tokens"]
            lo, hi = n * process_index // num_processes, n * (process_index + 1) // num_processes
            self.shards.append((self.root / shard["file"], lo, hi))
        absent = [str(p) for p, _, _ in self.shards if not p.is_file()]
        if absent or not any(hi > lo for _, lo, hi in self.shards):
            raise ValueError(f"activation cache {path} is missing shard files {absent[:3]} or holds no rows "
                             f"for process {process_index}; rewrite it with CacheActivationsRunner.")
        self._mean_norms = torch.tensor([meta["mean_norms"][h] for h in self.hook_names], dtype=torch.float64)
        self.epoch = self.shard = self.row = 0
        self._open: tuple[int, Any] | None = None

    def _file(self, index: int) -> Any:
        if self._open is None or self._open[0] != index:
            self._open = (index, safe_open(str(self.shards[index][0]), framework="pt"))
        return self._open[1]

    def mean_norms(self) -> Tensor:
        """Per-hook mean activation norm over non-special positions, from the cache's metadata."""
        return self._mean_norms

    def next_chunk(self) -> tuple[Tensor, Tensor]:
        """(the next rows [m, n_hooks, d_model] float32 raw, their special-token flags [m]); special
        positions dropped if asked."""
        while True:
            if self.shard == len(self.shards):
                self.epoch, self.shard, self.row = self.epoch + 1, 0, 0
                logger.warning("activation cache %s exhausted; starting epoch %d (rows repeat).",
                               self.root, self.epoch)
            _, lo, hi = self.shards[self.shard]
            start = lo + self.row
            end = min(start + self.chunk_rows, hi)
            if start >= hi:
                self.shard, self.row = self.shard + 1, 0
                continue
            f = self._file(self.shard)
            rows = torch.stack([f.get_slice(h)[start:end] for h in self.hook_names], dim=1).float()
            self.row += end - start
            special = f.get_slice("is_special")[start:end]
            if self.exclude_special:
                rows, special = rows[~special], special[~special]
            if len(rows):
                return rows, special

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "row": self.row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.shard, self.row = int(state["epoch"]), int(state["shard"]), int(state["row"])
