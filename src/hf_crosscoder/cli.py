"""Command line: `transformers.HfArgumentParser` over the config dataclasses, so the flags are the
dataclass fields (and their help), and the CLI and the Python API cannot drift apart.

`--config file.yaml|json` supplies values; flags given next to it override them. `--help` lists the
flags by group (config.ARG_GROUPS); a misspelled flag gets one line naming the nearest one.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import yaml
from transformers import HfArgumentParser
from transformers.utils import logging as hf_logging

from .config import ARG_GROUPS, CONFIG_CHECKS, LanguageModelCrosscoderRunnerConfig

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


class _Parser(HfArgumentParser):
    """argparse errors as one line (`error: ...`, exit status 2) instead of the whole usage block."""

    def error(self, message: str):
        print(f"error: {message} (--help lists the flags)", file=sys.stderr)
        raise SystemExit(2)


class _CompactHelp(argparse.ArgumentDefaultsHelpFormatter):
    """One flag per line where it fits: the underscore spelling only (the dashed alias and the `--no_*`
    complement of a boolean still parse, unlisted), the value's type as its metavar, help text beside it."""

    def __init__(self, prog: str) -> None:
        width = min(shutil.get_terminal_size((110, 24)).columns, 120)
        super().__init__(prog, max_help_position=34, width=width)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return ", ".join(action.option_strings) or super()._format_action_invocation(action)
        return f"{action.option_strings[0]} {action.metavar or _metavar(action)}"

    def _get_help_string(self, action: argparse.Action) -> str:
        # a None default is "unset" (the help says what happens then): no "(default: None)"
        return action.help if action.default is None else super()._get_help_string(action)


def _metavar(action: argparse.Action) -> str:
    if action.choices:
        return "{" + ",".join(map(str, action.choices)) + "}"
    name = getattr(action.type, "__name__", "value")
    kind = {"string_to_bool": "BOOL", "int": "INT", "float": "FLOAT", "str": "STR"}.get(name, name.upper())
    return f"{kind}..." if action.nargs in ("+", "*") else kind


def _tidy_help(parser: argparse.ArgumentParser) -> None:
    """Hide the `--no_*` complements (the description names them once) and list the registered choices of
    fields that other modules fill (architecture, layer_structure)."""
    for action in parser._actions:
        if any(o.startswith("--no_") for o in action.option_strings):
            action.help = argparse.SUPPRESS
        elif action.dest in CONFIG_CHECKS and CONFIG_CHECKS[action.dest] and action.help:
            action.help = f"{action.help} One of: {', '.join(CONFIG_CHECKS[action.dest])}."


# where things run: a group of its own in --help, whichever config dataclass declares the fields
DEVICES = "devices and distributed"
DEVICE_FLAGS = ("device", "model_devices", "dtype", "autocast_lm", "autocast", "compile_llm", "compile_crosscoder")
DEVICES_HELP = ("Data parallelism, FSDP and DeepSpeed ZeRO come from `accelerate launch --config_file "
                "accelerate_configs/<multi_gpu|fsdp|deepspeed_zero2|...>.yaml scripts/train.py ...`, not from flags; "
                "batch sizes and training_tokens are global, so 1 and N processes train alike.")


def _group_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Move each field's flag into the argument group of the config dataclass that declares it
    (config.ARG_GROUPS); the fields of `cls` itself (d_sae, expansion_factor) join the crosscoder group."""
    groups = [(title, dc) for title, dc in ARG_GROUPS if issubclass(cls, dc)]
    if not groups:
        return
    owner = {f.name: title for title, dc in reversed(groups) for f in dataclasses.fields(dc)}
    made = {title: parser.add_argument_group(title, _first_sentence(dc.__doc__)) for title, dc in groups}
    fallback = next((t for t, dc in groups if dc.__name__ == "CrosscoderArgs"), groups[0][0])
    if any(f.name in DEVICE_FLAGS for f in dataclasses.fields(cls)):
        made[DEVICES] = parser.add_argument_group(DEVICES, DEVICES_HELP)
        owner.update(dict.fromkeys(DEVICE_FLAGS, DEVICES))
    for action in list(parser._optionals._group_actions):
        if action.dest in ("help", "config"):
            continue
        parser._optionals._group_actions.remove(action)
        made[owner.get(action.dest, fallback)]._group_actions.append(action)


def _flag_groups(parser: argparse.ArgumentParser) -> list:
    return [g for g in parser._action_groups if g._group_actions and g.title not in ("options", "positional arguments")]


def _group_key(title: str) -> str:
    return title.split()[0].strip(",").lower()


def _show_one_group(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`--help GROUP`: the help of that group alone (one screen), then exit."""
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-h", "--help") and not argv[i + 1].startswith("-"):
            keys = {_group_key(g.title): g for g in _flag_groups(parser)}
            if argv[i + 1].lower() not in keys:
                parser.error(f"--help {argv[i + 1]}: no such group; use one of {', '.join(keys)}")
            keep = keys[argv[i + 1].lower()]
            parser._action_groups = [g for g in parser._action_groups if g is keep]
            parser.description = None
            parser.print_help()
            raise SystemExit(0)


def _first_sentence(doc: str | None) -> str:
    text = " ".join((doc or "").split())
    return text.split(". ")[0].rstrip(".") + "." if text else ""


def _unknown_flag_error(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """`error: unknown flag --lr_rate; did you mean --lr?` (exit status 2) for the first unknown flag."""
    flag = next((a for a in unknown if a.startswith("-")), unknown[0]).split("=", 1)[0]
    if flag.startswith("-"):
        typo = flag.lstrip("-").replace("-", "_")
        names = [a.dest for a in parser._actions if a.option_strings and a.dest != "help"]
        # a known name plus a suffix (--lr_rate -> --lr) or cut short (--d_mod -> --d_model), else difflib's
        near = sorted((n for n in names if typo.startswith(n + "_") or n.startswith(typo)), key=len, reverse=True)
        near = near or difflib.get_close_matches(typo, names, n=1, cutoff=0.6)
        message = f"unknown flag {flag}" + (f"; did you mean --{near[0]}?" if near else " (--help lists the flags)")
    else:
        message = f"unexpected argument {flag!r} (--help lists the flags)"
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' 'Loading weights' / 'Writing model shards' bars off for one internal load or save (a
    checkpoint, the output folder): noise around our own progress bar; the caller's setting comes back."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def silence_internal_noise(progress_bars: bool = True) -> None:
    """Quiet what third-party libraries print around our internal work: DeepSpeed's 'Setting accelerator
    to CPU' warning (its logger is re-levelled when deepspeed is imported, so a filter, not a level), and,
    with `progress_bars`, transformers' 'Loading weights' / 'Writing model shards' bars (the command line
    only: a library caller keeps its own setting)."""
    ds = logging.getLogger("DeepSpeed")
    if not any(getattr(f, "_hf_crosscoder", False) for f in ds.filters):
        def drop(record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("Setting accelerator to CPU")

        drop._hf_crosscoder = True  # type: ignore[attr-defined]
        ds.addFilter(drop)
    if progress_bars:
        hf_logging.disable_progress_bar()


def parse_dataclass(cls: type[T], argv: list[str] | None = None) -> T:
    """Parse `argv` (default sys.argv[1:]) into `cls`, honouring `--config FILE`; an unknown flag exits
    with one line naming the nearest known one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(cls, allow_abbrev=False, formatter_class=_CompactHelp)  # an abbreviation is a typo, not a guess
    _tidy_help(parser)
    # the full usage line lists every flag (~70 lines): --help shows them by group instead
    parser.usage = "%(prog)s --model_name M --hook_names_in H... --hook_names_out H... [flags] (--help: all flags)"
    _group_flags(parser, cls)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="A yaml or json file of field values; flags override it.")
    parser.description = ("A boolean flag takes True or False (--no_FLAG sets False); a list flag takes several "
                          "values. `--help GROUP` shows one group (its first word: " +
                          ", ".join(_group_key(g.title) for g in _flag_groups(parser)) + ").")
    _show_one_group(parser, argv)
    if "--config" in argv:
        i = argv.index("--config")
        values = _read_config_file(argv[i + 1])
        unknown = sorted(set(values) - {a.dest for a in parser._actions})
        if unknown:
            raise ValueError(f"--config {argv[i + 1]}: unknown field(s) {', '.join(unknown)}.")
        parser.set_defaults(**values)
        del argv[i:i + 2]
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        _unknown_flag_error(parser, unknown)
    fields = {k: v for k, v in vars(namespace).items() if k != "config"}
    return cls(**fields)


USER_ERRORS = (ValueError, OSError, FloatingPointError)  # raised with a message that names the fix


def run_cli(cls: type[T], fn: Callable[[T], R], argv: list[str] | None = None) -> R:
    """Parse `argv` into `cls` and call `fn` on it. User errors print `error: <message>` on stderr and exit
    with status 2 (as argparse does for a bad flag); `--debug` anywhere in argv re-raises them instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    silence_internal_noise()
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
