"""The house: the engine's rooms import each other one way only, and importing it pulls in no optional dependency."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

ENGINE = ROOT / "sosp_engine"
OPTIONAL = ("ray", "captum", "kaleido", "streamlit", "onnxruntime")


def engine_modules() -> dict[str, Path]:
    modules = {}
    for path in ENGINE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every engine module `name` imports, at its top or inside a function."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (
                ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".")
                if node.level
                else node.module or ""
            )
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c in modules and c != name}
    return found


def test_no_engine_module_imports_a_module_that_imports_it_back():
    modules = engine_modules()
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            current = todo.pop()
            if current == goal:
                return True
            if current not in seen:
                seen.add(current)
                todo.extend(graph[current])
        return False

    circles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if reaches(b, a)})
    assert circles == []


def test_the_engine_lives_in_rooms_with_a_few_foundations_at_the_top():
    top = sorted(p.stem for p in ENGINE.glob("*.py"))
    rooms = sorted(p.name for p in ENGINE.iterdir() if (p / "__init__.py").exists())
    assert top == ["__init__", "__main__", "atomic", "devices", "errors", "options", "progress", "shown"]
    assert rooms == ["cli", "experiments", "latency", "nets", "pruning", "runs", "saliency"]


def test_importing_the_engine_and_its_public_names_pulls_in_no_optional_dependency():
    probe = (
        "import sys\nfrom sosp_engine import *\nimport sosp_engine.cli.main\n"
        f"print([m for m in {OPTIONAL!r} if m in sys.modules])"
    )
    run = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_the_public_names_resolve():
    import sosp_engine

    assert all(getattr(sosp_engine, name) is not None for name in sosp_engine.__all__)


ROOMS = ("nets", "pruning", "latency", "saliency", "experiments", "runs", "cli")  # lowest first


def test_no_room_imports_a_room_above_it():
    modules = engine_modules()
    rank = {room: i for i, room in enumerate(ROOMS)}

    def room_of(name: str) -> str | None:
        parts = name.split(".")
        return parts[1] if len(parts) > 1 and parts[1] in rank else None

    upward = sorted(
        (name, imported)
        for name, path in modules.items()
        for imported in imports_of(name, path, modules)
        if room_of(name) and room_of(imported) and rank[room_of(imported)] > rank[room_of(name)]
    )
    assert upward == []


def test_every_benchmark_result_file_is_cited_by_a_document_or_a_script():
    results = sorted((ROOT / "bench" / "results").iterdir())
    citing = [*(ROOT / "docs").glob("*.md"), ROOT / "README.md", *(ROOT / "bench").glob("*.py")]
    text = "\n".join(path.read_text() for path in citing)
    assert [path.name for path in results if path.name not in text] == []


# --- sizes a reader can hold ----------------------------------------------------------------------------------------
CALLBACKS = {
    "self",
    "cls",
    "progress",
    "should_stop",
}  # a method's own object and the two callbacks of long work
MOST_PARAMETERS = 7
WIDE_ON_PURPOSE = {"Store.add_job": "a row of the store: one argument per column it writes"}
PAGE_TOP_LEVEL = 40  # lines of a page's own script: layout, then calls of named functions


def engine_functions():
    """(qualified name, node) of every function and method of the engine."""
    for path in sorted(ENGINE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            bodies = (
                [(node.name + ".", n) for n in node.body] if isinstance(node, ast.ClassDef) else [("", node)]
            )
            for prefix, item in bodies:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{path.relative_to(ROOT)}:{prefix}{item.name}", item
                    for inner in ast.walk(item):
                        if inner is not item and isinstance(inner, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            yield f"{path.relative_to(ROOT)}:{prefix}{item.name}.{inner.name}", inner


def test_no_engine_function_is_longer_than_80_lines():
    long = [name for name, node in engine_functions() if node.end_lineno - node.lineno + 1 > 80]
    assert long == []


def test_no_engine_function_takes_more_than_seven_parameters_besides_its_callbacks():
    wide = []
    for name, node in engine_functions():
        args = node.args
        given = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs if a.arg not in CALLBACKS]
        if len(given) > MOST_PARAMETERS and name.split(":")[1] not in WIDE_ON_PURPOSE:
            wide.append(f"{name} ({len(given)})")
    assert wide == []


def top_level_lines(path: Path) -> int:
    """Lines of a page's script outside its functions, classes, imports and docstring."""
    skipped = (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)
    tree = ast.parse(path.read_text())
    return sum(
        node.end_lineno - node.lineno + 1
        for node in tree.body
        if not isinstance(node, skipped)
        and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))
    )


def test_no_page_runs_more_than_forty_lines_at_its_top_level():
    sizes = {path.stem: top_level_lines(path) for path in sorted((ROOT / "pages").glob("*.py"))}
    assert {page: n for page, n in sizes.items() if n > PAGE_TOP_LEVEL} == {}
