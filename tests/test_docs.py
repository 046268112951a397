"""The docs stay true: the site builds strictly, every Python example in README.md and docs/
runs, every ``fedmask`` command in them is one the command line takes, shown plug-ins are the
code that is tested, and the strategy contract names the real methods.

Conventions in the Markdown (an HTML comment on the line before a fence, invisible on the page):

- ``<!-- not-run: why -->``: a ```python example that is not executed (keep these few);
- ``<!-- same-as: examples/x.py -->``: the example's classes and functions are the module's,
  docstrings and comments aside.

Examples run in a scratch folder holding links to ``configs/`` and ``examples/``, so relative
paths work and the runs they start land in ``tmp_path``; an example that runs a federation
must be tiny (in-process, digits, one or two rounds).
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shlex
import subprocess
import sys
import textwrap
import tomllib
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOTE = re.compile(r"<!--\s*(not-run|same-as):\s*(.*?)\s*-->")
MAX_NOT_RUN = 3

# Commands that fail on this branch for a reason fixed elsewhere; strict, so a fix makes the test say so.
KNOWN_BROKEN: dict[str, str] = {}  # command -> the issue that will fix it (a strict xfail until then)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a Markdown page."""

    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    note: tuple[str, str] | None  # ("not-run" | "same-as", its text) from the line before the fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """Every ``` fenced block of a page (fences at the start of a line), with the note before it."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        start, lang = i, lines[i][3:].strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"{path.name}:{i + 1}: a fence that never closes"
        found = NOTE.fullmatch(lines[start - 1].strip()) if start else None
        blocks.append(Block(path, start + 1, lang, "\n".join(lines[start + 1:end]) + "\n",
                            (found.group(1), found.group(2)) if found else None))
        i = end + 1
    return blocks


def _blocks(lang: str) -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page) if b.lang == lang]


def _commands(block: Block) -> list[str]:
    """The ``fedmask ...`` command lines of a shell block, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", block.code)
    lines = (line.strip().removeprefix("$ ") for line in joined.splitlines())
    return [" ".join(shlex.split(line, comments=True)) for line in lines if line.startswith("fedmask ")]


def _noted(kind: str) -> list[Block]:
    return [b for page in PAGES for b in fenced_blocks(page) if b.note and b.note[0] == kind]


def _known_broken(command: str) -> list[pytest.MarkDecorator]:
    return [pytest.mark.xfail(strict=True, reason=KNOWN_BROKEN[command])] if command in KNOWN_BROKEN else []


PYTHON = [pytest.param(b, id=b.where) for b in _blocks("python") if not (b.note and b.note[0] == "not-run")]
COMMANDS = [pytest.param(b, cmd, id=f"{b.where}: {cmd}", marks=_known_broken(cmd))
            for b in _blocks("bash") for cmd in _commands(b)]


def test_fenced_blocks_reads_language_code_and_note(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- not-run: needs a GPU -->\n```python\nx = 1\n```\n\n```bash\n# c\nfedmask keys \\\n"
                    "   # a comment\n```\n```\nplain\n```\n")
    blocks = fenced_blocks(page)
    assert [(b.line, b.lang, b.code, b.note) for b in blocks] == [
        (3, "python", "x = 1\n", ("not-run", "needs a GPU")),
        (7, "bash", "# c\nfedmask keys \\\n   # a comment\n", None),
        (12, "", "plain\n", None),
    ]
    assert _commands(blocks[1]) == ["fedmask keys"]


def test_docs_site_builds_strictly(tmp_path):
    """`mkdocs build --strict`: a broken link, a page missing from the nav or a docstring the API
    reference cannot render fails the build; any warning in its log fails this test too."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about MkDocs 2.0, not a build warning
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)
    assert proc.returncode == 0, log[-4000:]
    assert not re.findall(r"^WARNING\b.*$", log, flags=re.MULTILINE), log[-4000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count('id="fedmask.api.simulate"') == 1


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES[1:] if f": {p.name}" not in nav]
    assert not missing, f"pages not in mkdocs.yml's nav: {missing}"


def test_readme_links_point_at_files_that_exist():
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if "://" not in t]
    assert targets, "the README links into docs/"
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_stays_a_newcomers_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 300
    assert 'pip install -e ".[test]" && fedmask run configs/quickstart.toml' in text
    assert ". .venv/bin/activate && ruff check . && mypy && python -m pytest" in text


def test_not_run_examples_are_few_and_say_why():
    skipped = _noted("not-run")
    assert all(b.note and len(b.note[1]) > 5 for b in skipped), [b.where for b in skipped]
    assert len(skipped) <= MAX_NOT_RUN, [b.where for b in skipped]


@pytest.mark.parametrize("block", PYTHON)
def test_python_example_runs(block, tmp_path, monkeypatch):
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(ROOT / name, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    module = types.ModuleType("docs_example")  # a real module: dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    exec(compile(block.code, block.where, "exec"), module.__dict__)


def _defs(source: str) -> dict[str, str]:
    """Top-level classes and functions of a source, docstrings dropped, as comparable AST dumps."""
    tree = ast.parse(textwrap.dedent(source))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return {n.name: ast.dump(n) for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}


@pytest.mark.parametrize("block", [pytest.param(b, id=b.where) for b in _noted("same-as")])
def test_example_is_the_module_it_names(block):
    """A plug-in shown in the docs is the code in examples/ that the tests run, not a copy that drifts."""
    assert block.note is not None
    shown, module = _defs(block.code), _defs((ROOT / block.note[1]).read_text())
    assert shown, f"{block.where}: no class or function to compare"
    for name, dump in shown.items():
        assert module.get(name) == dump, f"{block.where}: {name} differs from {block.note[1]}"


def test_strategy_contract_names_the_real_methods_and_mask_modes():
    """docs/strategies.md's outline of MaskAggregator: every method it lists exists on the real class
    with the same parameters, and its list of mask modes is the registry's."""
    import fedmask
    from fedmask.names import MASK_MODES

    block = next(b for b in fenced_blocks(ROOT / "docs" / "strategies.md") if "class MaskAggregator(" in b.code)
    namespace: dict = {}
    exec(compile(block.code, block.where, "exec"), namespace)
    outline = namespace["MaskAggregator"]
    methods = [name for name, value in vars(outline).items() if inspect.isfunction(value)]
    assert {"__init__", "aggregate", "fold", "finish", "discard"} <= set(methods)
    for name in methods:
        real = getattr(fedmask.MaskAggregator, name, None)
        assert real is not None, f"the outline lists {name}, which MaskAggregator does not have"
        assert list(inspect.signature(getattr(outline, name)).parameters) == \
            list(inspect.signature(real).parameters), name
    listed = re.search(r"what clients train: ([\w |]+)", block.code)
    assert listed and set(listed.group(1).split(" | ")) == set(MASK_MODES)
    assert outline.mask_mode == fedmask.MaskAggregator.mask_mode


@pytest.mark.parametrize(("block", "command"), COMMANDS)
def test_fedmask_command_in_docs_is_valid(block, command, tmp_path, monkeypatch):
    """Each `fedmask ...` line parses with the real command line; a run or sweep of a shipped config
    also passes the config checks (keys, values, plug-ins, engine) that `fedmask run` does first."""
    from fedmask.api import check_engine
    from fedmask.cli import build_parser
    from fedmask.config import load
    from fedmask.sweep import parse_grid, plan

    monkeypatch.syspath_prepend(str(ROOT))  # plug-ins are named from the repository root
    try:
        args = build_parser().parse_args(shlex.split(command)[1:])
    except SystemExit:
        pytest.fail(f"{block.where}: `{command}` is not a valid fedmask command")
    config = getattr(args, "config", None)
    if not (config and config.startswith("configs/")):
        return
    config = str(ROOT / config)
    if args.command == "run":
        check_engine(load(config, args.set), args.engine)
    elif args.command == "sweep":
        plan(config, [int(s) for s in args.seeds.split(",")], parse_grid(args.grid), args.set, tmp_path)


@pytest.mark.parametrize("block", [pytest.param(b, id=b.where) for b in _blocks("toml")])
def test_toml_example_parses(block):
    tomllib.loads(block.code)
