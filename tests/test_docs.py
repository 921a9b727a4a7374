"""The docs stay true to the code and readable as a front door: a short README, links that
resolve, no citations of a page users do not have, and a data-flow diagram whose names are
the code's."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "zmqexec")
DOCS = os.path.join(ROOT, "docs")

# the roles the diagram must show (docs/architecture.md's glossary names them)
DIAGRAM_ROLES = {
    "ZMQExecutor", "Future", "ClientState", "ClientIO", "Broker", "BrokerState", "KeyTable",
    "RunQueue", "Outbox", "Agent", "AgentState", "TaskProcess", "task_main", "TaskRunner",
    "Node",
}
CAMEL = re.compile(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*")
SNAKE = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)+")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _doc_pages() -> list:
    return sorted(os.path.join(DOCS, name) for name in os.listdir(DOCS)
                  if name.endswith(".md"))


def _python_sources() -> list:
    return sorted(os.path.join(folder, name) for folder, _, names in os.walk(PACKAGE)
                  for name in names if name.endswith(".py"))


def _diagram() -> str:
    """The first fenced block after the heading '## Data flow' in docs/architecture.md."""
    text = _read(os.path.join(DOCS, "architecture.md"))
    heading = re.search(r"^## Data flow\s*$", text, re.M)
    assert heading, "docs/architecture.md has no '## Data flow' heading"
    block = re.search(r"^```[^\n]*\n(.*?)^```", text[heading.end():], re.M | re.S)
    assert block, "no fenced code block after '## Data flow'"
    return block.group(1)


def test_the_data_flow_diagram_names_only_what_the_code_defines():
    names = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", _diagram()))
    names = {n for n in names if CAMEL.fullmatch(n) or SNAKE.fullmatch(n)}
    missing_roles = DIAGRAM_ROLES - names
    assert not missing_roles, f"the diagram does not show: {sorted(missing_roles)}"
    code = "\n".join(_read(path) for path in _python_sources())
    undefined = sorted(n for n in names
                       if not re.search(rf"^\s*(?:class|def)\s+{n}\b", code, re.M))
    assert not undefined, \
        f"the diagram names what no 'class'/'def' under zmqexec/ defines: {undefined}"


def test_the_readme_is_a_front_door_of_at_most_300_lines():
    lines = _read(os.path.join(ROOT, "README.md")).splitlines()
    assert len(lines) <= 300, \
        f"README.md has {len(lines)} lines (limit 300); move reference to docs/"


def test_the_readme_keeps_the_ci_test_command():
    lines = _read(os.path.join(ROOT, "README.md")).splitlines()
    assert "pip install '.[test]' && python -m pytest" in lines


def _cited_files() -> list:
    files = [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "bench", "README.md")]
    return files + _doc_pages() + _python_sources()


@pytest.mark.parametrize("path", _cited_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_no_citations_of_the_design_page(path):
    assert "DESIGN §" not in _read(path), (
        f"{os.path.relpath(path, ROOT)} cites 'DESIGN §': users do not have that page; "
        "say what they need instead")


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _anchors(path: str) -> set:
    """The heading anchors GitHub makes for a markdown page (outside fenced blocks)."""
    text = re.sub(r"^```.*?^```", "", _read(path), flags=re.M | re.S)
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("path", [os.path.join(ROOT, "README.md")] + _doc_pages(),
                         ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_point_to_existing_files_and_headings(path):
    broken = []
    for target in LINK.findall(_read(path)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue  # a URL
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) \
            if file_part else path
        if not os.path.exists(linked):
            broken.append(target)
        elif anchor and linked.endswith(".md") and anchor not in _anchors(linked):
            broken.append(target)
    assert not broken, f"{os.path.relpath(path, ROOT)} has broken links: {broken}"
