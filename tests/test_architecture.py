"""The package's shape, checked: no import cycles, the transformers quantizer API touched by one module,
algorithms importable without transformers."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hf_svdq

PACKAGE = Path(hf_svdq.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.AST) -> list[ast.ImportFrom | ast.Import]:
    """Every import that can run (module level or inside functions); ``if TYPE_CHECKING:`` blocks never do."""
    found: list[ast.ImportFrom | ast.Import] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def import_graph() -> dict[str, set[str]]:
    """hf_svdq module -> the hf_svdq modules it imports (``from .x import name`` counts ``.x``, or ``.x.name``
    when that is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.split(".")[0] == "hf_svdq")
                continue
            if node.level == 0:
                base = node.module or ""
                if base.split(".")[0] != "hf_svdq":
                    continue
            else:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = edges - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return found


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "hf_svdq.integration.quantizer" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_quantizer_touches_transformers_quantizer_api():
    users = set()
    for path in PACKAGE.rglob("*.py"):
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.startswith("transformers.quantizers") for n in names):
                users.add(_module_name(path))
    assert users == {"hf_svdq.integration.quantizer"}


CONFIG_READERS = ("hf_svdq._autoload", "hf_svdq.integration.", "hf_svdq.compression.plan", "hf_svdq.analysis.analyze",
                  "hf_svdq.publishing.", "hf_svdq.cli", "hf_svdq.streaming")
"""Who may see ``SVDQuantConfig``: the integration, the planner, the analysis entry points, the exporters that read a
saved ``config.json``, the CLI, the streaming entry point (``compress_checkpoint``, from_pretrained's sibling). Everything else takes the planner's plain data (settings, per-layer decisions)."""


def _reaches(graph: dict[str, set[str]], start: str, target: str) -> bool:
    seen, stack = set(), [start]
    while stack:
        for module in graph.get(stack.pop(), ()):
            if module == target:
                return True
            if module not in seen:
                seen.add(module)
                stack.append(module)
    return False


def test_the_config_is_resolved_once_by_the_planner():
    """No algorithm, compression step, analysis stage, module or kernel imports the config, even indirectly."""
    graph = import_graph()
    readers = {m for m in graph if _reaches(graph, m, "hf_svdq.integration.config")}
    assert {"hf_svdq.compression.plan", "hf_svdq.integration.quantizer"} <= readers
    below = sorted(m for m in readers if not m.startswith(CONFIG_READERS))
    assert below == [], f"these modules reach SVDQuantConfig instead of taking the plan: {below}"
    for module in ("hf_svdq.compression.compress", "hf_svdq.analysis.sensitivity", "hf_svdq.analysis.options",
                   "hf_svdq.analysis.policy", "hf_svdq.compression.healing"):
        assert module in graph and module not in readers


def test_algorithms_and_format_import_without_transformers():
    """Algorithms on tensors and the on-disk format are usable (and testable) without transformers."""
    modules = sorted(n for n in import_graph() if n.startswith(("hf_svdq.algorithms", "hf_svdq.format.layout",
                                                                "hf_svdq.format.checkpoint", "hf_svdq.kernels",
                                                                "hf_svdq.compression.decisions")))
    code = "import sys; sys.modules['transformers'] = None\n" + "\n".join(f"import {m}" for m in modules)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False,
                            env={"HF_SVDQ_NO_AUTOLOAD": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]


def test_checkpoints_written_before_the_refactor_load_unchanged():
    """``tests/fixtures/pre_refactor``: a residual (INT4 + one INT8 layer + rank 4) and a low-rank checkpoint of a
    tiny Llama, saved by the flat-layout hf_svdq (commit 086c603) with their logits; loaded now, same logits."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_svdq import SVDQLinear, SVDQResidualLinear

    fixtures = Path(__file__).with_name("fixtures") / "pre_refactor"
    expected = load_file(str(fixtures / "expected.safetensors"))
    for name, layer_type in (("residual", SVDQResidualLinear), ("lowrank", SVDQLinear)):
        model = AutoModelForCausalLM.from_pretrained(fixtures / name)
        assert isinstance(model.model.layers[0].self_attn.q_proj, layer_type)
        with torch.no_grad():
            logits = model(expected["input_ids"]).logits
        torch.testing.assert_close(logits, expected[name], rtol=0, atol=1e-5, msg=name)


def test_the_readme_format_tables_are_the_declared_layout():
    from hf_svdq.format.layout import markdown_tables

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")  # the checkout, not the install
    start = readme.index("<!-- layout-tables: generated by hf_svdq.format.layout.markdown_tables() -->\n")
    end = readme.index("<!-- /layout-tables -->")
    assert readme[start:end].split("\n", 1)[1] == markdown_tables()


def test_modules_checks_and_byte_counts_follow_the_declared_layout():
    """One declaration, three readers: the module's registered tensors, the loader's expectations, the byte count."""
    import torch

    from hf_svdq import SVDQLinear, SVDQResidualLinear
    from hf_svdq.format import layout
    from hf_svdq.format.checkpoint import expected_tensors

    cases = [(SVDQLinear(96, 40, 8, bias=False, dtype=torch.bfloat16), layout.LayerShape(40, 96, 8)),
             (SVDQResidualLinear(96, 40, 8, 4, 32, bias=False), layout.LayerShape(40, 96, 8, 4, 32)),
             (SVDQResidualLinear(96, 40, 0, 8, 48, bias=False), layout.LayerShape(40, 96, 0, 8, 48))]
    for module, shape in cases:
        params = dict(module.named_parameters())
        declared = layout.layer_tensors(shape)
        assert list(params) == [t.name for t in declared]
        assert {n: tuple(p.shape) for n, p in params.items()} == {t.name: t.shape(shape) for t in declared}
        float_bytes = module.weight_vh_scale.element_size() if shape.rank else 4
        assert sum(p.numel() * p.element_size() for p in params.values()) == layout.layer_nbytes(shape, float_bytes)
        assert {k.split(".", 1)[1]: v[0] for k, v in expected_tensors("m", 40, 96, shape.rank, shape.bits,
                                                                       shape.group_size).items()} == \
            {n: tuple(p.shape) for n, p in params.items()}
