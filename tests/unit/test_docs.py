"""The docs site's promises that need no server: the README's commands are nox's own, its examples
are among those the docs session runs, and the generated reference tables cover what the code
defines. (`nox -s docs` builds the site strictly and runs the examples: tests/docs/.)"""

from __future__ import annotations

import ast
import importlib.util
import re
import shlex
from pathlib import Path
from types import ModuleType

import pytest

from ..docs.examples import ROOT, collect, examples

README = ROOT / "README.md"


def reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "reference.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def nox_sessions() -> tuple[set[str], list[str]]:
    """The noxfile's session names and its default sessions, read from its source."""
    tree = ast.parse((ROOT / "noxfile.py").read_text(encoding="utf-8"))
    names = {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.decorator_list}
    defaults: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "nox.options.sessions":
            defaults = ast.literal_eval(node.value)
    return names, defaults


def test_readme_is_short() -> None:
    assert len(README.read_text(encoding="utf-8")) <= 6000, "the README grew: put the detail in docs/"


def test_readme_two_commands_are_the_demo_and_what_ci_runs() -> None:
    blocks = [example for example in examples(README) if example.language == "bash" and "nox" in example.code]
    assert len(blocks) == 1, "the README has one block of its two commands"
    commands = [shlex.split(line, comments=True) for line in blocks[0].code.splitlines()]
    assert commands == [["nox", "-s", "demo"], ["nox"]]
    names, defaults = nox_sessions()
    assert "demo" in names
    assert {"lint", "breaking", "tests", "docs"} <= set(defaults), "plain `nox` runs the suite and the docs"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert "nox" in ci, "CI runs exactly the README's test command"


def test_readme_examples_are_run_by_the_docs_session() -> None:
    readme = [example for example in examples(README) if example.language == "python"]
    assert len(readme) >= 2, "a client example and a server example"
    assert all(example.skip is None for example in readme), "every Python example of the README runs"
    collected = {example.id for example in collect()}
    assert {example.id for example in readme} <= collected
    assert any(example.serves for example in readme), "the server example is run as a server"


def test_the_flag_table_lists_every_flag_the_parser_has(monkeypatch: pytest.MonkeyPatch) -> None:
    from entity_llm_server.config import ENV_PREFIX, build_parser

    monkeypatch.setenv("COLUMNS", "1000")  # `--help` as a wide terminal shows it: no flag broken at a hyphen
    help_text = build_parser(env={}).format_help()
    parser_flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", help_text)) - {"--help"}
    rows = reference().server_flags()
    table_flags = {flag.split()[0] for flag, *_ in rows}
    assert table_flags == parser_flags
    for flag, variable, _default, text in rows:
        assert variable == ENV_PREFIX + flag.split()[0].removeprefix("--").replace("-", "_").upper()
        assert text.strip(), f"{flag} has no help: the docs would not say what it does"
    table = reference().server_flags_table()
    assert all(f"`{flag}`" in table for flag, *_ in rows)
    server_page = (ROOT / "docs" / "server.md").read_text(encoding="utf-8")
    assert "<!-- reference: server-flags -->" in server_page


def test_the_metrics_table_lists_every_family_a_scrape_shows() -> None:
    from prometheus_client import generate_latest

    from entity_llm_server.metrics import Metrics

    scraped = generate_latest(Metrics(engine_load=lambda: (1, 2), engine_cores=lambda: [(3, True)]).registry)
    types = re.findall(r"^# TYPE (entity_llm_\w+) (\w+)$", scraped.decode(), re.MULTILINE)
    # prometheus_client adds a `_created` gauge beside each counter and histogram: not a family of ours.
    families = {name for name, kind in types if not (name.endswith("_created") and kind == "gauge")}
    documented = {name for name, *_ in reference().metrics()}
    assert families == documented
    labels = {name: labels for name, _kind, _help, labels in reference().metrics()}
    assert labels["entity_llm_requests_total"] == ("method", "code")
    assert labels["entity_llm_core_up"] == ("core",)


def test_the_protocol_reference_describes_every_definition() -> None:
    text = reference().protocol()
    undocumented = [line for line in text.splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")]
    assert not undocumented, f"give these a comment in the proto: {undocumented}"
    for name in ("GenerateRequest", "GenerateResponse", "FinishReason", "LLMService"):
        assert f"`{name}`" in text
    assert "| `prompt` | 1 | `string` |" in text
    assert "| `logit_bias` | 28 | `map<uint32, float>` |" in text


def test_an_unknown_reference_table_fails_the_build() -> None:
    with pytest.raises(KeyError, match="no reference table named 'flags'"):
        reference().expand("<!-- reference: flags -->")


def test_skip_annotations_must_give_a_reason(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skip -->\n```python\nprint(1)\n```\n")
    with pytest.raises(ValueError, match="must say why"):
        examples(page)
