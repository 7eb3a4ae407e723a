"""The README stays a front page: short, no overlong table cells, links that lead somewhere, and the test
command CI runs. Checks README.md and docs/*.md as text; nothing here runs the commands."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
MAX_README_LINES = 300  # README.md has fewer lines than this
MAX_CELL_CHARS = 300  # longer explanations go under the table
MAX_IMAGE_BYTES = 100_000  # pictures in docs/

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\\]|\\.)*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+\1")


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of everything outside fenced code blocks."""
    out, fenced = [], False
    for number, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((number, line))
    return out


def table_cells(line: str) -> list[str]:
    """The cells of a Markdown table row; a `|` inside a code span or escaped does not split."""
    cells, cell, ticks, i = [], "", 0, 0
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            cell += body[i:i + 2]
            i += 2
            continue
        if ch == "`":
            run = len(body[i:]) - len(body[i:].lstrip("`"))
            ticks = 0 if ticks == run else (run if ticks == 0 else ticks)
            cell += "`" * run
            i += run
            continue
        if ch == "|" and ticks == 0:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += ch
        i += 1
    if cell.strip():
        cells.append(cell.strip())
    return cells


def relative_links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of links and images that point into the repository."""
    out = []
    for number, line in prose_lines(text):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            target = match.group(1)
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith(("#", "//")):
                continue  # a URL (http:, mailto:, ...) or an anchor on the same page
            out.append((number, target))
    return out


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < MAX_README_LINES, (
        f"README.md has {len(lines)} lines; keep it under {MAX_README_LINES} and move detail into docs/")


def test_no_table_cell_is_too_long():
    long = []
    for path in markdown_files():
        for number, line in prose_lines(path.read_text()):
            if not line.lstrip().startswith("|"):
                continue
            long += [f"{path.relative_to(ROOT)}:{number}: {len(c)} characters: {c[:60]}..."
                     for c in table_cells(line) if len(c) > MAX_CELL_CHARS]
    assert not long, (f"table cells over {MAX_CELL_CHARS} characters (put the explanation under the table):\n"
                      + "\n".join(long))


def test_relative_links_point_to_files():
    broken = []
    for path in markdown_files():
        for number, target in relative_links(path.read_text()):
            file_part = target.split("#", 1)[0].split("?", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT)}:{number}: {target}")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def test_docs_pictures_are_small():
    big = [f"{p.relative_to(ROOT)}: {p.stat().st_size} bytes" for p in (ROOT / "docs").glob("*")
           if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp"}
           and p.stat().st_size > MAX_IMAGE_BYTES]
    assert not big, f"pictures over {MAX_IMAGE_BYTES} bytes:\n" + "\n".join(big)


def readme_commands() -> dict[str, str]:
    """The README's two commands: the `make ...` lines of its first shell block, keyed by target."""
    block = re.search(r"^## The two commands\s*\n+```(?:bash|sh)?\n(.*?)^```", README.read_text(), re.S | re.M)
    assert block, "README.md lost its '## The two commands' section with a ```bash block"
    commands = {}
    for line in block.group(1).splitlines():
        command = line.split("#", 1)[0].strip()
        if command.startswith("make "):
            commands[command.split()[1]] = command
    return commands


def ci_commands() -> list[str]:
    """The commands .ci/run executes: its lines without comments, blank lines and shell set-up."""
    out = []
    for line in CI_RUN.read_text().splitlines():
        command = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#!") else ""
        if command:
            out.append(command)
    return out


def test_readme_test_command_is_what_ci_runs():
    commands = readme_commands()
    assert set(commands) == {"demo", "test"}, f"README's two commands are {sorted(commands)}, not demo and test"
    test_command = commands["test"]
    ci = ci_commands()
    # .ci/run names the command itself (it does not parse the README): the two must stay the same line.
    assert test_command in ci, (f"README's test command {test_command!r} is not a command of "
                                f"{CI_RUN.relative_to(ROOT)} ({ci})")


def test_readme_commands_are_make_targets():
    makefile = (ROOT / "Makefile").read_text()
    for target, command in readme_commands().items():
        assert shlex.split(command) == ["make", target], command
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no '{target}' target for {command!r}"
