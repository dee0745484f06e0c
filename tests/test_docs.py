"""The documentation holds together: every relative link of README.md and docs/*.md reaches
a file (and a heading, for links with an anchor); every "methods.md section ..." or
"design.md step ..." reference in the code names a section of docs/methods.md / a step of
docs/design.md; docs/configuration.md is what `python -m tools.config_doc` generates now;
the recipes' YAML passes the config schema and their commands use options that exist."""

import argparse
import importlib
import importlib.util
import re
import shlex
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
METHODS = DOCS / "methods.md"
DESIGN = DOCS / "design.md"
MARKDOWN = [REPO / "README.md"] + sorted(DOCS.glob("*.md"))
GENERATED_DOCS = [METHODS, DESIGN, DOCS / "recipes.md", DOCS / "configuration.md"]
CODE_DIRS = ("attnrl", "trainers", "rewards", "configs", "tools")
CODE_SUFFIXES = {".py", ".yaml", ".yml", ".json", ".sh"}
REGENERATE = ".venv/bin/python -m tools.config_doc"

NUM = r"\d+(?:\.\d+)?(?:\([a-z]\))?"
REFERENCE = re.compile(r"(?P<doc>methods|design)\.md(?=(?P<rest>[^\n]*))")
NUMBERS = re.compile(rf"[ \t]*(?:(?:sections?|steps?|s\.|§)[ \t]*)?"
                     rf"(?P<list>{NUM}(?:[ \t]*(?:,|and|-|–|to)[ \t]*{NUM})*)")
STRATEGY = re.compile(r"[ \t]*,[ \t]*strategy[ \t]+(\d+)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


# ------------------------------------------------------------------ parsing the documents
def _without_code(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every markdown heading outside fenced code."""
    return [(len(m[1]), m[2].strip().rstrip("#").strip())
            for m in re.finditer(r"^(#{1,6})\s+(.+)$", FENCE.sub("", text), re.MULTILINE)]


def _slug(title: str) -> str:
    """GitHub's anchor of a heading."""
    title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in _headings(text):
        slug = _slug(title)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        out.add(slug if count == 0 else f"{slug}-{count}")
    return out


def methods_sections() -> dict[str, str]:
    """{'1': text, '1.1': text, '2(a)': text, ...}: the numbered headings of methods.md with
    the text up to the next heading."""
    text = METHODS.read_text()
    matches = list(re.finditer(rf"^#{{2,4}}\s+({NUM})[.\s]", text, re.MULTILINE))
    sections = {}
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections[match[1]] = text[match.start():end]
    return sections


def design_steps() -> set[str]:
    """The numbers of the steps listed under design.md's 'Data flow' heading."""
    text = DESIGN.read_text()
    match = re.search(r"^## Data flow[^\n]*\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL)
    assert match, "docs/design.md has no '## Data flow' section"
    return set(re.findall(r"^(\d+)\.\s", match[1], re.MULTILINE))


def _expand(listed: str) -> list[str]:
    """'1.1-1.4' -> 1.1 .. 1.4; '3 and 6' -> 3, 6; '2(b), 2(c)' -> 2(b), 2(c)."""
    parts = re.findall(rf"({NUM})|(-|–|to)", listed)
    out, pending_range = [], False
    for number, dash in parts:
        if dash:
            pending_range = True
            continue
        if pending_range and out:
            first, pending_range = out[-1], False
            a, b = first.split("."), number.split(".")
            if len(a) == len(b) and a[:-1] == b[:-1] and "(" not in first + number:
                prefix = ".".join(a[:-1]) + ("." if len(a) > 1 else "")
                out += [f"{prefix}{i}" for i in range(int(a[-1]) + 1, int(b[-1]) + 1)]
                continue
        out.append(number)
    return out


def parse_reference(rest: str) -> tuple[list[str], str | None]:
    """Section numbers (and a 'strategy N' of them) named right after 'methods.md' /
    'design.md'."""
    match = NUMBERS.match(rest)
    if not match:
        return [], None
    strategy = STRATEGY.match(rest, match.end())
    return _expand(match["list"]), strategy[1] if strategy else None


def reference_problems(path: Path, require_number: bool) -> list[str]:
    text = path.read_text(errors="replace")
    sections, steps, problems = methods_sections(), design_steps(), []
    for match in REFERENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        where = f"{path.relative_to(REPO)}:{line}"
        numbers, strategy = parse_reference(match["rest"])
        if not numbers:
            link = match["rest"].startswith(("](", ")", "#"))   # [methods.md](methods.md)
            if require_number and not link:
                problems.append(f"{where}: {match[0].strip()!r} names no section")
            continue
        known = sections if match["doc"] == "methods" else steps
        name = "docs/methods.md section" if match["doc"] == "methods" else "docs/design.md step"
        problems += [f"{where}: {name} {n} does not exist" for n in numbers if n not in known]
        if strategy and match["doc"] == "methods" and numbers[-1] in sections and \
                f"Strategy {strategy}" not in sections[numbers[-1]]:
            problems.append(f"{where}: section {numbers[-1]} has no strategy {strategy}")
    return problems


def _code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (REPO / d).rglob("*")
                  if p.is_file() and p.suffix in CODE_SUFFIXES and "__pycache__" not in p.parts)


# ------------------------------------------------------------------ references
@pytest.mark.parametrize("rest, numbers, strategy", [
    (" section 1.5)", ["1.5"], None),
    (" sections 1.1-1.4)", ["1.1", "1.2", "1.3", "1.4"], None),
    (" 1.1-1.5).", ["1.1", "1.2", "1.3", "1.4", "1.5"], None),
    (" 2(a), the qk_premise", ["2(a)"], None),
    (" sections 2(b), 2(c))", ["2(b)", "2(c)"], None),
    (" sections 3 and 6).", ["3", "6"], None),
    (" sections 1, 2, 5).", ["1", "2", "5"], None),
    (" s. 4)", ["4"], None),
    (" section 1.5, strategy 3).", ["1.5"], "3"),
    (" section 6 writes 1e-6", ["6"], None),
    (" step 4).", ["4"], None),
    ("](methods.md)", [], None),
])
def test_reference_parser(rest, numbers, strategy):
    assert parse_reference(rest) == (numbers, strategy)


def test_methods_has_the_sections_the_code_cites():
    sections = methods_sections()
    for number in ("1", "1.1", "1.2", "1.3", "1.4", "1.5", "1.6", "1.7", "2", "2(a)", "2(b)",
                   "2(c)", "3", "4", "5", "6"):
        assert number in sections, f"docs/methods.md has no section {number}"
    for strategy in ("1", "2", "3"):
        assert f"Strategy {strategy}" in sections["1.5"]


def test_code_references_name_existing_sections():
    """Every methods.md / design.md reference in attnrl/, trainers/, rewards/, configs/ and
    tools/ names a section (or step) that exists."""
    problems = [p for path in _code_files() for p in reference_problems(path, True)]
    assert not problems, "\n".join(problems)


def test_doc_references_name_existing_sections():
    """The same for README.md and docs/*.md (where a bare link to the page is fine)."""
    problems = [p for path in MARKDOWN for p in reference_problems(path, False)]
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ links
@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    problems = []
    for target in LINK.findall(_without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):   # http:, https:, mailto:
            continue
        path_text, _, anchor = target.partition("#")
        path = (page.parent / path_text).resolve() if path_text else page
        if not path.exists():
            problems.append(f"{target}: no such file")
        elif REPO not in path.parents and path != REPO:
            problems.append(f"{target}: outside the repository")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path.read_text()):
            problems.append(f"{target}: {path.name} has no heading with anchor #{anchor}")
    assert not problems, f"{page.relative_to(REPO)}:\n" + "\n".join(problems)


@pytest.mark.parametrize("page", GENERATED_DOCS, ids=lambda p: p.name)
def test_docs_name_existing_repository_paths(page):
    """Repository paths written as code (`attnrl/credit.py`) in these pages exist."""
    text = page.read_text()
    paths = [m.strip("`") for m in INLINE_CODE.findall(FENCE.sub("", text))]
    top = "|".join(CODE_DIRS + ("docs", "benchmarks", "launch", "tests"))
    missing = [p for p in paths if re.fullmatch(rf"(?:{top})/[\w./-]*", p)
               and not (REPO / p).exists()]
    assert not missing, f"{page.name} names paths that do not exist: {missing}"


# ------------------------------------------------------------------ generated page
def _config_doc():
    spec = importlib.util.spec_from_file_location("config_doc", REPO / "tools" / "config_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_page_is_current():
    page = DOCS / "configuration.md"
    generated = _config_doc().render()
    assert page.is_file(), f"docs/configuration.md is missing; run: {REGENERATE}"
    assert page.read_text() == generated, \
        f"docs/configuration.md differs from the schema; regenerate it: {REGENERATE}"


def test_configuration_page_lists_every_key():
    from trainers.schema import KEYS

    text = (DOCS / "configuration.md").read_text()
    missing = [name for name in KEYS if f"| `{name}` |" not in text]
    assert not missing, missing


# ------------------------------------------------------------------ recipes
def _blocks(language: str) -> list[str]:
    text = (DOCS / "recipes.md").read_text()
    blocks = re.findall(rf"^[ \t]*```{language}\n(.*?)^[ \t]*```", text,
                        re.MULTILINE | re.DOTALL)
    return [textwrap.dedent(block) for block in blocks]


def test_recipe_yaml_passes_the_schema():
    from trainers.schema import check_config

    blocks = _blocks("yaml")
    assert blocks
    for block in blocks:
        config = yaml.safe_load(block)
        assert isinstance(config, dict), block
        check_config(config, source="docs/recipes.md")


def _commands() -> list[list[str]]:
    commands = []
    for block in _blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):   # VAR=value prefixes
                words = words[1:]
            if words and words[0].endswith("/attnrl"):
                commands.append(words[1:])
    return commands


def test_recipe_commands_use_existing_options():
    from attnrl.cli import SUBCOMMANDS
    from trainers.schema import KEYS

    commands = _commands()
    assert commands
    parsers = {}
    problems = []
    for words in commands:
        name, options = words[0], [w for w in words[1:] if w.startswith("-")
                                   and not re.fullmatch(r"-[\d.]+(e-?\d+)?", w)]
        assert name in SUBCOMMANDS, f"attnrl has no command {name!r}"
        if name not in parsers:
            parser = argparse.ArgumentParser()
            importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
            parsers[name] = set(parser._option_string_actions)
        for option in (o.split("=", 1)[0] for o in options):
            key = option.lstrip("-").replace("-", "_")
            if option in parsers[name] or (name == "train" and key in KEYS):
                continue
            problems.append(f"attnrl {name}: unknown option {option}")
    assert not problems, "\n".join(problems)


def test_readme_is_one_screen_of_overview():
    """The README is the overview (setup, the main job, usage, links); the manual is docs/."""
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) < 200, f"README.md has {len(lines)} lines; move detail into docs/"
