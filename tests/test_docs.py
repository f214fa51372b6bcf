"""README.md and docs/ say what runs: every command names files that exist and options its program's parser accepts,
every local link resolves, every Python block compiles, and the README's Python quick start runs as written."""

import argparse
import importlib
import re
import shlex
from pathlib import Path

import huggingface_hub
import pytest
from repo_scripts import ROOT, load_script

from speechllm.data import read_jsonl
from speechllm.metrics import error_rate

PAGES = [ROOT / "README.md", ROOT / "examples" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
INLINE = re.compile(r"(?<!`)`([^`\n]+(?:\n[^`\n]+)*)`(?!`)")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SCRIPTS_TABLE = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
ENTRY_POINTS = dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"', SCRIPTS_TABLE, re.MULTILINE))  # no tomllib on 3.10
REPO_FOLDERS = ("examples/", "bench/", "speechllm/", "tests/", "docs/", ".ci/")
NOT_OURS = {"pip", "git", "cd", "whisper", "ls", "cat"}  # commands of other programs: nothing of ours to check
# The README's Python quick start on the shipped model; the clip is one the shipped demo reads (docs/results.md).
QUICK_START_MAX_WER = 0.5


def page_text(page: Path) -> str:
    return page.read_text()


def shell_blocks(page: Path) -> list[str]:
    return [body for lang, body in FENCED.findall(page_text(page)) if lang in ("bash", "sh", "shell")]


def python_blocks(page: Path) -> list[str]:
    return [body for lang, body in FENCED.findall(page_text(page)) if lang == "python"]


def inline_spans(page: Path) -> list[str]:
    return INLINE.findall(FENCED.sub("", page_text(page)))


def commands(text: str) -> list[list[str]]:
    """The commands of a shell snippet as argument lists: continuations joined, comments dropped, optional
    [--option value] parts kept as options, one list per command of a &&, ; or | chain."""
    text = text.replace("\\\n", " ").replace("[", " ").replace("]", " ")
    found = []
    for line in text.splitlines():
        words, command = shlex.split(line, comments=True), []
        for word in words + [";"]:
            if word in ("&&", ";", "|", "||"):
                found += [command] if command else []
                command = []
            else:
                command.append(word)
    return found


def program(words: list[str]) -> tuple[str | None, list[str]]:
    """What a command runs (a repository path, an entry point or "-m module"), and its arguments; None: not ours."""
    while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]) or words[0] in ("/usr/bin/time", "-v")):
        words = words[1:]  # environment variables, and time's own
    if not words or words[0] in NOT_OURS:
        return None, []
    head, rest = words[0], words[1:]
    if head in ENTRY_POINTS:
        return head, rest
    if head == "torchrun":
        while rest and rest[0].startswith("-"):  # torchrun's own options, all written --name=value
            rest = rest[1:]
    elif head == "python":
        if rest[:1] == ["-m"]:
            return (None, []) if rest[1:2] in ([], ["pytest"]) else ("-m " + rest[1], rest[2:])
    else:
        return head, rest
    return (rest[0], rest[1:]) if rest and not rest[0].startswith("-") else (None, [])


def looks_like_repo_path(word: str) -> bool:
    """A path in the repository (a script, a shipped model or clip, a DeepSpeed config), not one the reader brings."""
    return "$" not in word and (
        word.startswith(REPO_FOLDERS) or re.fullmatch(r"[\w.-]+\.(py|sh)|ds_config\w*\.json", word)
    )


class _Parsed(BaseException):  # not an Exception: no command line's error handling may swallow it
    def __init__(self, parser):
        self.parser = parser


_parsers = {}


def accepted_options(head: str, monkeypatch) -> set[str]:
    """The option strings of the parser the program builds, caught as it starts parsing (nothing else runs)."""
    if head not in _parsers:
        if head in ENTRY_POINTS:
            module, name = ENTRY_POINTS[head].split(":")
            entry = getattr(importlib.import_module(module), name)
        elif head.startswith("-m "):
            entry = importlib.import_module(head[3:]).main
        else:
            script = load_script(head)
            entry = getattr(script, "main", None) or script.command_line
            if "parse_args" not in (ROOT / head).read_text() and head not in ("train.py", "recognize.py"):
                return set()  # a script without options: any option a page gives it is wrong

        def caught(parser, *args, **kwargs):
            raise _Parsed(parser)

        with monkeypatch.context() as patch:
            patch.setattr(argparse.ArgumentParser, "parse_known_args", caught)
            patch.setattr("sys.argv", [head])
            with pytest.raises(_Parsed) as parsed:
                entry()
        _parsers[head] = set(parsed.value.parser._option_string_actions)
    return _parsers[head]


def in_repository(path: str, page: Path) -> str | None:
    """path, relative to the repository's root, where it exists there or beside the page that names it."""
    for folder in (ROOT, page.parent):
        if (folder / path).exists():
            return str((folder / path).relative_to(ROOT))
    return None


def check_command(words: list[str], page: Path, monkeypatch) -> list[str]:
    head, args = program(words)
    if head is None:
        return []
    problems = []
    if head not in ENTRY_POINTS and not head.startswith("-m "):
        head = in_repository(head, page) or head
        if not (ROOT / head).exists():
            return [f"{head}: no such file"]
    if head.startswith("-m "):
        importlib.import_module(head[3:])
    options = [word.split("=")[0] for word in args if re.match(r"--?[A-Za-z]", word)]
    if options and not head.endswith(".sh"):
        accepted = accepted_options(head, monkeypatch)
        problems += [f"{head}: no option {option}" for option in options if option not in accepted]
    problems += [
        f"{word}: no such file" for word in args if looks_like_repo_path(word) and not in_repository(word, page)
    ]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in FENCED.sub("", page_text(page)).splitlines() if line.startswith("#")}


def test_the_readme_is_a_front_page():
    lines = page_text(ROOT / "README.md").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines: the detail belongs in docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_commands_name_files_and_options_that_exist(page, monkeypatch):
    problems = []
    for block in shell_blocks(page):
        for words in commands(block):
            problems += check_command(words, page, monkeypatch)
    for span in inline_spans(page):  # commands quoted in the text, e.g. each measurement's
        try:
            words = shlex.split(span.replace("[", " ").replace("]", " "))
        except ValueError:
            continue  # not a command: prose in backticks
        head, _ = program(words)
        if head and (head in ENTRY_POINTS or head.startswith("-m ") or head.endswith((".py", ".sh"))):
            problems += check_command(words, page, monkeypatch)
    assert not problems, problems


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_links_resolve(page):
    broken = []
    for target in LINK.findall(FENCED.sub("", page_text(page))):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(target)
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(target)
    assert not broken, broken


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_python_blocks_compile(page):
    for block in python_blocks(page):
        compile(block, str(page), "exec")


def test_the_readme_python_quick_start_runs_as_written(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would: offline
    (quick_start,) = python_blocks(ROOT / "README.md")
    exec(compile(quick_start, "README.md", "exec"), {})
    first, *details = capsys.readouterr().out.splitlines()
    references = {e.key: e.txt for e in read_jsonl(str(ROOT / "examples" / "audio" / "data.jsonl"))}
    assert error_rate([references["LJ001-0080"]], [first])["wer"] < QUICK_START_MAX_WER, first
    (detail,) = details  # text, finished, avg_logprob of the one clip asked for with return_details
    *words, finished, avg_logprob = detail.split()
    assert error_rate([references["LJ001-0107"]], [" ".join(words)])["wer"] < QUICK_START_MAX_WER, detail
    assert finished == "True" and float(avg_logprob) < 0
