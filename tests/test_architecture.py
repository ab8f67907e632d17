"""The layout rules of docs/architecture.md, checked on the source itself.

Every import between the package's modules (lazy ones inside functions included) goes to the same
room or a lower one, no two modules import each other (directly or round a loop), and no file
grows past 700 lines. The rooms, lowest first, are listed in ROOMS; a new module has to be placed
in one (the test names it otherwise).
"""
import ast
import importlib
import warnings
from pathlib import Path

import pytest

import saliencykit

SRC = Path(saliencykit.__file__).parent
# lowest first; a module may import its own room and every room listed before it
ROOMS = [
    ("core", ("version", "errors", "hooks", "files", "images", "filters", "maps", "tokens", "subject", "embedding", "targets", "explanation", "engine",
              "inference", "data", "models")),
    ("methods and metrics", ("methods", "metrics")),
    ("tasks", ("tasks",)),
    ("datasets, concepts, benchmarks", ("datasets", "concepts", "benchmarks")),
    ("present", ("present",)),
    ("cli", ("cli", "__main__")),
]
# the package's front door, and the old paths kept for one release (they only re-export)
EXEMPT = {"saliencykit", "saliencykit.model", "saliencykit.clip", "saliencykit.detection",
          "saliencykit.verbalize", "saliencykit.viz", "saliencykit.zoo", "saliencykit._moved"}
MAX_LINES = 700


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    p = SRC.parent.joinpath(*dotted.split("."))
    return p.with_suffix(".py").exists() or (p / "__init__.py").exists()


def _imports(path: Path) -> set[str]:
    """The package's own modules that `path` imports anywhere in its body."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("saliencykit"):
                continue
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            found.update(subs if subs and len(subs) == len(node.names) else subs + [mod])
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("saliencykit"))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(SRC.rglob("*.py"))}


def _room(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for level, (_, tops) in enumerate(ROOMS):
        if first in tops:
            return level
    raise AssertionError(f"{module} is in no room: place it in ROOMS (tests/test_architecture.py) "
                         "and in docs/architecture.md")


def test_every_module_has_a_room():
    for module in _graph():
        if module not in EXEMPT:
            _room(module)


def test_lower_rooms_never_import_higher_ones():
    wrong = []
    for module, deps in _graph().items():
        if module in EXEMPT:
            continue
        for dep in deps:
            if dep in EXEMPT:
                wrong.append(f"{module} imports {dep}, the package front door or an old path")
            elif _room(dep) > _room(module):
                wrong.append(f"{module} ({ROOMS[_room(module)][0]}) imports {dep} ({ROOMS[_room(dep)][0]})")
    assert not wrong, "\n".join(sorted(wrong))


def test_no_import_cycles():
    graph = {m: {d for d in deps if d not in EXEMPT} for m, deps in _graph().items() if m not in EXEMPT}
    # a package imports its own parent package implicitly; an edge to a package is an edge to its __init__
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_file_over_700_lines():
    long = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_graph_sees_lazy_imports():
    # the checker must read imports inside functions, or the rules above could pass vacuously
    graph = _graph()
    assert "saliencykit.subject" in graph["saliencykit.models"]
    assert any(d.startswith("saliencykit.methods") for d in graph["saliencykit.present.report"])


OLD_PATHS = {
    "saliencykit.model": ("saliencykit.subject", ["Subject", "LayerCapture", "load_image", "count_hooks",
                                                  "extract_logits", "ImagePreprocess"]),
    "saliencykit.clip": ("saliencykit.tasks.clip", ["CLIPSubject", "Text", "load_clip", "explain_prompts"]),
    "saliencykit.detection": ("saliencykit.tasks.detection", ["Box", "Detector", "drise", "load_detector"]),
    "saliencykit.verbalize": ("saliencykit.present.verbalize", ["verbalize", "Verbalization", "method_title"]),
    "saliencykit.viz": ("saliencykit.present.viz", ["overlay", "grid", "colorize", "save_png"]),
    "saliencykit.zoo": ("saliencykit.models", ["load_model", "available_models", "imagenet_groups"]),
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_module_paths_work_with_a_deprecation_warning(old):
    import sys

    new, names = OLD_PATHS[old]
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    messages = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    assert any(new in m for m in messages), messages
    target = importlib.import_module(new)
    for n in names:
        assert getattr(module, n) is getattr(target, n), n


def test_public_names_unchanged_after_old_imports():
    import saliencykit as sk

    importlib.import_module("saliencykit.verbalize")
    importlib.import_module("saliencykit.viz")
    # importing the old module path must not replace the package's function of the same name
    from saliencykit.present.verbalize import verbalize

    assert sk.verbalize is verbalize or sk.verbalize.verbalize is verbalize
    for name in sk.__all__:
        assert hasattr(sk, name), name
