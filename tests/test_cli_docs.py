"""docs/configuration.md is generated from the CLI parser (``python tools/cli_docs.py``) and
must stay in step with it: every flag of every subcommand is documented, with a meaning."""
from __future__ import annotations

import re
from pathlib import Path

from onenip_ray.cli import build_parser
from tools.cli_docs import DOC, main, option_strings, render, subcommands

REPO = Path(__file__).resolve().parents[1]


def _flag_names(row: str) -> list[str]:
    """The flags named in a table row's first cell (``| `--out`, `--output` `OUT` | …``)."""
    return re.findall(r"`(-[^`]+)`", row.split("|")[1])


def test_configuration_md_is_generated_from_the_current_parser():
    assert DOC == REPO / "docs" / "configuration.md"
    assert DOC.read_text() == render(), "docs/configuration.md is out of date: run `python tools/cli_docs.py`"
    assert main(["--check"]) == 0


def test_every_flag_of_every_subcommand_is_documented_with_a_meaning():
    parser = build_parser()
    text = DOC.read_text()
    flags = option_strings(parser)
    assert set(flags) >= {"info", "train", "evaluate", "score", "serve", "report"}
    for command, options in flags.items():
        section = text.split(f"## onenip {command}\n", 1)[1].split("\n## ", 1)[0]
        for option in options:
            rows = [line for line in section.splitlines() if line.startswith("| `-") and option in _flag_names(line)]
            assert len(rows) == 1, f"onenip {command} {option} is not documented"
            assert rows[0].rstrip(" |").rsplit("|", 1)[1].strip(), f"onenip {command} {option} has no help text"
    for command, (help_, _) in subcommands(parser).items():
        assert help_, f"onenip {command} has no help"


def test_check_mode_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert main(["--check", "--out", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert main(["--out", str(stale)]) == 0 and stale.read_text() == render()
