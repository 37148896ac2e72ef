"""The docs say what the code does: every setting (docs/configuration.md), the CI test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pydantic import SecretStr

from app.core.config import Settings
from tools.configuration_table import render, table_in_page

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    """docs/configuration.md holds exactly the table generated from ``Settings``."""
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert table_in_page(page) == render(), (
        "docs/configuration.md is out of date: run .venv/bin/python -m tools.configuration_table "
        "--write"
    )
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| ([^|]*) \|", page, flags=re.MULTILINE))
    fields = Settings.model_fields
    assert set(rows) == {name.upper() for name in fields}
    for name, field in fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if default is not None and default != "":
            assert rows[name.upper()] == f"`{default}`", name


def test_readme_links_the_configuration_page_and_stays_small() -> None:
    assert "(docs/configuration.md)" in README
    assert len(README.encode()) <= 16 * 1024


def test_ci_runs_the_readme_test_command() -> None:
    awk = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    program = re.search(r"awk '([^']+)' README.md", awk)
    assert program, ".ci/run no longer extracts the command from README.md"
    command = subprocess.run(
        ["awk", program.group(1), "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert command == "make test"
