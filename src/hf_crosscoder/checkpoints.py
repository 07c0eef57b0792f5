"""Checkpoints: `checkpoints/step_N/` written to a temporary directory and renamed, so a kill mid-write
never leaves a broken latest checkpoint.

A checkpoint holds the crosscoder in training (normalized) space as config.json + model.safetensors
(loadable by `Crosscoder.from_pretrained`), `accelerate/` (accelerator.save_state: optimizer, scheduler,
RNG of every process), the trainer's counters (json + safetensors) and every process's activations-store
position. Nothing here unpickles model weights; accelerate's own files hold the optimizer and RNG states.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cli import no_progress_bars
from .trainer import CrosscoderTrainer

REQUIRED = ("config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors", "accelerate")
# what a resumed run must share with the checkpoint's crosscoder (the weights' shapes and meaning)
SAME_AS_CHECKPOINT = ("architecture", "d_model", "d_sae", "hook_names_in", "hook_names_out")
UNREADABLE = (OSError, ValueError, SafetensorError)


def checkpoint_steps(total_steps: int, n_checkpoints: int) -> tuple[int, ...]:
    """`n_checkpoints` steps spaced over training, plus the last step."""
    if n_checkpoints <= 0:
        return ()
    spaced = {total_steps * (i + 1) // (n_checkpoints + 1) for i in range(n_checkpoints)}
    return tuple(sorted(s for s in spaced | {total_steps} if s > 0))


def store_dir(checkpoint: Path, process_index: int) -> Path:
    return checkpoint / f"activations_store_{process_index}"


def save_checkpoint(root: str | os.PathLike, trainer: CrosscoderTrainer, store) -> Path:
    """Write `root/step_N` atomically (every process takes part: accelerate saves per-process state)."""
    acc, st = trainer.accelerator, trainer.state
    final = Path(root) / f"step_{st.step}"
    tmp = Path(root) / f".tmp_step_{st.step}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp / "accelerate"))
    store.save(store_dir(tmp, acc.process_index))
    state = acc.get_state_dict(trainer.model)  # collective: full tensors under FSDP / ZeRO-3 too
    acc.wait_for_everyone()  # every process's files are in tmp before the main process renames it
    if acc.is_main_process:
        with no_progress_bars():
            trainer.crosscoder.save_pretrained(tmp, state_dict=state)
        save_file(st.tensors(), tmp / "trainer_state.safetensors")
        meta = {**st.scalars(), "num_processes": acc.num_processes, "history": st.history}
        (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    acc.wait_for_everyone()
    return final


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `root` (temporary directories are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = [(int(p.name.split("_")[1]), p) for p in root.glob("step_*") if p.name.split("_")[1].isdigit()]
    return max(steps)[1] if steps else None


LATEST = ("latest", "true")
NO_RESUME = ("", "false", "none")


def resume_request(resume: str | bool | os.PathLike | None) -> str | None:
    """`resume_from_checkpoint` as transformers' Trainer reads it: None/False (or the strings 'false',
    'none', '') = start fresh, True (or 'true' / 'latest', any case) = "latest", anything else a path."""
    if resume is None or resume is False:
        return None
    if resume is True:
        return "latest"
    if not isinstance(resume, (str, os.PathLike)):
        raise ValueError(f"resume_from_checkpoint={resume!r} must be True/False, 'latest' or a checkpoint path.")
    text = os.fspath(resume)
    if text.strip().lower() in NO_RESUME:
        return None
    return "latest" if text.strip().lower() in LATEST else text


def resolve_checkpoint(resume: str | bool | os.PathLike | None, root: str | os.PathLike) -> Path | None:
    """Turn `resume_from_checkpoint` (True / 'latest' or a path, see `resume_request`) into a validated
    directory, before any work."""
    request = resume_request(resume)
    if request is None:
        return None
    path = latest_checkpoint(root) if request == "latest" else Path(request)
    if path is None:
        raise ValueError(f"resume_from_checkpoint={resume!r}: no checkpoint found in {root}; train without "
                         "resume_from_checkpoint or point it at a checkpoints/step_N directory.")
    missing = [name for name in REQUIRED if not (path / name).exists()]
    if missing:
        raise ValueError(f"Checkpoint {path} is missing or incomplete (no {', '.join(missing)}); point "
                         "resume_from_checkpoint at a complete checkpoints/step_N directory.")
    return path


def read_checkpoint_meta(path: Path, num_processes: int, cfg=None) -> dict:
    """The checkpoint's counters, refused (before the language model loads) if it was written by another
    number of processes, or, given the run's `cfg`, for a crosscoder of another shape or hooks."""
    try:
        meta = json.loads((path / "trainer_state.json").read_text())
        saved = json.loads((path / "config.json").read_text())
    except UNREADABLE as err:
        raise ValueError(f"Checkpoint {path} is corrupt ({err}); resume from another checkpoint.") from err
    if not any((path / "accelerate").iterdir()):
        raise ValueError(f"Checkpoint {path} has an empty accelerate/ folder (no optimizer state); resume "
                         "from another checkpoint.")
    if meta.get("num_processes") != num_processes:
        raise ValueError(f"Checkpoint {path} was written by {meta.get('num_processes')} processes but this run "
                         f"has {num_processes}; resume with --num_processes {meta.get('num_processes')} (the "
                         "optimizer and data-position state is per process).")
    differ = [] if cfg is None else [f"{k}={saved.get(k)!r} (this run: {getattr(cfg, k)!r})"
                                     for k in SAME_AS_CHECKPOINT if saved.get(k) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"Checkpoint {path} holds another crosscoder: {'; '.join(differ)}. Resume with the "
                         "checkpoint's values, or start a new run in another output_path.")
    return meta


def load_checkpoint(path: Path, trainer: CrosscoderTrainer, store, meta: dict | None = None) -> None:
    """Restore optimizer, scheduler, RNG, model, counters and the store position from `path` (`meta`: its
    `read_checkpoint_meta`, when the caller has already read it)."""
    acc, st = trainer.accelerator, trainer.state
    meta = meta if meta is not None else read_checkpoint_meta(path, acc.num_processes)
    try:
        tensors = load_file(path / "trainer_state.safetensors")  # cpu; copied onto the device below
    except UNREADABLE as err:
        raise ValueError(f"Checkpoint {path} is corrupt ({err}); resume from another checkpoint.") from err
    acc.load_state(str(path / "accelerate"))
    st.step, st.n_tokens, st.window_tokens = meta["step"], meta["n_tokens"], meta["window_tokens"]
    st.history = meta.get("history", [])
    with torch.no_grad():
        st.steps_since_fired.copy_(tensors["steps_since_fired"])
        st.fire_counts.copy_(tensors["fire_counts"])
    store.load(store_dir(path, acc.process_index))
