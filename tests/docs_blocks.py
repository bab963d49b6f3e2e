"""The shell examples of README.md and docs/*.md as data, for tests/test_docs.py.

Every fenced ``bash``/``sh``/``shell``/``console`` block carries a classification in an HTML comment
on the line just before its fence (blank lines between are allowed):

    <!-- docs-test: skip (REASON) -->                  never run; REASON is shown by pytest
    <!-- docs-test: run -->                            run exactly as written
    <!-- docs-test: run, train with FLAGS -->          run; FLAGS are appended to every `onenip train`
                                                       and `jobs/train.py` command of the block

The last form is the one way a test shortens what a user types: training in the docs uses the real
recipe (minutes to hours), the test appends e.g. ``--epochs 1 --image-size 64`` (later flags win).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHELL_LANGUAGES = ("bash", "sh", "shell", "console")
FENCE = re.compile(r"^(?P<indent>\s*)```(?P<lang>[\w-]*)\s*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
SKIP = re.compile(r"^skip \((?P<reason>.+)\)$")
RUN = re.compile(r"^run(?:, train with (?P<flags>\S.*))?$")
TRAIN_COMMAND = re.compile(r"\bonenip train\b|\bjobs/train\.py\b")
TRAILING_COMMENT = re.compile(r"^(?P<command>.*?)(?P<comment>\s+#[^'\"]*)?$")


@dataclass(frozen=True)
class Block:
    """One shell block: where it is, its text (dedented to the fence) and its classification."""

    path: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    text: str
    directive: str | None  # the comment's body, None when the block is unclassified

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"

    @property
    def skip_reason(self) -> str | None:
        match = SKIP.match(self.directive or "")
        return match["reason"] if match else None

    @property
    def train_flags(self) -> str:
        match = RUN.match(self.directive or "")
        return (match["flags"] or "") if match else ""

    @property
    def is_valid(self) -> bool:
        return bool(SKIP.match(self.directive or "") or RUN.match(self.directive or ""))


def doc_files(repo: Path = REPO) -> list[Path]:
    """README.md and every docs/*.md, in a stable order."""
    return [repo / "README.md", *sorted((repo / "docs").glob("*.md"))]


def _directive_before(lines: list[str], index: int) -> str | None:
    """The docs-test comment on the last non-blank line before ``lines[index]``, if any."""
    for previous in reversed(lines[:index]):
        if previous.strip():
            match = DIRECTIVE.match(previous)
            return match["body"] if match else None
    return None


def shell_blocks(path: Path, repo: Path = REPO) -> list[Block]:
    """The shell blocks of one markdown file (blocks of other or no language are stepped over)."""
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].strip() == "```")
        if opening["lang"] in SHELL_LANGUAGES:
            indent = len(opening["indent"])
            text = "\n".join(line[indent:] for line in lines[index + 1:end]) + "\n"
            blocks.append(Block(str(path.relative_to(repo)), index + 1, text, _directive_before(lines, index)))
        index = end + 1
    return blocks


def all_blocks(repo: Path = REPO) -> list[Block]:
    return [block for path in doc_files(repo) for block in shell_blocks(path, repo)]


def _logical_commands(text: str) -> list[list[str]]:
    """Physical lines grouped into commands: a line ending in a backslash continues on the next."""
    commands, current = [], []
    for line in text.splitlines():
        current.append(line)
        if not line.rstrip().endswith("\\"):
            commands.append(current)
            current = []
    return commands + ([current] if current else [])


def with_train_flags(text: str, flags: str) -> str:
    """``text`` with ``flags`` appended to each training command (before a trailing ``# comment``)."""
    if not flags:
        return text
    out = []
    for command in _logical_commands(text):
        if TRAIN_COMMAND.search(" ".join(command)):
            parts = TRAILING_COMMENT.match(command[-1])
            command = [*command[:-1], f"{parts['command']} {flags}{parts['comment'] or ''}"]
        out.extend(command)
    return "\n".join(out) + "\n"


CLI_CALL = re.compile(r"\bonenip (?P<command>[a-z][a-z-]*)|\bjobs/(?P<job>[a-z_]+)\.py\b")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND_END = re.compile(r"\s#|\s\|\s|;|&&")


def cli_calls(text: str) -> list[tuple[str, list[str]]]:
    """``(subcommand, flags)`` of every ``onenip SUB …`` and ``jobs/SUB.py …`` call in a block (job
    scripts take the flags of their subcommand; a comment, pipe or ``;`` ends a call)."""
    calls = []
    for command in _logical_commands(text):
        line = " ".join(part.rstrip().rstrip("\\") for part in command)
        for match in CLI_CALL.finditer(line):
            rest = line[match.end():]
            rest = rest[:end.start()] if (end := COMMAND_END.search(rest)) else rest
            subcommand = match["command"] or match["job"].replace("_", "-")
            calls.append((subcommand, FLAG.findall(rest)))
    return calls
