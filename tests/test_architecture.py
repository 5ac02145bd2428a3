"""docs/architecture.md stays true: its layer table holds for every import of src/rifle (those inside functions too).
Fast: the source is parsed (ast), nothing is imported."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOC = ROOT / "docs" / "architecture.md"


def section(title: str) -> str:
    text = DOC.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def layers() -> list[list[str]]:
    """The table of "## Layers", lowest first: per layer its modules as dotted names under rifle ("rifle" for the
    package's __init__)."""
    rows = re.findall(r"^\| (\d+) \| (.+) \|$", section("Layers"), re.M)
    assert [int(n) for n, _ in rows] == list(range(len(rows))), rows
    return [["rifle" if m == "__init__" else f"rifle.{m}" for m in re.findall(r"`([^`]+)`", names)]
            for _, names in rows]


def layer_of(module: str, table: list[list[str]]) -> int | None:
    """The layer of the most specific entry naming `module` or a package above it."""
    found = [(len(name), i) for i, names in enumerate(table) for name in names
             if module == name or (module.startswith(name + ".") and name != "rifle")]
    return max(found)[1] if found else None


def is_module(name: str) -> bool:
    path = SRC / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "rifle").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(module: str, path: Path):
    """(imported rifle module, line) of every import statement in `path`: `from X import y` counts as X.y where
    that is a module, else X."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "rifle")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            if base.split(".")[0] == "rifle":
                for a in node.names:
                    yield (f"{base}.{a.name}" if is_module(f"{base}.{a.name}") else base), node.lineno


def test_the_layer_table_names_modules_that_exist():
    for names in layers():
        for name in names:
            assert name == "rifle" or is_module(name), name


def test_every_module_has_a_layer():
    table = layers()
    assert not [m for m in modules() if layer_of(m, table) is None]


def test_no_import_runs_up_a_layer():
    table = layers()
    up = [f"{m} (layer {layer_of(m, table)}) imports {target} (layer {layer_of(target, table)}), line {line}"
          for m, path in modules().items() for target, line in imports(m, path)
          if layer_of(target, table) > layer_of(m, table)]
    assert not up, "\n".join(up)


def test_the_walk_sees_imports_inside_functions():
    """The check reads a lazy import as any other (rifle.trainer imports rifle.evidence.figures in a function)."""
    found = dict(imports("rifle.trainer", SRC / "rifle" / "trainer.py"))
    assert "rifle.evidence.figures" in found and "rifle.track.serving" in found


def places() -> list[tuple[str, str, list[str]]]:
    """(fact, module path, names) of every place the table "## One place for each fact" cites: its second column
    holds `path/module.py`: `name`, ... parts separated by ";"."""
    out = []
    rows = re.findall(r"^\| (.+?) \| (.+) \|$", section("One place for each fact"), re.M)
    for fact, where in rows[1:]:  # below the header
        for part in where.split(";"):
            tokens = re.findall(r"`([^`]+)`", part)
            paths = [t for t in tokens if t.endswith(".py")]
            assert len(paths) == 1 and tokens[0] == paths[0], f"{fact}: {part!r} names no module first"
            out.append((fact, paths[0], tokens[1:]))
    return out


def defined(path: Path) -> dict[str, set[str]]:
    """Module-level names of a module (defs, classes, assignments, imports), each class with its attributes."""
    names: dict[str, set[str]] = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names[node.name] = set()
        elif isinstance(node, ast.ClassDef):
            names[node.name] = {n.name for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} | {
                t.id for n in node.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) for t in ast.walk(t)
                if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {t.id: set() for t in ast.walk(target) if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0]: set() for a in node.names}
    return names


def test_every_place_the_fact_table_cites_exists():
    cited = places()
    assert len(cited) > 40
    missing = []
    for fact, path, names in cited:
        module = SRC / "rifle" / path
        if not module.is_file():
            missing.append(f"{path} (for: {fact[:60]})")
            continue
        have = defined(module)
        for name in names:
            owner, _, attr = name.partition(".")
            if owner not in have or (attr and attr not in have[owner]):
                missing.append(f"{path}: {name} (for: {fact[:60]})")
    assert not missing, "docs/architecture.md cites what does not exist:\n" + "\n".join(missing)


def test_the_fact_table_check_reads_the_cells():
    cited = {(path, tuple(names)) for _, path, names in places()}
    assert ("keys.py", ("HISTORY", "PROBES", "DERIVED_PARAMS", "COPY_TAG", "BLOCK_ORDER", "SWEEP_RUN", "CELL_RUN",
                        "Role", "METHOD_TAGS", "DEFAULT_SELECTION", "block_metric", "parent_filter",
                        "parent_link")) in cited
    assert ("tricks/l2.py", ("L2.metrics",)) in cited and ("data/__init__.py", ("BAD_IMAGES",)) in cited
    assert "metrics" in defined(SRC / "rifle" / "tricks" / "l2.py")["L2"]
    assert "nope" not in defined(SRC / "rifle" / "keys.py")
    assert "TRICKS" in defined(SRC / "rifle" / "tricks" / "__init__.py")  # a re-export counts
