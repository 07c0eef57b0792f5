"""The CLI is the config dataclass: seed flags, --config files and the Python API agree."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from hf_crosscoder import LanguageModelCrosscoderRunnerConfig
from hf_crosscoder.cli import parse_runner_config

SEED_FLAGS = [
    "--model_name", "EleutherAI/pythia-70m",
    "--hook_names_in", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post",
    "--hook_names_out", "blocks.3.hook_resid_post", "blocks.4.hook_resid_post",
    "--d_model", "512",
    "--d_sae", "4096",
    "--training_tokens", "10000000",
    "--output_path", "./my_crosscoder",
]
SEED_API = LanguageModelCrosscoderRunnerConfig(
    model_name="EleutherAI/pythia-70m",
    hook_names_in=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
    hook_names_out=["blocks.3.hook_resid_post", "blocks.4.hook_resid_post"],
    d_model=512,
    d_sae=4096,
    training_tokens=10_000_000,
    output_path="./my_crosscoder",
)


def test_seed_flags_equal_python_api():
    assert parse_runner_config(SEED_FLAGS) == SEED_API


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_equals_python_api_and_flags_override(tmp_path, suffix):
    values = {"model_name": "EleutherAI/pythia-70m", "hook_names_in": SEED_API.hook_names_in,
              "hook_names_out": SEED_API.hook_names_out, "d_model": 512, "d_sae": 4096,
              "training_tokens": 10_000_000, "output_path": "./my_crosscoder"}
    path = tmp_path / f"run{suffix}"
    path.write_text(yaml.safe_dump(values) if suffix == ".yaml" else json.dumps(values))
    assert parse_runner_config(["--config", str(path)]) == SEED_API
    overridden = parse_runner_config(["--config", str(path), "--lr", "0.001", "--log_to_wandb", "True"])
    assert overridden.lr == 0.001 and overridden.log_to_wandb and overridden.d_sae == 4096


def test_bad_values_fail_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="valid architectures"):
        parse_runner_config(SEED_FLAGS + ["--architecture", "nope"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("hook_names_in: [a]\nnot_a_field: 3\n")
    with pytest.raises(ValueError, match="not_a_field"):
        parse_runner_config(["--config", str(bad)])
    with pytest.raises(ValueError, match="no such file"):
        parse_runner_config(["--config", str(tmp_path / "missing.yaml")])


def test_every_field_is_a_flag_with_help():
    from transformers import HfArgumentParser

    parser = HfArgumentParser(LanguageModelCrosscoderRunnerConfig)
    actions = {a.dest: a for a in parser._actions}
    import dataclasses

    for field in dataclasses.fields(LanguageModelCrosscoderRunnerConfig):
        assert field.name in actions
        assert actions[field.name].help, f"--{field.name} has no help text"


def _seed_cli(tmp_path, *flags: str) -> subprocess.CompletedProcess:
    """The seed's command line, as a user runs it (a fresh interpreter, warnings shown)."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-m", "hf_crosscoder.llm_crosscoder_training_runner", *flags],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def _tiny_flags(tiny_model_dir, text_dataset_path, tmp_path) -> list[str]:
    return ["--model_name", tiny_model_dir, "--dataset_path", text_dataset_path, "--d_model", "64",
            "--hook_names_in", "blocks.0.hook_resid_post", "--hook_names_out", "blocks.1.hook_resid_post",
            "--output_path", str(tmp_path / "out"), "--device", "cpu"]


@pytest.mark.parametrize("bad, message", [
    (["--d_model", "999"], "error: d_model=999 does not match the hidden size 64"),
    (["--hook_names_in", "blocks.0.hook_resid_psot"], "error: Unknown hook name 'blocks.0.hook_resid_psot'"),
    (["--dataset_path", "./no_such_corpus.jsonl"], "error: dataset_path ./no_such_corpus.jsonl does not exist"),
    (["--architecture", "nope"], "error: Unknown architecture 'nope'"),
])
def test_user_errors_print_one_line_and_exit_2(tiny_model_dir, text_dataset_path, tmp_path, bad, message):
    proc = _seed_cli(tmp_path, *_tiny_flags(tiny_model_dir, text_dataset_path, tmp_path), *bad)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tiny_model_dir, text_dataset_path, tmp_path):
    proc = _seed_cli(tmp_path, *_tiny_flags(tiny_model_dir, text_dataset_path, tmp_path), "--d_model", "999",
                     "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "ValueError: d_model=999 does not match" in proc.stderr


@pytest.mark.parametrize("flag, suggestion", [("--lr_rate", "--lr"), ("--d_mod", "--d_model"),
                                              ("--l1_coef", "--l1_coefficient"), ("--archtecture", "--architecture")])
def test_misspelled_flag_suggests_the_nearest_in_one_line(capsys, flag, suggestion):
    with pytest.raises(SystemExit) as exit_info:
        parse_runner_config([flag, "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"error: unknown flag {flag}; did you mean {suggestion}?"]


def test_bad_flag_value_is_one_line_without_the_usage_block(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_runner_config(["--d_model", "abc"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: argument --d_model") and "usage" not in err[0]


def test_help_is_grouped_by_the_config_groups(capsys):
    from hf_crosscoder.config import ARG_GROUPS

    with pytest.raises(SystemExit):
        parse_runner_config(["--help"])
    text = capsys.readouterr().out
    starts = [text.index(f"\n{title}:\n") for title, _ in ARG_GROUPS]
    assert starts == sorted(starts)  # every group has its heading, in order
    usage = text.split("\n\n")[0]
    assert len(usage.splitlines()) == 1  # a one-line usage, not every flag
    evaluation = text[text.index("\nevaluation:\n"):text.index("\noutput, checkpoints and Hub:\n")]
    assert "--eval_holdout_sequences" in evaluation and "--lr " not in evaluation
    crosscoder = text[text.index("\ncrosscoder:\n"):text.index("\nactivations store:\n")]
    assert "--d_sae" in crosscoder and "--architecture" in crosscoder


def test_help_fits_one_screen_per_group_and_shows_one_group_on_request(capsys):
    from hf_crosscoder import ARCHITECTURES
    from hf_crosscoder.config import ARG_GROUPS

    with pytest.raises(SystemExit):
        parse_runner_config(["--help"])
    text = capsys.readouterr().out
    bodies = text.split("\n\n")
    from hf_crosscoder.cli import DEVICES

    for title in [*(t for t, _ in ARG_GROUPS), DEVICES]:  # a heading, a one-sentence description, the flags
        flags = bodies[[i for i, b in enumerate(bodies) if b.startswith(f"{title}:")][0] + 1]
        assert len(flags.splitlines()) <= 50, (title, len(flags.splitlines()))
    assert "--no_streaming" not in text and "--d-sae" not in text and "--d_sae INT " in text
    devices = text[text.index(f"\n{DEVICES}:\n"):]
    assert "--model_devices STR..." in devices and "accelerate launch" in devices and "--device STR" in devices
    assert all(name in text for name in ARCHITECTURES)  # the registered choices are listed
    assert parse_runner_config(["--hook_names_in", "h", "--hook_names_out", "h", "--no_streaming"]).streaming is False
    with pytest.raises(SystemExit) as exit_info:
        parse_runner_config(["--help", "training"])
    assert exit_info.value.code == 0
    one = capsys.readouterr().out
    assert "\ntraining:\n" in one and "--lr FLOAT" in one and "--d_sae" not in one and "evaluation:" not in one
    with pytest.raises(SystemExit) as exit_info:
        parse_runner_config(["--help", "trainig"])
    assert exit_info.value.code == 2
    assert "no such group; use one of model, crosscoder" in capsys.readouterr().err


def test_cli_silences_transformers_bars_and_deepspeed_cpu_warning(monkeypatch):
    import logging

    from transformers.utils import logging as hf_logging

    from hf_crosscoder.cli import silence_internal_noise

    monkeypatch.setattr(hf_logging, "_tqdm_active", True)
    silence_internal_noise()
    assert not hf_logging.is_progress_bar_enabled()
    ds = logging.getLogger("DeepSpeed")
    record = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "Setting accelerator to CPU. If you", (),
                               None)
    other = logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, "something else", (), None)
    assert not ds.filter(record) and ds.filter(other)
    silence_internal_noise()
    assert sum(getattr(f, "_hf_crosscoder", False) for f in ds.filters) == 1  # installed once
