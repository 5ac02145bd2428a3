"""The CLI reference, generated at build time from the real parsers (mkdocs-gen-files runs this file).

One page per verb of `rifle.commands.VERBS` with its parser's `format_help()`, and `rifle --help` on the index
page, so the pages can never disagree with the program. `pages()` makes them (tests/test_docs.py compares them
with the parsers); run under mkdocs, the file writes them into the site as reference/cli/*.md.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if str(SRC) not in sys.path:  # this checkout's parsers, whatever else is installed
    sys.path.insert(0, str(SRC))

WIDTH = 100  # columns argparse wraps the help at: the same pages on every machine and terminal
FOLDER = "reference/cli"
# verb -> the page that explains it (title, path relative to a CLI page)
GUIDE = {
    "train": ("Training runs", "../../concepts/training.md"),
    "sweep": ("Sweeps and tuned comparisons", "../../concepts/sweeps.md"),
    "campaign": ("Campaigns", "../../concepts/campaigns.md"),
    "compare": ("Compare the tuned methods", "../../concepts/sweeps.md#compare-the-tuned-methods"),
    "report": ("Evidence", "../../concepts/evidence.md"),
    "preflight": ("Before your first GPU campaign", "../../how-to/first-gpu-campaign.md"),
}


@contextlib.contextmanager
def columns(width: int = WIDTH):
    """argparse wraps at $COLUMNS (else the terminal's width): fix it while the help is formatted."""
    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before


def help_text(verb: str) -> str:
    """`rifle VERB --help`, as the verb's own parser prints it (`rifle --help` for verb "")."""
    from rifle import commands
    if not verb:
        return commands.usage() + "\n"
    with columns():
        return importlib.import_module(f"rifle.commands.{verb}").parser().format_help()


def block(text: str) -> str:
    return "```text\n" + text.rstrip("\n") + "\n```\n"


def pages() -> dict[str, str]:
    """{path under docs/: markdown}: the index (`rifle --help`) and a page per verb."""
    from rifle.commands import VERBS
    rows = "\n".join(f"| [`rifle {verb}`]({verb}.md) | {text} |" for verb, text in VERBS.items())
    out = {f"{FOLDER}/index.md": (
        "# The `rifle` command\n\n"
        "One program, a verb per task; `python -m rifle VERB` is the same where the console script is not on PATH. "
        "Every verb takes its options as `--name value`, trainer options included (`rifle campaign --epochs 40`). "
        "These pages are generated from the parsers when the site is built.\n\n"
        "| verb | what it does |\n|---|---|\n" + rows + "\n\n"
        "`rifle --help`:\n\n" + block(help_text("")))}
    for verb, text in VERBS.items():
        out[f"{FOLDER}/{verb}.md"] = (
            f"# rifle {verb}\n\n{text[0].upper() + text[1:]}. Guide: [{GUIDE[verb][0]}]({GUIDE[verb][1]}).\n\n"
            f"`rifle {verb} --help`:\n\n" + block(help_text(verb)))
    return out


def write() -> None:
    import mkdocs_gen_files
    for path, text in pages().items():
        with mkdocs_gen_files.open(path, "w") as f:
            f.write(text)
        mkdocs_gen_files.set_edit_path(path, "gen_cli.py")


if __name__ == "<run_path>":  # how mkdocs-gen-files runs its scripts (runpy.run_path)
    write()
