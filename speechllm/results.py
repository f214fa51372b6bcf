"""Recognition results (and the example scripts' cached n-best and answers): saved as each batch is decoded (a part
file a process), read back by a rerun so it skips what is done, and written whole at the end, in input order, as txt,
tsv or jsonl."""

import glob
import json
import os

from .errors import InputError
from .files import write_atomically

FORMATS = ("txt", "tsv", "jsonl")
TSV_COLUMNS = ("key", "text", "duration", "decoding_seconds", "finished")


class ResultsError(InputError):
    """Saved partial results that do not belong to this run."""


def result_format(path: str | None, explicit: str | None) -> str:
    """The explicit format, else the result file's suffix (.tsv, .jsonl), else txt."""
    if explicit:
        return explicit
    suffix = os.path.splitext(path or "")[1].lstrip(".").lower()
    return suffix if suffix in FORMATS else "txt"


def format_lines(rows: list[dict], fmt: str) -> list[str]:
    """txt: key<TAB>text (WeST's and Kaldi's); tsv: a header and TSV_COLUMNS; jsonl: each row as it is."""
    if fmt == "jsonl":
        return [json.dumps(row, ensure_ascii=False) for row in rows]
    if fmt == "tsv":
        return ["\t".join(TSV_COLUMNS)] + ["\t".join(str(one_line(row[c])) for c in TSV_COLUMNS) for row in rows]
    return [f"{row['key']}\t{one_line(row['text'])}" for row in rows]


def one_line(value):
    return " ".join(value.split()) if isinstance(value, str) else value


def write_whole(path: str, lines: list[str]):
    """The lines written whole or not at all (files.write_atomically): a failed run leaves no half-written result."""

    def write(temporary: str):
        with open(temporary, "w", encoding="utf-8") as file:
            file.writelines(line + "\n" for line in lines)

    write_atomically(path, write)


def check_writable(result_path: str):
    """The result file's folder is there, or made, and can be written to: found before any model loads, not after
    the decoding."""
    folder = os.path.dirname(os.path.abspath(result_path))
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ResultsError(f"--result_path {result_path}: a file stands where its folder would be") from None
    except OSError as error:
        raise ResultsError(f"--result_path {result_path}: cannot make its folder ({error.strerror})") from None
    if not os.access(folder, os.W_OK):
        raise ResultsError(f"--result_path {result_path}: {folder} cannot be written to")


class PartialResults:
    """RESULT_PATH.part<N>: process N's results, a JSON line each, appended and flushed as each batch is decoded.

    The first line holds the settings that shape the results (model, prompt, decoding); a rerun reads every part
    file back and skips the keys they hold, and refuses files written with other settings rather than mix them.
    """

    def __init__(self, result_path: str, process_index: int, settings: dict):
        self.result_path = result_path
        self.path = f"{result_path}.part{process_index}"
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file

    def files(self) -> list[str]:
        return sorted(glob.glob(glob.escape(self.result_path) + ".part[0-9]*"))

    def done(self) -> dict[str, dict]:
        """key -> result row, from every process's part file (a key saved twice: the later row)."""
        return {row["key"]: row for row in self.rows()}

    def rows(self) -> list[dict]:
        """Every saved row, from every process's part file, in the order they were saved."""
        rows = []
        for file in self.files():
            with open(file, encoding="utf-8") as lines:
                saved = _json_line(lines.readline())
                if saved is None:
                    continue  # killed before its first batch was written
                if saved.get("settings") != self.settings:
                    raise ResultsError(
                        f"{file}: results of a run with other settings ({self._changes(saved)}); "
                        "delete it to start afresh"
                    )
                for line in lines:
                    row = _json_line(line)
                    if row is not None:  # a line cut short by a kill is decoded again
                        rows.append(row)
        return rows

    def add(self, rows: list[dict]):
        lines = [json.dumps(row, ensure_ascii=False) + "\n" for row in rows]
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a+", encoding="utf-8") as file:
            file.seek(0)
            if _json_line(file.readline()) is None:  # new, or torn before its first batch: start it
                file.truncate(0)
                lines.insert(0, json.dumps({"settings": self.settings}) + "\n")
            elif not _ends_with_newline(self.path):
                lines.insert(0, "\n")  # a line torn by a kill: end it, so the next one stands alone
            file.writelines(lines)

    def remove(self):
        for file in self.files():
            os.remove(file)

    def _changes(self, saved: dict) -> str:
        saved = saved.get("settings") or {}
        names = sorted(saved.keys() | self.settings.keys())
        shown = lambda settings, k: repr(settings[k]) if k in settings else "(none)"  # noqa: E731
        return ", ".join(
            f"{k}: {shown(saved, k)} there, {shown(self.settings, k)} now"
            for k in names
            if k not in saved or k not in self.settings or saved[k] != self.settings[k]
        )


def _json_line(line: str) -> dict | None:
    """A whole line's JSON object, or None for an empty, torn or garbled one."""
    if not line.endswith("\n"):
        return None
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _ends_with_newline(path: str) -> bool:
    with open(path, "rb") as file:
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"
