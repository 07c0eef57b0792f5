"""checkpoints.py on its own: spacing, finding the latest complete checkpoint, and refusing bad ones
before any work (the save/resume round trips run end to end in test_llm_crosscoder_training_runner.py)."""

import json
from types import SimpleNamespace

import pytest

from hf_crosscoder.checkpoints import (
    REQUIRED,
    checkpoint_steps,
    latest_checkpoint,
    read_checkpoint_meta,
    resolve_checkpoint,
    resume_request,
)


def test_checkpoint_steps_are_spaced_and_end_at_the_last_step():
    assert checkpoint_steps(100, 0) == ()
    assert checkpoint_steps(100, 1) == (50, 100)
    assert checkpoint_steps(100, 3) == (25, 50, 75, 100)
    assert checkpoint_steps(3, 5) == (1, 2, 3)  # more checkpoints than steps: each step once


CROSSCODER = {"architecture": "topk_crosscoder", "d_model": 64, "d_sae": 256, "hook_names_in": ["a", "b"],
              "hook_names_out": ["c"]}


def _complete(path, step=1, num_processes=1):
    path.mkdir(parents=True)
    for name in REQUIRED:
        (path / name).mkdir() if name == "accelerate" else (path / name).write_text("x")
    (path / "accelerate" / "model.safetensors").write_text("x")
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "num_processes": num_processes}))
    (path / "config.json").write_text(json.dumps({**CROSSCODER, "k": 8}))
    return path


def test_latest_checkpoint_is_the_highest_step_and_ignores_temporary_dirs(tmp_path):
    assert latest_checkpoint(tmp_path / "missing") is None
    for step in (2, 10, 9):
        _complete(tmp_path / f"step_{step}", step)
    (tmp_path / ".tmp_step_11").mkdir()  # a write that was killed mid-way
    (tmp_path / "step_x").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "step_10"
    assert resolve_checkpoint("latest", tmp_path) == tmp_path / "step_10"
    assert resolve_checkpoint(None, tmp_path) is None


# transformers' Trainer convention: True = the latest checkpoint; the CLI passes strings
@pytest.mark.parametrize("value", [True, "true", "True", "latest", "LATEST"])
def test_resolve_true_and_latest_mean_the_newest_checkpoint(tmp_path, value):
    for step in (2, 10):
        _complete(tmp_path / f"step_{step}", step)
    assert resolve_checkpoint(value, tmp_path) == tmp_path / "step_10"


@pytest.mark.parametrize("value", [None, False, "false", "False", "none", ""])
def test_resolve_false_and_none_mean_start_fresh(tmp_path, value):
    _complete(tmp_path / "step_2", 2)
    assert resume_request(value) is None
    assert resolve_checkpoint(value, tmp_path) is None


def test_resolve_a_path_and_refuse_other_types(tmp_path):
    path = _complete(tmp_path / "step_4", 4)
    assert resolve_checkpoint(str(path), tmp_path / "elsewhere") == path
    assert resolve_checkpoint(path, tmp_path / "elsewhere") == path  # a pathlib.Path as well
    with pytest.raises(ValueError, match="must be True/False, 'latest' or a checkpoint path"):
        resolve_checkpoint(3, tmp_path)


def test_resolve_refuses_missing_and_incomplete_checkpoints(tmp_path):
    with pytest.raises(ValueError, match="no checkpoint found"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(ValueError, match="no checkpoint found"):
        resolve_checkpoint(True, tmp_path)  # an empty checkpoint folder
    with pytest.raises(ValueError, match="missing or incomplete"):
        resolve_checkpoint(str(tmp_path / "step_99"), tmp_path)  # a path that does not exist
    partial = _complete(tmp_path / "step_3")
    (partial / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete.*model.safetensors"):
        resolve_checkpoint(str(partial), tmp_path)


def test_read_meta_refuses_corrupt_state_and_another_process_count(tmp_path):
    path = _complete(tmp_path / "step_4", step=4, num_processes=2)
    assert read_checkpoint_meta(path, 2)["step"] == 4
    with pytest.raises(ValueError, match="written by 2 processes.*--num_processes 2"):
        read_checkpoint_meta(path, 1)
    (path / "trainer_state.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        read_checkpoint_meta(path, 2)


def test_read_meta_refuses_an_empty_optimizer_state(tmp_path):
    path = _complete(tmp_path / "step_1")
    (path / "accelerate" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="empty accelerate/ folder"):
        read_checkpoint_meta(path, 1)


def test_read_meta_refuses_a_checkpoint_of_another_crosscoder(tmp_path):
    # checked against the run's config before any model loads, instead of a size mismatch deep in
    # load_state_dict
    path = _complete(tmp_path / "step_1")
    assert read_checkpoint_meta(path, 1, SimpleNamespace(**CROSSCODER, k=4))["step"] == 1  # k may change
    for change in ({"d_sae": 512}, {"hook_names_out": ["d"]}, {"architecture": "crosscoder"}):
        with pytest.raises(ValueError, match=f"another crosscoder: {next(iter(change))}=.*this run: "
                                             "(.|\\n)*start a new run"):
            read_checkpoint_meta(path, 1, SimpleNamespace(**{**CROSSCODER, **change}))
