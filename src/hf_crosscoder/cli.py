"""Command line: `transformers.HfArgumentParser` over the config dataclasses, so the flags are the
dataclass fields (and their help), and the CLI and the Python API cannot drift apart.

`--config file.yaml|json` supplies values; flags given next to it override them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import yaml
from transformers import HfArgumentParser

from .config import LanguageModelCrosscoderRunnerConfig

T = TypeVar("T")
R = TypeVar("R")


def _read_config_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {path}: no such file.")
    text = p.read_text()
    data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of field names to values.")
    return data


def parse_dataclass(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `argv` (default sys.argv[1:]) into `cls`, honouring `--config FILE`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(cls)
    parser.add_argument("--config", default=None, help="A yaml or json file of field values; flags override it.")
    if "--config" in argv:
        i = argv.index("--config")
        values = _read_config_file(argv[i + 1])
        unknown = sorted(set(values) - {a.dest for a in parser._actions})
        if unknown:
            raise ValueError(f"--config {argv[i + 1]}: unknown field(s) {', '.join(unknown)}.")
        parser.set_defaults(**values)
        del argv[i:i + 2]
    namespace = parser.parse_args(argv)
    fields = {k: v for k, v in vars(namespace).items() if k != "config"}
    return cls(**fields)


USER_ERRORS = (ValueError, OSError, FloatingPointError)  # raised with a message that names the fix


def run_cli(cls: type[T], fn: Callable[[T], R], argv: list[str] | None = None) -> R:
    """Parse `argv` into `cls` and call `fn` on it. User errors print `error: <message>` on stderr and exit
    with status 2 (as argparse does for a bad flag); `--debug` anywhere in argv re-raises them instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        return fn(parse_dataclass(cls, argv))
    except USER_ERRORS as err:
        if debug:
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def parse_runner_config(argv: list[str] | None = None) -> LanguageModelCrosscoderRunnerConfig:
    return parse_dataclass(LanguageModelCrosscoderRunnerConfig, argv)


def print_metrics_table(metrics: dict) -> None:
    """The final evaluation as an aligned two-column table on stdout."""
    rows = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)]
    width = max((len(k) for k, _ in rows), default=10)
    print(f"{'metric':<{width}}  value")
    for key, value in rows:
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


def reproduce_command(cfg: LanguageModelCrosscoderRunnerConfig) -> str:
    """The command line that reproduces `cfg`: the hooks, plus every flag that differs from its default."""
    defaults = LanguageModelCrosscoderRunnerConfig(hook_names_in=cfg.hook_names_in,
                                                   hook_names_out=cfg.hook_names_out)
    parts = ["python -m hf_crosscoder.llm_crosscoder_training_runner"]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("hook_names_in", "hook_names_out") or value != getattr(defaults, f.name):
            values = value if isinstance(value, list) else [value]
            parts.append(" ".join([f"--{f.name}", *(shlex.quote(str(v)) for v in values)]))
    return " \\\n    ".join(parts)
