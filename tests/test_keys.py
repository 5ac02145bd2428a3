"""Every MLflow name is written in rifle.keys only: the other modules import it, so a writer and its readers cannot
drift apart. Fast: the source is parsed (ast), nothing of rifle runs but keys and config."""
import ast
import re
from pathlib import Path

from rifle import config, keys

SRC = Path(keys.__file__).parent
# Tag namespaces (the list): a literal of one outside keys is a name written twice.
NAMESPACE = re.compile(r"(?<![\w.])((sweep|campaign|cell|compare|env)\.[A-Za-z_]|mlflow\.source|mlflow\.parentRunId|"
                       r"rifle\.report|selected_before|finished_earlier)")
# Literals equal to a name of keys that mean something else where they stand: the checkpoint's own record of the
# best epoch (a file format of its own, read back by resume; the metrics are logged from it).
ELSEWHERE = {("trainer.py", "best_val_acc"), ("trainer.py", "best_epoch")}


def of_a_namespace(text: str) -> bool:
    """A literal of a tag namespace: it starts with one, names one in backticks (a search filter), or is one word
    holding one. Prose that mentions a name (an option's help: "(tag env.threads)") is not one."""
    words = [text, *re.findall(r"`([^`]*)`", text)]
    return any(NAMESPACE.match(w) for w in words) or (not re.search(r"\s", text) and bool(NAMESPACE.search(text)))


def key_names() -> set[str]:
    """The names keys defines (its module-level strings, in tuples and TreeTags too), but prefixes and what an
    option's name or value spells too (`tricks` is an option and a tag; the legacy selection `best_val`, a value)."""
    found = set()

    def add(value):
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, tuple):
            for v in value:
                add(v)
    for name, value in vars(keys).items():
        if name.isupper():
            add(value)
    fields = config.all_fields()
    options = set(fields) | {c for _, f in fields.values() for c in f.metadata["choices"] or ()}
    return {n for n in found if not n.endswith(("/", ".", "_resolved")) and n not in options}


def docstrings(tree) -> set[int]:
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    return {id(n.body[0].value) for n in nodes if n.body and isinstance(n.body[0], ast.Expr)
            and isinstance(n.body[0].value, ast.Constant)}


def keys_aliases(tree) -> tuple[set[str], set[str]]:
    """(names imported from rifle.keys, aliases of the module) in a parsed module."""
    names, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[-1] == "keys":
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules |= {a.asname or a.name for a in node.names if a.name == "keys"}
    return names, modules


def strays(path: Path, root: Path = SRC) -> list[str]:
    tree = ast.parse(path.read_text())
    skip, names, found = docstrings(tree), key_names(), []
    imported, modules = keys_aliases(tree)

    def from_keys(node) -> bool:
        return (isinstance(node, ast.Name) and node.id in imported) or (
            isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules)

    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if of_a_namespace(node.value):
                found.append(f"{where}: {node.value!r}")
            elif node.value in names and (path.name, node.value) not in ELSEWHERE:
                found.append(f"{where}: {node.value!r} is keys' name")
        elif isinstance(node, ast.JoinedStr):
            # a name made of a keys name and a value (f"{WEIGHT}{block}"): keys' helpers make those; prose is free
            text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
            if not re.search(r"\s", text) and any(isinstance(v, ast.FormattedValue) and from_keys(v.value)
                                                  for v in node.values):
                found.append(f"{where}: {ast.unparse(node)} builds a name: use a helper of rifle.keys")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and (from_keys(node.left)
                                                                              or from_keys(node.right)):
            found.append(f"{where}: {ast.unparse(node)} builds a name: use a helper of rifle.keys")
    return found


def test_no_module_but_keys_spells_an_mlflow_name():
    found = [s for p in sorted(SRC.rglob("*.py")) if p != Path(keys.__file__) for s in strays(p)]
    assert not found, "names written outside rifle.keys:\n" + "\n".join(found)


def test_the_check_finds_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""sweep.state in a docstring is prose."""\nfrom rifle import keys as K\n'
                   'a = {"sweep.state": 1}\nb = f"tags.`mlflow.parentRunId` = {x}"\nc = "val_acc"\n'
                   'd = f"{K.WEIGHT}{block}"\ne = K.GRAD + block\nf = f"tag {K.COPY_TAG} says so"\n')
    found = sorted(strays(bad, tmp_path), key=lambda line: int(line.split(":")[1]))
    assert [line.split(":")[1] for line in found] == ["3", "4", "5", "6", "7"], found


def test_keys_imports_nothing_and_its_names_are_unique():
    tree = ast.parse(Path(keys.__file__).read_text())
    assert [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] == ["__future__", "typing"]
    names = [v for k, v in vars(keys).items() if k.isupper() and isinstance(v, str)]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_helpers_spell_the_names_stores_hold():
    """Names built from a prefix are the ones older versions wrote (stores keep being read)."""
    assert keys.block_metric(keys.WEIGHT, "blocks.3") == "weight_dist/blocks.3"
    assert keys.parent_link("sweep.role") == "sweep.parent_run_id"
    assert keys.parent_link(keys.CELL_ROLE) == "cell.parent_run_id"
    assert keys.sweep_plot("optimization_history.png") == "sweep.plot.optimization_history.png"
    assert (keys.best_param("lr"), keys.fixed_param("epochs"), keys.override_param("epochs")) == (
        "best.lr", "fixed.epochs", "override.epochs")
    assert keys.best_trial_tag("rifle.l2sp") == "best_trial.rifle.l2sp"
    assert keys.method_metric("test_acc_mean", "rifle") == "test_acc_mean/rifle"
    assert keys.parent_filter("abc") == "tags.`mlflow.parentRunId` = 'abc'"
    assert keys.resolved_param("epochs") == "epochs_resolved" == keys.LEGACY_EPOCHS
    assert keys.SWEEP_RUN == ("sweep.state", "sweep.reason", "sweep.resumed_from_epoch", "sweep.optuna_trials")
    assert keys.CELL_RUN.state == "campaign.state" and keys.Role.CELL == "seed"
    assert keys.METHOD_TAGS == ("cell.method", "compare.method")
