"""The package is layered: no import cycle between medscale's top-level modules and packages, and (almost) every
import of a medscale module sits at module level, where the import graph shows it.

The graph is read from the source with ``ast`` (imports inside functions count too), one node per top-level
unit ``medscale.X`` (X a subpackage or a top-level module); an edge X -> Y means some module of X imports some
module of Y.
"""

import ast
import pathlib

import medscale

ROOT = pathlib.Path(medscale.__file__).parent
MAX_FUNCTION_LEVEL = 8  # each one with a comment on its line, or the line before, saying why


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, path.name == "__init__.py"


def _imports(tree, module, is_package):
    """(imported module name, inside a function?, line) of every medscale import in ``tree``."""
    out = []

    def walk(node, in_fn):
        for child in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, in_fn, child.lineno) for a in child.names if a.name.split(".")[0] == "medscale")
            elif isinstance(child, ast.ImportFrom):
                if child.level:  # relative: resolve against the importing module's package
                    parts = module.split(".")
                    base = parts[: len(parts) - child.level + (1 if is_package else 0)]
                    name = ".".join([*base, *(child.module or "").split(".")]).rstrip(".")
                else:
                    name = child.module or ""
                if name.split(".")[0] == "medscale":
                    for a in child.names:  # "from medscale import accounting" imports medscale.accounting
                        sub = name == "medscale" and ((ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file())
                        out.append((f"{name}.{a.name}" if sub else name, in_fn, child.lineno))
            walk(child, fn)

    walk(tree, False)
    return out


def _unit(name: str) -> str | None:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) >= 2 else None


def _graph():
    edges, function_level = {}, []
    for module, path, is_package in _modules():
        src = path.read_text()
        lines = src.splitlines()
        for name, in_fn, line in _imports(ast.parse(src), module, is_package):
            a, b = _unit(module), _unit(name)
            if in_fn:
                function_level.append((module, name, line, lines[line - 1], lines[line - 2] if line > 1 else ""))
            if a and b and a != b:
                edges.setdefault(a, set()).add(b)
    return edges, function_level


def _cycle(edges):
    """One cycle of the graph as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_is_read():
    """The reader sees the imports it must: a known edge in each direction of the layering."""
    edges, _ = _graph()
    assert "medscale.train" in edges["medscale.generate"]
    assert "medscale.rundir" in edges["medscale.train"]
    assert "medscale.accounting" in edges["medscale.analysis"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_no_import_cycle_between_top_level_units():
    edges, _ = _graph()
    cycle = _cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# DESIGN.md's layers, top first; a unit imports only from units of lower layers (or its own)
LAYERS = (("__main__",), ("cli",), ("commands",), ("bench",), ("analysis",), ("sweep",), ("generate",), ("train",), ("kernels",),
          ("model", "data"),
          ("accounting", "memory", "laws", "hardware", "spec", "modalities", "options", "rundir", "configs", "errors"))


def test_every_import_goes_down_the_layers():
    rank = {f"medscale.{unit}": i for i, layer in enumerate(LAYERS) for unit in layer}
    edges, _ = _graph()
    assert set(edges) <= set(rank), set(edges) - set(rank)  # a new unit gets a place in LAYERS and DESIGN.md
    upward = [(a, b) for a, bs in edges.items() for b in bs
              if rank[b] < rank[a] or (rank[b] == rank[a] and len(LAYERS[rank[a]]) > 1
                                       and LAYERS[rank[a]] != LAYERS[-1])]
    assert not upward, upward


def test_lower_layers_import_nothing_above_them():
    """The bottom layer (accounting, hardware, laws, spec, modalities, rundir, configs, options, errors) imports
    only within itself."""
    bottom = {f"medscale.{m}" for m in ("accounting", "memory", "hardware", "laws", "spec", "modalities", "rundir",
                                        "configs", "options", "errors")}
    edges, _ = _graph()
    for unit in bottom:
        assert edges.get(unit, set()) <= bottom, (unit, edges.get(unit, set()) - bottom)


def test_function_level_medscale_imports_are_few_and_explained():
    _, function_level = _graph()
    assert len(function_level) <= MAX_FUNCTION_LEVEL, [f"{m}:{line} {name}" for m, name, line, *_ in function_level]
    for module, name, line, text, before in function_level:
        assert "#" in text or before.strip().startswith("#"), f"{module}:{line} imports {name} without a comment"
