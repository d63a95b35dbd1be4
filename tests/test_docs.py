"""The documentation is true to the code: its examples run and its commands exist.

- Every ```python block of README.md and docs/*.md runs: the blocks of one document run in order, each
  in a fresh namespace, in a temporary folder of that document's own. A document whose blocks use a
  trained run or a scan they do not make themselves is listed in PREPARED, and its folder holds
  `runs/a` (a tiny trained run) and `scan.png` (a synthetic scan). A block preceded by
  `<!-- not-run: reason -->` is skipped (say why: a GPU, a running server ...).
- Every `hemaseg COMMAND ...` line of a ```bash / ```sh block, and every inline `hemaseg COMMAND ...`
  span, names a real command and only options that `hemaseg COMMAND --help` lists (the commands are not
  run).
- Relative links point to files that exist, and #anchors to headings there.
- README.md stays a user's guide: at most 350 lines. No document speaks of development sessions.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROSE = [*DOCS, REPO / "CHANGELOG.md", REPO / "benchmarks" / "RESULTS.md"]
README_MAX_LINES = 350
PREPARED = {"docs/service.md"}  # documents whose python blocks use runs/a and scan.png

_FENCE = re.compile(r"^```(\w*)\s*$")
_NOT_RUN = re.compile(r"<!--\s*not-run:\s*\S.*-->")


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


def code_blocks(path: Path) -> list[tuple[str, int, str, bool]]:
    """(language, first line number, code, marked not-run) of every fenced block."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        lang, start = m.group(1).lower(), i
        j = i + 1
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        before = [ln for ln in lines[:start] if ln.strip()][-1:]
        not_run = bool(before) and bool(_NOT_RUN.search(before[0]))
        blocks.append((lang, start + 2, "\n".join(lines[start + 1:j]), not_run))
        i = j + 1
    return blocks


# ------------------------------------------------------------------------------------- python blocks


@pytest.fixture(scope="module")
def prepared(tiny_run, tiny_data, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prepared")
    shutil.copytree(tiny_run, folder / "runs" / "a")
    shutil.copyfile(tiny_data / "images" / "1.png", folder / "scan.png")
    return folder


@pytest.mark.parametrize("doc", [d for d in DOCS if any(b[0] == "python" for b in code_blocks(d))], ids=_rel)
def test_python_blocks_run(doc, tmp_path, monkeypatch, request):
    work = tmp_path / "work"
    if _rel(doc) in PREPARED:
        shutil.copytree(request.getfixturevalue("prepared"), work)
    else:
        work.mkdir()
    monkeypatch.chdir(work)
    ran = 0
    for lang, line, code, not_run in code_blocks(doc):
        if lang != "python" or not_run:
            continue
        try:  # the documentation's own example, run as a reader would run it
            exec(compile(code, f"{_rel(doc)}:{line}", "exec"), {"__name__": "__doc_example__"})  # noqa: S102
        except Exception as e:
            raise AssertionError(f"the python block at {_rel(doc)}:{line} failed: "
                                 f"{type(e).__name__}: {e}") from e
        ran += 1
    assert ran


def test_a_block_marked_not_run_is_skipped(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("<!-- not-run: needs a GPU -->\n\n```python\nraise SystemExit\n```\n\n"
                   "```python\nx = 1\n```\n")
    assert [b[3] for b in code_blocks(doc)] == [True, False]


# ----------------------------------------------------------------------------------- command lines


def _options(help_text: str) -> set[str]:
    """The option strings of an argparse help text: the flags at the start of its option lines."""
    found = set()
    for line in help_text.splitlines():
        m = re.match(r"^\s{2,}(-\S.*?)(?:\s{2,}|$)", line)
        if m:
            found.update(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", m.group(1)))
    return found


@pytest.fixture(scope="module")
def cli_help() -> tuple[set[str], dict[str, set[str]]]:
    """(global options, {command: its options}), parsed from the help texts."""
    import os

    from hemaseg.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "1000"  # one line per option, so a wrapped help text is never read as one
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        commands = {name: _options(p.format_help()) for name, p in sub.choices.items()}
        return _options(parser.format_help()), commands
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def _bash_lines(code: str) -> list[str]:
    """Logical lines of a shell block: continuations joined."""
    out, cur = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def hemaseg_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `hemaseg ...` (or `-m hemaseg.cli ...`) command of a shell line."""
    tokens = shlex.split(line, comments=True)
    commands, cur = [], []
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            commands.append(cur)
            cur = []
        else:
            cur.append(t)
    commands.append(cur)
    found = []
    for cmd in commands:
        for k, t in enumerate(cmd):
            if t == "hemaseg" or t.endswith("/hemaseg"):
                if all(re.match(r"^[A-Z_][A-Z0-9_]*=", x) for x in cmd[:k]):  # only VAR=value before it
                    found.append(cmd[k + 1:])
                break
            if t == "hemaseg.cli" and k and cmd[k - 1] == "-m":
                found.append(cmd[k + 1:])
                break
    return found


def _inline_spans(text: str) -> list[str]:
    return [s for s in re.findall(r"`([^`\n]+)`", text) if s.startswith("hemaseg ")]


def command_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, shell line) of every shell block line and inline `hemaseg ...` span."""
    found = []
    for lang, line, code, _ in code_blocks(path):
        if lang in ("bash", "sh", "shell", "console"):
            found += [(line, ln) for ln in _bash_lines(code)]
    text = path.read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE)
    for span in _inline_spans(prose):
        number = text[:text.find(f"`{span}`")].count("\n") + 1
        found.append((number, span))
    return found


def check_invocation(args: list[str], global_options: set[str], commands: dict[str, set[str]]) -> list[str]:
    """What is wrong with `hemaseg ARGS`: an unknown command or options its help does not list."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] not in global_options:
            return [f"{args[i]} is not an option of hemaseg"]
        i += 1
    if i == len(args):
        return []
    command = args[i]
    if command.isupper() or command in ("...",):  # a placeholder: `hemaseg COMMAND --help`
        return []
    if command not in commands:
        return [f"no command {command!r}"]
    return [f"{command} has no option {opt}" for opt in (a.split("=", 1)[0] for a in args[i + 1:])
            if re.match(r"^--?[A-Za-z]", opt) and opt not in commands[command]]


@pytest.mark.parametrize("doc", PROSE, ids=_rel)
def test_command_lines_use_real_commands_and_options(doc, cli_help):
    global_options, commands = cli_help
    problems = []
    for number, line in command_lines(doc):
        for args in hemaseg_invocations(line):
            problems += [f"{_rel(doc)}:{number}: {p} in: {line.strip()}"
                         for p in check_invocation(args, global_options, commands)]
    assert not problems, "\n".join(problems)


def test_the_command_check_catches_what_it_should(cli_help):
    global_options, commands = cli_help
    assert "--pixel-spacing" in commands["predict"] and "--masks" in commands["measure"]
    assert "--masks" not in commands["predict"]  # only mentioned in predict's help text, not its option
    lines = ["hemaseg predict runs/a x/ --out p/ --labelme",
             "HEMASEG_API_KEY=k hemaseg serve runs/a --port 1",
             "torchrun --standalone -m hemaseg.cli tran DATA",
             "hemaseg -q check data/ && hemaseg nope"]
    found = [p for ln in lines for args in hemaseg_invocations(ln)
             for p in check_invocation(args, global_options, commands)]
    assert found == ["predict has no option --labelme", "no command 'tran'", "no command 'nope'"]


# ------------------------------------------------------------------------------------------ links


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    return {_slug(m) for m in re.findall(r"^#{1,6}\s+(.+)$", text, flags=re.MULTILINE)}


@pytest.mark.parametrize("doc", PROSE, ids=_rel)
def test_relative_links_lead_somewhere(doc):
    text = re.sub(r"^```.*?^```", "", doc.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {_rel(dest)}")
    assert not problems, f"{_rel(doc)}: " + "; ".join(problems)


# ------------------------------------------------------------------------------------- the guide


def test_the_readme_is_a_guide_not_a_notebook():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move reference text to docs/"
    text = "\n".join(lines)
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert command in text


@pytest.mark.parametrize("doc", PROSE, ids=_rel)
def test_no_development_session_is_mentioned(doc):
    # a file name is not wording: the GPU benchmark script is called gpu_session.sh
    text = doc.read_text(encoding="utf-8").replace("gpu_session.sh", "")
    hits = [ln.strip() for ln in text.splitlines() if re.search(r"session", ln, re.IGNORECASE)]
    assert not hits, hits
