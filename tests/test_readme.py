"""README.md stays true: its training commands parse, and its runnable Python examples run.

- Every command in a fenced code block that runs the trainer (`python -m
  hf_crosscoder.llm_crosscoder_training_runner ...`, `[accelerate launch ...] scripts/train.py ...`,
  the quickstart) is parsed with the same code as the real entry point; other `python -m
  hf_crosscoder.X` commands must name an existing module. Lines that are not such commands are
  skipped; backslash continuations are joined; `# comments` are dropped.
- A ```python block preceded by the line `<!-- test: run -->` is exec'd, on its own (fresh
  namespace), in a temporary working directory, offline.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from hf_crosscoder.cli import parse_runner_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUNNER_MODULE = "hf_crosscoder.llm_crosscoder_training_runner"
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```", re.S | re.M)
RUN_MARK = re.compile(r"<!--\s*test:\s*run\s*-->\s*\n\s*```python[^\n]*\n(.*?)^```", re.S | re.M)


def _readme() -> str:
    return README.read_text() if README.is_file() else ""


def shell_lines(text: str) -> list[str]:
    """Logical lines of the non-Python code blocks (continuations joined, prompts stripped)."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in ("python", "py", "yaml", "json", "toml", "text"):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ").strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def classify(line: str) -> tuple[str, list[str], list[str]] | None:
    """(kind, argv after the script/module, words before it) for a command this test checks."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        return None
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # leading VAR=value
        words = words[1:]
    for i, word in enumerate(words):
        if word == "-m" and i + 1 < len(words) and words[i + 1].startswith("hf_crosscoder"):
            kind = "runner" if words[i + 1] == RUNNER_MODULE else "module"
            return kind, words[i + 2:], words[:i + 2]
        if word.endswith(("scripts/train.py", "scripts/quickstart.py", "scripts/quickstart.sh")):
            kind = "quickstart" if "quickstart" in word else "runner"
            return kind, words[i + 1:], words[:i + 1]
    return None


LAUNCHERS = ("python", "python3", "accelerate", "bash", "sh", "torchrun")


def commands() -> list:
    """pytest params (line, kind, argv, words before) of the README's commands this test checks."""
    params = []
    for line in shell_lines(_readme()):
        found = classify(line)
        if found is None:
            continue
        launcher = Path(found[2][0]).name
        if launcher in LAUNCHERS or launcher.startswith("python") or found[2][0].startswith(("scripts/", "./")):
            params.append(pytest.param(line, *found, id=line[:70]))
    return params


def run_blocks() -> list[str]:
    return RUN_MARK.findall(_readme())


def test_readme_shows_training_commands():
    assert README.is_file(), f"{README} does not exist: the README is the newcomer's entry point."
    kinds = [param.values[1] for param in commands()]
    assert "runner" in kinds, ("README.md shows no training command (`python -m "
                               f"{RUNNER_MODULE} ...` or `accelerate launch scripts/train.py ...`) in a code block.")


def _check_launch_words(before: list[str]) -> None:
    """`accelerate launch --config_file X`: X must ship with the repo."""
    if "--config_file" in before:
        path = before[before.index("--config_file") + 1]
        assert (ROOT / path).is_file(), f"accelerate config {path} does not exist in the repository"


@pytest.mark.parametrize("line,kind,argv,before", commands())
def test_readme_command_parses(line, kind, argv, before, monkeypatch):
    monkeypatch.chdir(ROOT)  # relative paths (--config files) are the repository's
    if kind == "module":
        module = before[-1]
        assert importlib.util.find_spec(module) is not None, f"README runs {module}, which does not exist"
        return
    _check_launch_words(before)
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        assert (ROOT / path).is_file(), (f"README runs `--config {path}`, which the repository does not ship: "
                                         f"add {path} (an example run config) or show the flags instead.\n{line}")
    try:
        if kind == "quickstart":
            # the quickstart's defaults first, then the README's flags (what build_config does,
            # without reading a model's config: the README may name a Hub model)
            spec = importlib.util.spec_from_file_location("quickstart", ROOT / "scripts" / "quickstart.py")
            quickstart = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(quickstart)
            argv = quickstart._flags(quickstart.DEFAULTS) + argv
        parse_runner_config(argv)
    except SystemExit as err:  # argparse exits on an unknown flag or a bad value
        pytest.fail(f"README command does not parse (argparse exit {err.code}):\n{line}")
    except ValueError as err:
        pytest.fail(f"README command is rejected by the config: {err}\n{line}")


@pytest.mark.parametrize("index", range(len(run_blocks())))
def test_readme_python_example_runs(index, monkeypatch, tmp_path):
    code = run_blocks()[index]
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md python block #{index} (<!-- test: run -->)", "exec"), {"__name__": "__readme__"})
