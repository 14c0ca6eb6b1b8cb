"""The README and the docs/ pages: the README is a short front door that opens with the two
commands, every relative link points at a file (and heading) that exists, and every command block
a page marks as runnable runs here as written.

A page marks a ```bash block as runnable with an HTML comment on the line right before it:
``<!-- runnable -->`` (the block must exit 0) or ``<!-- runnable: exit 2 -->`` (it must exit 2,
with one line on stderr). Mark only blocks that are offline and take seconds (``--dry-run``,
``--help``). They run with bash -e in a temporary folder that links every top-level entry of the
checkout (so ``python tune/search.py`` is this checkout's code and what a block writes lands in
the temporary folder), with this interpreter's venv first on PATH."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 220  # issue 23: a front door, not the manual

MARKER = re.compile(r"^<!-- runnable(?::\s*exit (\d+))? -->\n", re.M)
RUNNABLE = re.compile(r"^<!-- runnable(?::\s*exit (\d+))? -->\n```bash\n(.*?)^```$", re.M | re.S)
FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.M | re.S)
INLINE_CODE = re.compile(r"(`+).*?\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
NOT_COPIED = {".git", ".venv", "runs", "mlflow.db", "mlruns", "mlartifacts", ".pytest_cache", "secrets", "backups"}


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def runnable_blocks() -> list[tuple[str, int, str]]:
    """(page, expected exit code, script) of every block marked runnable."""
    blocks = []
    for page in PAGES:
        text = page.read_text()
        found = RUNNABLE.findall(text)
        assert len(found) == len(MARKER.findall(text)), (
            f"{rel(page)}: a runnable marker not right before a ```bash block"
        )
        blocks += [(rel(page), int(code or 0), script) for code, script in found]
    return blocks


BLOCKS = runnable_blocks()


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", page.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(page: Path) -> list[str]:
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    return LINK.findall(text)


def test_readme_is_a_front_door():
    text = README.read_text()
    lines = text.splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines: move text to a docs/ page"
    assert lines[0].startswith("# ") and lines[1] == "" and lines[2] == "```bash", lines[:3]
    assert lines[3].startswith("bash scripts/smoke.sh    # main job")
    assert lines[4].startswith("bash scripts/test.sh     # tests")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert first_block.count("\n") == 2, "the first block holds exactly the two set-up commands"
    assert "`bash scripts/test.sh --fast`" in text, "the fast selection, named after them"


def test_every_page_is_linked_from_the_readme():
    targets = {(README.parent / t.split("#", 1)[0]).resolve() for t in links(README)}
    for page in PAGES[1:]:
        assert page.resolve() in targets, f"README.md does not link {rel(page)}"


@pytest.mark.parametrize("page", PAGES, ids=rel)
def test_relative_links_point_at_what_exists(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading #{anchor} in {rel(file)}")
    assert not broken, f"{rel(page)}: " + "; ".join(broken)


def test_the_docs_mark_runnable_blocks():
    pages = {page for page, _, _ in BLOCKS}
    assert {"README.md", "docs/searching.md"} <= pages, pages
    assert any(code == 2 for _, code, _ in BLOCKS), "an input error's block (exit 2)"


@pytest.fixture(scope="module")
def checkout_copy(tmp_path_factory):
    """A folder that links every top-level entry of the checkout: blocks write here, not there."""
    folder = tmp_path_factory.mktemp("docs-run")
    for entry in ROOT.iterdir():
        if entry.name not in NOT_COPIED:
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    "page,code,script", BLOCKS, ids=[f"{page}:{script.splitlines()[0][:60]}" for page, _, script in BLOCKS]
)
def test_runnable_block_runs(page, code, script, checkout_copy):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "LPT_STORAGE")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    start = time.monotonic()
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=checkout_copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    assert proc.returncode == code, f"{page}: exit {proc.returncode}, not {code}\n{script}\n{proc.stderr[-3000:]}"
    if code == 2:
        assert len(proc.stderr.strip().splitlines()) == 1, f"{page}: one line on stderr\n{proc.stderr[-3000:]}"
    assert took < 60, f"{page}: a runnable block takes seconds, this one {took:.0f} s"
