"""The package's structure: one-way imports (no cycles, leaves that are leaves), registries that refuse
duplicates, and architectures that declare what the rest of the package reads."""

import ast
from pathlib import Path

import pytest

import hf_crosscoder
from hf_crosscoder import ARCHITECTURES, Crosscoder, CrosscoderConfig
from hf_crosscoder.modeling import register
from hf_crosscoder.structures import STRUCTURES, register_structure

PACKAGE = Path(hf_crosscoder.__file__).parent


def module_imports() -> dict[str, set[str]]:
    """Package modules each module imports at its top level (function-level imports included: any)."""
    graph = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module] if node.module else [a.name for a in node.names])
        graph[path.stem] = deps - {path.stem}
    return graph


def test_no_import_cycle_and_config_is_a_leaf():
    graph = module_imports()
    assert graph["config"] == set(), graph["config"]
    assert graph["kernels"] == set() and graph["metrics"] == set()
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(trail + [module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for dep in graph.get(module, ()):
            visit(dep, trail + [module])
        state[module] = 2

    for module in graph:
        visit(module, [])


def test_function_level_imports_of_the_package_are_only_the_lazy_runner():
    """Imports inside functions hide cycles; the one left is __init__'s lazy runner (runpy's warning)."""
    found = []
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom) and inner.level == 1:
                        found.append((path.stem, inner.module))
    assert found == [("__init__", "llm_crosscoder_training_runner")]


def test_registries_refuse_a_duplicate_name():
    with pytest.raises(ValueError, match="already registered"):
        register("topk_crosscoder")(type("Again", (Crosscoder,), {}))
    with pytest.raises(ValueError, match="already registered"):
        register_structure("dense")(type("Again", (STRUCTURES["dense"],), {}))
    assert "topk_crosscoder" in ARCHITECTURES and ARCHITECTURES["topk_crosscoder"].__name__ == "TopKCrosscoder"


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_architecture_declares_what_the_package_reads(arch):
    cls = ARCHITECTURES[arch]
    defaults = CrosscoderConfig(d_model=4, d_sae=8, hook_names_in=["a"], hook_names_out=["a"],
                                architecture="crosscoder")
    assert set(cls.hyperparameters) <= set(defaults.to_dict()), cls.hyperparameters
    sae, transcoder = cls.saelens_architectures
    assert sae is None or isinstance(sae, str)
    assert all(isinstance(name, str) for name in cls.saelens_imports)
    kw = {"matryoshka_widths": [2, 8]} if "matryoshka" in arch else {}
    cc = Crosscoder(CrosscoderConfig(architecture=arch, d_model=4, d_sae=8, k=2, hook_names_in=["a"],
                                     hook_names_out=["a"], **kw))
    names = [name for name, _ in cc.card_rows()]
    assert names[:len(cls.hyperparameters)] == list(cls.hyperparameters)
