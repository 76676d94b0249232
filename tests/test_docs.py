"""The docs: every code block of README.md and docs/ runs (or says why it does not), the README's links
resolve, and the site builds with `mkdocs build --strict` (a broken link or anchor fails it).

How a block runs, one test per block (its id is the page and the line of its opening fence):

* ```python: in this process, in a fresh module, with the page's working directory as cwd;
* ```bash: each line is one command; `tdrl ARGS` runs `tdrl.cli.main(ARGS)` (what `python -m tdrl.cli`
  runs) and must exit 0; any other command fails the test unless the block is marked;
* ```yaml / ```toml / ```json / ```jsonl: parsed; after `<!-- file: NAME -->` written to NAME for later blocks;
* ```text: output, never run.

The blocks of a page run in order in one temporary directory (a block may read what an earlier one
wrote: a reader follows the page the same way), with `TDRL_CACHE` in a temporary directory shared by
every page. A block the tests cannot run is marked with a first line `# not run ...: REASON` (seen by
the reader) or an HTML comment `<!-- not run: REASON -->` right before its fence.
"""

from __future__ import annotations

import contextlib
import io
import json
import linecache
import re
import shlex
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^`]*$")
NOT_RUN_COMMENT = re.compile(r"^<!--\s*not run\b[^:]*:\s*(?P<why>\S.*?)\s*-->$")
NOT_RUN_LINE = re.compile(r"^#\s*not run\b[^:]*:\s*(?P<why>\S.*)$")
FILE_COMMENT = re.compile(r"^<!--\s*file:\s*(?P<name>[\w./-]+)\s*-->$")
SHELL = {"bash", "sh", "shell", "console"}
DATA = {"yaml", "yml", "toml", "json", "jsonl"}
TAIL = 3000  # characters of a failing block's output shown in the message


@dataclass(frozen=True)
class Block:
    page: str  # path relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    not_run: str | None = None  # the reason given by the page
    file: str | None = None  # <!-- file: NAME -->

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def parse_blocks(text: str, page: str) -> list[Block]:
    """The fenced code blocks of a Markdown page, with the markers that precede or open them."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start, indent, fence = i, len(m["indent"]), m["fence"]
        body, i = [], i + 1
        while i < len(lines) and not (lines[i].strip().startswith(fence) and lines[i].strip().strip(fence[0]) == ""):
            body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{page}:{start + 1}: a code fence that is never closed")
        i += 1
        before = next((s.strip() for s in reversed(lines[:start]) if s.strip()), "")
        comment, file = NOT_RUN_COMMENT.match(before), FILE_COMMENT.match(before)
        first = NOT_RUN_LINE.match(body[0].strip()) if body else None
        why = comment["why"] if comment else first["why"] if first else None
        blocks.append(
            Block(page, start + 1, m["lang"].lower(), "\n".join(body) + "\n", why, file["name"] if file else None)
        )
    return blocks


BLOCKS = [b for p in PAGES for b in parse_blocks(p.read_text(), str(p.relative_to(ROOT)))]
RUN = [b for b in BLOCKS if b.not_run is None and b.lang != "text"]


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """Per page: its working directory and which of its blocks already ran (None: passed; str: failed)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models gain nothing from threads, and a busy machine makes them spin
    yield {"cache": tmp_path_factory.mktemp("docs-tdrl-cache"), "pages": {}}
    torch.set_num_threads(threads)


def _fail(block: Block, what: str, output: str = "") -> str:
    out = output.strip()
    shown = f"\n--- output (last {TAIL} characters) ---\n{out[-TAIL:]}" if out else ""
    return f"{block.id}: the ```{block.lang or '(no language)'} block {what}{shown}"


def _run_python(block: Block) -> str | None:
    filename = block.page  # tracebacks name the page and the line in it
    linecache.cache[filename] = (0, None, (ROOT / block.page).read_text().splitlines(True), filename)
    code = compile("\n" * block.line + block.code, filename, "exec")
    name = "docs_block_" + re.sub(r"\W", "_", block.id)
    module = types.ModuleType(name)
    sys.modules[name] = module  # dataclasses and pickling look the module up
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            exec(code, module.__dict__)
    except BaseException as exc:  # every failure, SystemExit included, is the block's
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
        where = f" at {filename}:{frames[-1].lineno}" if frames else ""
        trace = "".join(traceback.format_exception(exc)[-12:])
        return _fail(block, f"raised {type(exc).__name__}{where}: {exc}\n{trace}", out.getvalue())
    finally:
        sys.modules.pop(name, None)
    return None


def _shell_commands(block: Block):
    """(line, argv) for every command of a shell block; backslash continuations are joined."""
    pending, first = "", None
    for offset, raw in enumerate(block.code.splitlines(), start=1):
        first = first or block.line + offset
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        argv, pending, line, first = shlex.split(pending + raw, comments=True), "", first, None
        if argv:
            yield line, argv


def _run_shell(block: Block) -> str | None:
    from tdrl.cli import main

    for line, argv in _shell_commands(block):
        shown = " ".join(argv)
        if argv[0] != "tdrl":
            return _fail(
                block,
                f"runs `{shown}` (line {line}), which the docs tests cannot run: write it as a cheap `tdrl ...` "
                "command on the tiny models, or mark the block (first line `# not run ...: why`)",
            )
        if any(a in ("|", "||", "&&", ">", ">>", "<", ";", "&") for a in argv):
            return _fail(block, f"line {line}: `{shown}`: the docs tests run plain commands, no shell operators")
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                status = main(argv[1:])
        except SystemExit as exc:  # argparse's --help and usage errors
            status = exc.code if isinstance(exc.code, int) else 2
        except BaseException as exc:
            trace = "".join(traceback.format_exception(exc)[-12:])
            return _fail(block, f"line {line}: `{shown}` raised {type(exc).__name__}: {exc}\n{trace}", out.getvalue())
        if status != 0:
            return _fail(block, f"line {line}: `{shown}` exited with status {status}", out.getvalue())
    return None


def _run_data(block: Block) -> str | None:
    try:
        if block.lang in ("yaml", "yml"):
            yaml.safe_load(block.code)
        elif block.lang == "toml":
            tomllib = pytest.importorskip("tomllib", reason="Python 3.11 reads TOML")
            tomllib.loads(block.code)
        elif block.lang == "json":
            json.loads(block.code)
        else:
            [json.loads(line) for line in block.code.splitlines() if line.strip()]
    except Exception as exc:
        return _fail(block, f"does not parse as {block.lang}: {exc}")
    if block.file:
        Path(block.file).parent.mkdir(parents=True, exist_ok=True)
        Path(block.file).write_text(block.code)
    return None


def _run(block: Block) -> str | None:
    if block.lang == "python":
        return _run_python(block)
    if block.lang in SHELL:
        return _run_shell(block)
    if block.lang in DATA:
        return _run_data(block)
    return _fail(
        block,
        "cannot be run by the docs tests: use ```python, ```bash (tdrl commands) or ```yaml/toml/json, ```text for "
        "output, or mark it (`<!-- not run: why -->` right before the fence)",
    )


@pytest.mark.parametrize("block", RUN, ids=[b.id for b in RUN])
def test_code_block_runs(block, workdirs, monkeypatch, tmp_path_factory):
    from tdrl.agents import registry

    pages = workdirs["pages"]
    if block.page not in pages:
        pages[block.page] = {"dir": tmp_path_factory.mktemp(re.sub(r"\W", "_", block.page)), "done": {}}
    state = pages[block.page]
    monkeypatch.chdir(state["dir"])
    monkeypatch.setenv("TDRL_CACHE", str(workdirs["cache"]))
    failed_before = []
    for earlier in [b for b in RUN if b.page == block.page and b.line <= block.line]:
        if earlier.line not in state["done"]:
            agents = dict(registry._REGISTRY)  # a block's plug-in agent stays in its block
            try:
                state["done"][earlier.line] = _run(earlier)
            finally:
                registry._REGISTRY.clear()
                registry._REGISTRY.update(agents)
        if earlier is not block and state["done"][earlier.line] is not None:
            failed_before.append(earlier.id)  # reported there; this block still runs, and may depend on it
    error = state["done"][block.line]
    if error is not None:
        note = f"\n(an earlier block of the page failed too, which this one may need: {', '.join(failed_before)})"
        pytest.fail(error + (note if failed_before else ""), pytrace=False)


def test_blocks_are_found_and_markers_read():
    """The parser sees fences, their languages, both ways of marking a block not run, and file blocks."""
    page = (
        "text\n\n```bash\ntdrl agents\n```\n\n<!-- not run: needs a GPU -->\n```python\nimport x\n```\n"
        "```bash\n# not run by the docs tests: 40 minutes\nmake demo\n```\n<!-- file: run.yaml -->\n"
        "```yaml\nsteps: 2\n```\n* item\n\n    ```text\n    output\n    ```\n```\n"
    )
    with pytest.raises(AssertionError, match="p.md:24: a code fence that is never closed"):
        parse_blocks(page, "p.md")
    blocks = parse_blocks(page.removesuffix("```\n"), "p.md")
    assert [(b.line, b.lang, b.not_run, b.file) for b in blocks] == [
        (3, "bash", None, None),
        (8, "python", "needs a GPU", None),
        (11, "bash", "40 minutes", None),
        (16, "yaml", None, "run.yaml"),
        (21, "text", None, None),
    ]
    assert blocks[0].code == "tdrl agents\n" and blocks[4].code == "output\n"
    cmds = list(_shell_commands(Block("p.md", 1, "bash", "tdrl train \\\n  --steps 2  # two\n\n# c\ntdrl agents\n")))
    assert cmds == [(2, ["tdrl", "train", "--steps", "2"]), (6, ["tdrl", "agents"])]


def test_an_unmarked_block_that_cannot_run_fails_with_its_page_and_line():
    assert "p.md:4: the ```bash block runs `make demo` (line 5)" in _run_shell(Block("p.md", 4, "bash", "make demo\n"))
    assert "p.md:2: the ```(no language) block cannot be run" in _run(Block("p.md", 2, "", "a b c\n"))
    error = _run_python(Block("README.md", 3, "python", "x = 1\nraise ValueError('boom')\n"))
    assert error.startswith("README.md:3: the ```python block raised ValueError at README.md:5: boom")


def test_every_page_is_in_the_nav_and_every_run_block_is_tested():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]

    def pages(entry):
        if isinstance(entry, str):
            return [entry]
        if isinstance(entry, list):
            return [p for e in entry for p in pages(e)]
        return [p for v in entry.values() for p in pages(v)]

    on_disk = sorted(str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md"))
    assert sorted(pages(nav)) == on_disk
    assert len(RUN) >= 20 and {b.page for b in RUN} >= {"README.md", "docs/guides/training.md"}


def test_readme_links_resolve():
    """README.md lives outside the site, so mkdocs does not check it: its relative links must name files,
    and an anchor into a page a heading of that page (slugged as mkdocs and GitHub do)."""
    from markdown.extensions.toc import slugify

    readme = (ROOT / "README.md").read_text()
    links = [link for link in re.findall(r"\]\(([^)\s]+)\)", readme) if not re.match(r"[a-z]+:", link)]
    assert any(link.startswith("docs/") for link in links), "README.md links into docs/"
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        if not target.exists():
            broken.append(link)
        elif anchor:
            headings = re.findall(r"^#+\s+(.+?)\s*$", target.read_text(), re.M)
            if anchor not in {slugify(re.sub(r"[`*]", "", h), "-") for h in headings}:
                broken.append(link)
    assert not broken, f"README.md links to files or headings that do not exist: {broken}"


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config), "--site-dir", str(site)]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=config.parent)


def test_the_site_builds_strictly(tmp_path):
    done = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, f"mkdocs build --strict failed (make docs):\n{done.stderr[-TAIL:]}"
    assert (tmp_path / "site" / "guides" / "agents" / "index.html").is_file()
    assert (tmp_path / "site" / "reference" / "configuration" / "index.html").is_file()


@pytest.mark.parametrize(
    "broken, message",
    [("[gone](guides/nowhere.md)", "nowhere.md"), ("[gone](guides/compare.md#no-such-heading)", "no-such-heading")],
)
def test_a_broken_internal_link_fails_the_build(tmp_path, broken, message):
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + f"\n{broken}\n")
    done = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0 and message in done.stderr, done.stderr[-TAIL:]
