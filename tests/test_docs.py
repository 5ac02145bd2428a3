"""The docs a newcomer reads: the README stays short and keeps the commands CI and the quick start run, the CLI
pages are the parsers' own --help, and the site builds with `mkdocs build --strict` (every link and anchor)."""
import importlib
import importlib.util
import re
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT, subprocess_env
from rifle.commands import VERBS, usage

README = ROOT / "README.md"
QUICK_START = ("bash .ci/install && . .venv/bin/activate && mlflow run . --env-manager local",
               "bash .ci/install && .venv/bin/python -m pytest -q")


def gen_cli():
    """docs/gen_cli.py as a module (run by mkdocs-gen-files, it writes the pages; imported, it only makes them)."""
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def code_block(page: str) -> str:
    blocks = re.findall(r"```text\n(.*?)```", page, re.S)
    assert len(blocks) == 1, page
    return blocks[0]


def test_readme_is_short_and_keeps_the_quick_start_and_the_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    for command in QUICK_START:
        assert command in text, command
    # .ci/run runs exactly the README's test command: its last line, verbatim, on a line of the README
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command == ".venv/bin/python -m pytest -q"
    assert any(line.startswith(ci_command) for line in text.splitlines()), ci_command
    assert "python -m rifle." not in text and "-m rifle.train" not in text  # the old module commands are gone


def test_readme_links_into_the_docs_resolve():
    links = re.findall(r"\]\(((?:docs/)[^)#]+)(?:#[^)]*)?\)", README.read_text())
    assert len(links) >= 10
    for link in links:
        assert (ROOT / link).is_file(), link


def test_cli_pages_are_the_parsers_help(monkeypatch):
    gen = gen_cli()
    monkeypatch.setenv("COLUMNS", str(gen.WIDTH))
    pages = gen.pages()
    assert set(pages) == {f"{gen.FOLDER}/index.md"} | {f"{gen.FOLDER}/{verb}.md" for verb in VERBS}
    assert code_block(pages[f"{gen.FOLDER}/index.md"]) == usage() + "\n"
    for verb in VERBS:
        parser = importlib.import_module(f"rifle.commands.{verb}").parser()
        assert code_block(pages[f"{gen.FOLDER}/{verb}.md"]) == parser.format_help(), verb
        assert f"usage: rifle {verb}" in parser.format_help()
    monkeypatch.setenv("COLUMNS", "200")  # the pages do not follow the terminal of whoever builds the site
    assert gen.pages() == pages


def test_every_cli_page_is_in_the_nav():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]
    flat = repr(nav)
    for page in gen_cli().pages():
        assert page in flat, page


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    for package in ("mkdocs", "material", "mkdocstrings", "mkdocs_gen_files"):
        pytest.importorskip(package, reason="the docs extra: pip install -e '.[docs]'")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], cwd=ROOT,
                          env=subprocess_env(DISABLE_MKDOCS_2_WARNING="true", NO_MKDOCS_2_WARNING="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for verb in VERBS:  # the generated CLI pages made it into the site
        assert f"usage: rifle {verb}" in (site / "reference" / "cli" / verb / "index.html").read_text(), verb
    api = (site / "reference" / "api" / "plan" / "index.html").read_text()
    assert "check_budget" in api  # mkdocstrings rendered the docstrings
    for image in ("mlflow_ui.png", "study/regime.png", "study/mechanism_digits.png"):
        assert (site / image).is_file(), image
