"""The README's layout section and bench/results/ match the repository (#23 item 6: docs that match the code).

README.md's "Layout" section is a tree (one fenced block, two spaces per level, a trailing `/` for a
directory, then a one-line description). Checked both ways: every directory or module it names exists,
and every package directory (a directory holding a Python module) under pki/, api/, hsm/ and workers/,
and every top-level directory, is named in it. A measurement round is one file in bench/results/ with the
headings a reader needs to judge it: date, machine, commit, command, figures, conclusion.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RESULTS = REPO / "bench" / "results"

PACKAGES = ("pki", "api", "hsm", "workers")
# Not part of the source tree: build output, caches, local data (.gitignore), and hidden directories.
IGNORED = {"__pycache__", "var", "build", "dist", "test-artifacts", "node_modules"}
RESULT_HEADINGS = ("Date", "Machine", "Commit", "Command", "Figures", "Conclusion")


def layout_block(readme_text: str) -> str:
    """The first fenced block of the README's `## Layout` section."""
    at = readme_text.index("\n## Layout")
    end = readme_text.find("\n## ", at + 1)
    section = readme_text[at:] if end < 0 else readme_text[at:end]
    block = re.search(r"```[a-z]*\n(.*?)```", section, flags=re.S)
    assert block is not None, "README: no tree in the Layout section"
    return block.group(1)


def layout_entries(block: str) -> list[str]:
    """Repository paths named by the tree: directories end with '/'."""
    entries: list[str] = []
    stack: list[str] = []
    for n, line in enumerate(block.splitlines(), 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip(" "))
        assert indent % 2 == 0 and indent // 2 <= len(stack), f"layout line {n}: bad indentation: {line!r}"
        name = line.split()[0]
        assert len(line.split(None, 1)) == 2, f"layout line {n}: {name} has no description"
        stack = stack[: indent // 2]
        parent = "".join(stack)
        assert not stack or stack[-1].endswith("/"), f"layout line {n}: {name} is under a file"
        stack.append(name)
        entries.append(parent + name)
    return entries


def source_dirs(root: Path) -> set[str]:
    """Directories of the source tree (relative, with a trailing '/'): from git when it is a checkout, so
    local data and build output never count; otherwise from the file system without the ignored names."""
    files: list[str]
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, text=True, check=True).stdout
        files = [f for f in out.splitlines() if (root / f).exists()]
    except (OSError, subprocess.CalledProcessError):
        files = [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()]
    dirs: set[str] = set()
    for f in files:
        parts = f.split("/")[:-1]
        if any(p.startswith(".") or p in IGNORED or p.endswith(".egg-info") for p in parts):
            continue
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]) + "/")
    return dirs


def required_dirs(root: Path) -> set[str]:
    """Every top-level directory, and every directory under the packages that holds a Python module."""
    dirs = source_dirs(root)
    need = {d for d in dirs if d.count("/") == 1}
    for d in dirs:
        if d.split("/")[0] in PACKAGES and any(p.suffix == ".py" for p in (root / d).iterdir()):
            need.add(d)
    return need


def layout_problems(readme_text: str, root: Path) -> list[str]:
    entries = layout_entries(layout_block(readme_text))
    problems = [f"named in the layout but missing: {e}" for e in entries
                if not (root / e).exists() or e.endswith("/") != (root / e).is_dir()]
    problems += [f"not in the layout: {d}" for d in sorted(required_dirs(root) - set(entries))]
    return problems


def result_problems(path: Path) -> list[str]:
    """A round's file: `# title`, then the six headings in order, each with text; the Date matches the name."""
    text = path.read_text()
    problems: list[str] = []
    m = re.fullmatch(r"(\d{4}-\d{2}-\d{2})-([a-z_]+)(-[a-z0-9-]+)?\.md", path.name)
    if m is None:
        return [f"{path.name}: not named DATE-SCRIPT[-ROUND].md"]
    if not (path.parent.parent / f"{m.group(2)}.py").exists():
        problems.append(f"{path.name}: no bench/{m.group(2)}.py")
    if not text.startswith("# "):
        problems.append(f"{path.name}: no title")
    found = re.findall(r"^## (.+)$", text, flags=re.M)
    if tuple(found[:len(RESULT_HEADINGS)]) != RESULT_HEADINGS:
        problems.append(f"{path.name}: headings {found[:len(RESULT_HEADINGS)]}, expected {list(RESULT_HEADINGS)}")
        return problems
    sections = re.split(r"^## .+$", text, flags=re.M)[1:]
    for heading, body in zip(RESULT_HEADINGS, sections, strict=False):
        if not body.strip():
            problems.append(f"{path.name}: '## {heading}' is empty")
    if not sections[0].strip().startswith(m.group(1)):
        problems.append(f"{path.name}: '## Date' does not start with {m.group(1)}")
    return problems


def test_readme_layout_matches_the_tree() -> None:
    problems = layout_problems(README.read_text(), REPO)
    assert not problems, "README.md Layout section:\n" + "\n".join(problems)


def test_readme_keeps_its_two_commands() -> None:
    """The setup-and-run and test commands, word for word (tests/test_readme_run.py runs them)."""
    blocks = [b.strip() for b in re.findall(r"```sh\n(.*?)```", README.read_text(), flags=re.S)]
    assert "bash scripts/run.sh" in blocks and "bash scripts/test.sh" in blocks


def test_every_measurement_round_has_the_headings() -> None:
    files = sorted(RESULTS.glob("*"))
    assert files, "bench/results/ is empty"
    problems = [p for f in files for p in (result_problems(f) if f.suffix == ".md" else [f"{f.name}: not .md"])]
    assert not problems, "\n".join(problems)


def test_bench_readme_links_resolve() -> None:
    """bench/README.md names bench/results/ and every round it links to exists."""
    text = (REPO / "bench" / "README.md").read_text()
    assert "](results/)" in text
    for target in re.findall(r"\]\((results/[^)#]+)\)", text):
        assert (REPO / "bench" / target).exists(), target


# ---- the checks themselves: a missing entry, a stale entry and a bad round are each reported

def _fake_repo(root: Path) -> None:
    for f in ("pki/__init__.py", "pki/issuance.py", "pki/store/__init__.py", "api/app.py", "api/v1/routes.py",
              "hsm/__init__.py", "workers/__init__.py", "bench/issuance.py", "docs/architecture.md"):
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        (root / f).write_text("")
    (root / "var" / "softhsm").mkdir(parents=True)  # local data: never required
    (root / "var" / "softhsm" / "token.object").write_text("")
    (root / "pki" / "__pycache__").mkdir()
    (root / "pki" / "__pycache__" / "x.pyc").write_text("")


FULL = """# x

## Layout

```text
pki/          engine
  issuance.py the CA
  store/      tables
api/          service
  app.py      factory
  v1/         REST
hsm/          keys
workers/      celery
bench/        benchmarks
docs/         documents
```

## Next
"""


def test_layout_check_accepts_a_matching_tree(tmp_path: Path) -> None:
    _fake_repo(tmp_path)
    assert layout_problems(FULL, tmp_path) == []


@pytest.mark.parametrize("line, problem", [
    ("  store/      tables\n", "not in the layout: pki/store/"),
    ("  v1/         REST\n", "not in the layout: api/v1/"),
    ("docs/         documents\n", "not in the layout: docs/"),
])
def test_layout_check_reports_a_missing_entry(tmp_path: Path, line: str, problem: str) -> None:
    _fake_repo(tmp_path)
    assert line in FULL
    assert problem in layout_problems(FULL.replace(line, ""), tmp_path)


def test_layout_check_reports_a_named_entry_that_does_not_exist(tmp_path: Path) -> None:
    _fake_repo(tmp_path)
    text = FULL.replace("  issuance.py the CA\n", "  issuance.py the CA\n  fastlane.py gone\n")
    assert layout_problems(text, tmp_path) == ["named in the layout but missing: pki/fastlane.py"]
    (tmp_path / "pki" / "wiring").mkdir()
    text = FULL.replace("  issuance.py the CA\n", "  issuance.py the CA\n  wiring.py a file, not a directory\n")
    assert layout_problems(text, tmp_path) == ["named in the layout but missing: pki/wiring.py"]


GOOD_ROUND = """# bench/issuance.py, round 9

## Date

2026-12-08

## Machine

2 vCPUs.

## Commit

`abc1234`

## Command

`bench/issuance.py --n 2048`

## Figures

| a | b |

## Conclusion

Kept.
"""


def test_round_check_reports_missing_or_empty_headings(tmp_path: Path) -> None:
    (tmp_path / "issuance.py").write_text("")
    results = tmp_path / "results"
    results.mkdir()
    good = results / "2026-12-08-issuance-round9.md"
    good.write_text(GOOD_ROUND)
    assert result_problems(good) == []
    good.write_text(GOOD_ROUND.replace("## Machine\n\n2 vCPUs.\n", ""))
    assert result_problems(good) and "headings" in result_problems(good)[0]
    good.write_text(GOOD_ROUND.replace("Kept.\n", ""))
    assert result_problems(good) == ["2026-12-08-issuance-round9.md: '## Conclusion' is empty"]
    other = results / "2026-12-09-issuance-round9.md"
    other.write_text(GOOD_ROUND)
    assert result_problems(other) == ["2026-12-09-issuance-round9.md: '## Date' does not start with 2026-12-09"]
    unnamed = results / "round9.md"
    unnamed.write_text(GOOD_ROUND)
    assert result_problems(unnamed) == ["round9.md: not named DATE-SCRIPT[-ROUND].md"]
