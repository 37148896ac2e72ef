"""The README documents what the code does: every setting, and the CI test command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from pydantic import SecretStr

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `([^`]*)` \|", README, flags=re.MULTILINE))
    fields = Settings.model_fields
    assert set(rows) == {name.upper() for name in fields}
    for name, field in fields.items():
        default = field.default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if default is not None:
            assert rows[name.upper()] == str(default), name


def test_ci_runs_the_readme_test_command() -> None:
    awk = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    program = re.search(r"awk '([^']+)' README.md", awk)
    assert program, ".ci/run no longer extracts the command from README.md"
    command = subprocess.run(
        ["awk", program.group(1), "README.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert command == "make test"
