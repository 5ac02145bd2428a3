"""Every published number can be recomputed: each table under docs/study ships its per-seed CSV, and the tables
rebuilt from those CSVs (rifle.evidence.tables.from_seeds_csv, rifle.evidence.regime.table) equal the published
ones, as do the tables the results pages and the README quote."""
import re

import pandas as pd
import pytest

from conftest import ROOT
from rifle import plan as P
from rifle.evidence import regime
from rifle.evidence.tables import from_seeds_csv

STUDY = ROOT / "docs" / "study"
GROUPS = sorted(p.parent for p in (STUDY / "offline-study").glob("*/seeds.csv"))


def table_rows(text: str) -> list[str]:
    """The data rows of every Markdown table in `text` (header and rule lines left out)."""
    rows = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    return [r for r in rows if not set(r) <= set("|-: ") and re.search(r"\d", r)]


def rebuilt_study() -> dict[str, str]:
    return {g.name: from_seeds_csv(g / "seeds.csv", reference="rifle")["markdown"] for g in GROUPS}


def rebuilt_regime() -> str:
    methods = list(P.load(str(ROOT / "configs" / "campaign" / "regime.yaml")).methods)
    return regime.markdown(regime.table(pd.read_csv(STUDY / "regime" / "regime_seeds.csv"), methods))


def test_the_published_study_tables_rebuild_from_their_csvs():
    assert [g.name for g in GROUPS] == ["authors", "validated"]
    for name, markdown in rebuilt_study().items():
        assert markdown == (STUDY / "offline-study" / name / "results.md").read_text(), name
    csv = pd.read_csv(GROUPS[0] / "seeds.csv")
    assert {"method", "protocol", "seed", "dataset", "test_acc", "test_acc_last", "selected_epoch"} <= set(csv)
    assert csv["test_acc"].between(0, 1).all()  # fractions, as MLflow holds them


def test_the_published_regime_table_rebuilds_from_its_csv():
    assert rebuilt_regime() == (STUDY / "regime" / "regime.md").read_text()
    csv = pd.read_csv(STUDY / "regime" / "regime_seeds.csv")
    assert {"method", "protocol", "seed", "dataset", "test_acc", "test_acc_last", "selected_epoch", "env.torch",
            "env.device"} <= set(csv)
    plan = P.load(str(ROOT / "configs" / "campaign" / "regime.yaml"))
    assert len(csv) == len(plan.cells()) and csv["test_acc"].between(0, 1).all()  # one row per cell of the plan


@pytest.mark.parametrize("page", ["docs/results/offline-study.md", "docs/results/regime.md", "README.md"])
def test_every_table_row_the_results_pages_quote_is_a_rebuilt_one(page):
    quoted = table_rows((ROOT / page).read_text())
    rebuilt = set(table_rows("\n".join([*rebuilt_study().values(), rebuilt_regime()])))
    numeric = [r for r in quoted if re.search(r"\d+\.\d", r)]
    assert numeric, f"{page} quotes no table"
    assert [r for r in numeric if r not in rebuilt] == []
