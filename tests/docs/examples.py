"""The code examples of the docs site and the README, as the docs session runs them.

An example is a fenced `python` or `bash`/`sh` block in README.md, in a page under docs/, or in a
file a page includes (`--8<-- "path"`). The line before a fence may say how it runs:

- `<!-- docs-test: skip: REASON -->`: not run, for the REASON given (it must give one);
- `<!-- docs-test: serves PORT -->`: it starts a server on PORT, which must serve a Generate call
  and then stop on SIGTERM.

A page that includes only a section of a file (`--8<-- "path:section"`, a table) includes no example.

Every other example runs as written, against a server on the embedded default model at
`localhost:50051`, and must exit 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
RUN_LANGUAGES = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*$")
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"$')
ANNOTATION = re.compile(r"^<!-- docs-test: (?P<kind>skip|serves)(?::? (?P<arg>.*?))? -->$")


@dataclass(frozen=True)
class Example:
    path: Path  # where the block is written
    line: int  # its opening fence, 1-based
    language: str  # "python" or "bash"
    code: str
    skip: str | None = None  # why it does not run
    serves: int | None = None  # the port the server it starts listens on

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def sources() -> list[Path]:
    """README.md, every page of the docs, and the files the pages include, in that order."""
    pages = sorted(DOCS.rglob("*.md"))
    included = [
        ROOT / match.group("path")
        for page in pages
        for line in page.read_text(encoding="utf-8").splitlines()
        if (match := INCLUDE.match(line)) and not match.group("section")
    ]
    return [ROOT / "README.md", *pages, *included]


def examples(path: Path) -> list[Example]:
    """The runnable-language blocks of one Markdown file."""
    found = []
    lines = path.read_text(encoding="utf-8").splitlines()
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start = index
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
        language = RUN_LANGUAGES.get(match.group("lang"))
        if language is not None:
            if match.group("indent"):
                raise ValueError(f"{path}:{start + 1}: an indented example would not be run; unindent it")
            previous = lines[start - 1] if start else ""
            annotation = ANNOTATION.match(previous.strip())
            skip = serves = None
            if annotation and annotation.group("kind") == "skip":
                skip = (annotation.group("arg") or "").strip()
                if not skip:
                    raise ValueError(f"{path}:{start + 1}: a skipped example must say why")
            elif annotation:
                serves = int(annotation.group("arg"))
            elif previous.startswith("<!-- docs-test"):
                raise ValueError(f"{path}:{start}: not a docs-test annotation: {previous!r}")
            code = "\n".join(lines[start + 1 : end]) + "\n"
            found.append(Example(path, start + 1, language, code, skip, serves))
        index = end + 1
    return found


def collect() -> list[Example]:
    """Every example, in source order."""
    return [example for path in sources() for example in examples(path)]
