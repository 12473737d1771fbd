"""The user documentation (README.md and docs/*.md) checked against the code, so that it cannot rot silently.

What is checked, without running any work:
- **Commands.** Every command in a fenced shell block (```bash, ```sh, ```shell, ```console: there only the lines
  after a `$ ` prompt) that runs one of our scripts (`python scripts/X.py ...`, `accelerate launch [its options]
  scripts/X.py ...`) must parse with that script's own command line: its `parse_args(argv)` where it has one (the
  flags and the script's own checks of how they combine), else `build_parser().parse_args(argv)`. A recipe given to
  `adapt.py` (with its `dotted.key=value` overrides) or to `evaluate.py --recipe` is loaded through
  `ttt_adapt.recipe.load_recipe`, which checks every key, type and value and reads no data file. Other commands
  (pip, pytest, lm_eval, vllm, curl, shell built-ins) are not ours and are skipped.
- **Files.** A path the docs name that lies in the repository's own folders (`recipes/`, `scripts/`, `ttt_adapt/`,
  `tests/`, `docs/`), in a command or in backticks in the text, must exist. Anything else is a placeholder or an
  output: `/data/long_docs`, `runs/...`, `exports/my-model`, `org/name` are not checked.
- **Recipe keys.** Every key of the recipe schema (each field of each section, dotted: `train.lora.r`) appears in
  docs/training.md, and every dotted key the docs quote in backticks (`train.spike_factor`, `ttt.layers=[0,2]`) is a
  key of the schema (or a section of it, or `section.*`).
- **Links.** Every relative link resolves to a file (and a `#heading` in it); README.md links every docs page.
- **Python snippets.** A ```python block runs as written, in a temporary folder (repository paths in its strings are
  made absolute). An HTML comment on the line before it may say `<!-- docs-test: replace A with B -->` (run with
  the text A replaced by B, e.g. a hub checkpoint by the shipped tiny model) or `<!-- docs-test: compile-only:
  WHY -->` (the block needs what a test cannot have: it is compiled, and its imports of ttt_adapt and of installed
  packages are run).
`test_the_checker_reports_renamed_flags_keys_files_and_links` proves each check fails on a renamed name.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import re
import shlex
import typing
from pathlib import Path
from unittest import mock

import pytest

from ttt_adapt._util import RecipeError

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
REPO_FOLDERS = ("recipes/", "scripts/", "ttt_adapt/", "tests/", "docs/")
SECTIONS = ("model", "ttt", "data", "train", "parallel", "export", "eval")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!--\s*docs-test:\s*([^\n]*?)\s*-->\s*\n$")
LINK = re.compile(r"\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")
SCRIPT = re.compile(r"(?:^|/)scripts/(\w+)\.py$")
KEY = re.compile(rf"^(?:{'|'.join(SECTIONS)})\.[a-z_][\w.*]*(?=$|[=: ])")  # a key, then a value or nothing


@dataclasses.dataclass
class Block:
    lang: str
    code: str
    line: int  # where the block's code starts in its page (1-based)
    marker: str | None


def blocks(text: str) -> list[Block]:
    """The fenced code blocks of a markdown text, with the docs-test marker just before each, if any."""
    out = []
    for m in FENCE.finditer(text):
        before = MARKER.search(text[: m.start()][-400:])
        out.append(Block(m.group(1), m.group(2), text[: m.start()].count("\n") + 2, before and before.group(1)))
    return out


def shell_commands(block: Block) -> list[list[str]]:
    """The simple commands of a shell block, as word lists (continuations joined, comments dropped, split at
    `&&`, `||`, `;`, `|`, `&`)."""
    lines = block.code.replace("\\\n", " ").splitlines()
    if block.lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        current = []
        for word in lexer:
            if word and set(word) <= set("&|;()<>"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
    return [c for c in commands if c]


def script_call(words: list[str]) -> tuple[str, list[str]] | None:
    """(script name, its arguments) if the command runs one of our scripts with python or accelerate launch."""
    while words and re.match(r"^\w+=", words[0]):  # VAR=value before the command
        words = words[1:]
    if not words or not (re.match(r"^python(3(\.\d+)?)?$", words[0]) or words[:2] == ["accelerate", "launch"]):
        return None
    for i, word in enumerate(words):
        m = SCRIPT.search(word)
        if m:
            return m.group(1), words[i + 1 :]
    return None


_modules = {}


def script_module(repo: Path, name: str):
    path = repo / "scripts" / f"{name}.py"
    if path not in _modules:
        spec = importlib.util.spec_from_file_location(f"docs_script_{name}_{len(_modules)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _modules[path] = module
    return _modules[path]


def parse(module, argv: list[str]) -> str | None:
    """None if the script's command line accepts `argv`, each flag spelled out in full (argparse would take a
    documented `--device-memory` for a renamed `--device-memory-gb`); else the reason."""
    init = argparse.ArgumentParser.__init__

    def exact(self, *args, **kwargs):
        init(self, *args, **{**kwargs, "allow_abbrev": False})

    try:
        with mock.patch.object(argparse.ArgumentParser, "__init__", exact):
            if hasattr(module, "parse_args"):
                module.parse_args(argv)
            else:
                module.build_parser().parse_args(argv)
    except RecipeError as e:  # UsageError: the scripts' one-line parser error
        return str(e)
    except SystemExit as e:  # a plain argparse parser (benchmark.py, make_tiny_base.py) prints and exits
        return f"the parser rejected it (exit {e.code})"
    return None


def check_command(words: list[str], repo: Path = REPO) -> list[str]:
    """What is wrong with one documented command (empty: nothing, or not one of ours)."""
    call = script_call(words)
    if call is None:
        return []
    name, argv = call
    if not (repo / "scripts" / f"{name}.py").is_file():
        return [f"scripts/{name}.py does not exist"]
    problems = [f"{word} does not exist" for word in argv for path in [word.partition("=")[2] or word]
                if path.startswith(REPO_FOLDERS) and not (repo / path).exists()]
    if problems:
        return problems
    module = script_module(repo, name)
    reason = parse(module, argv)
    if reason:
        return [f"scripts/{name}.py does not accept {shlex.join(argv)}: {reason}"]
    from ttt_adapt.recipe import load_recipe

    recipe, overrides = None, []
    if name == "adapt":
        args = module.parse_args(argv)
        recipe, overrides = args.recipe, args.overrides
    elif name == "evaluate":
        recipe = module.parse_args(argv).recipe
    if recipe is not None:
        try:
            load_recipe(repo / recipe, overrides)
        except RecipeError as e:
            return [f"{recipe} {' '.join(overrides)}: {e}"]
    return []


def schema_keys() -> set[str]:
    """Every dotted key of the recipe schema: each field of each section (nested sections expanded)."""
    from ttt_adapt.recipe import Recipe

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kinds = [t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None)]
            if dataclasses.is_dataclass(kinds[0]):
                yield from walk(kinds[0], f"{prefix}{f.name}.")
            elif f.init and prefix:
                yield f"{prefix}{f.name}"

    return set(walk(Recipe, ""))


def slug(heading: str) -> str:
    """GitHub's anchor of a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", text, re.MULTILINE)}


def check_text(page: Path, text: str, keys: set[str], repo: Path = REPO) -> list[str]:
    """What is wrong in one page's text: its commands, the keys and repository files it quotes, its links."""
    problems = []
    prose = FENCE.sub("", text)
    for block in blocks(text):
        if block.lang in SHELL:
            for words in shell_commands(block):
                problems += [f"{page.name}:{block.line}: {p}" for p in check_command(words, repo)]
    sections = {k.rsplit(".", 1)[0] for k in keys}
    for span in SPAN.findall(prose):
        m = KEY.match(span)
        is_file_name = re.fullmatch(r"[\w-]+\.(json|jsonl|yaml|md|py|png|txt|log)", span)  # e.g. `train.json`
        if m and not is_file_name and m.group(0) not in keys | sections and not m.group(0).endswith(".*"):
            problems.append(f"{page.name}: `{span}` names no recipe key")
        if span.startswith(REPO_FOLDERS) and not any(c in span for c in " *<>[") and not (repo / span).exists():
            problems.append(f"{page.name}: `{span}` does not exist")
    for target in LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            problems.append(f"{page.name}: link {target} leads nowhere")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{page.name}: link {target}: no such heading in {dest.name}")
    return problems


def test_every_documented_command_key_file_and_link_exists():
    keys = schema_keys()
    problems = [p for page in PAGES for p in check_text(page, page.read_text(), keys)]
    assert problems == []


def test_the_docs_show_commands_of_every_script():
    """The checks above have something to check: each script is run somewhere in the docs, and adapt.py with
    overrides."""
    calls = [script_call(words) for page in PAGES for b in blocks(page.read_text()) if b.lang in SHELL
             for words in shell_commands(b)]
    names = {c[0] for c in calls if c}
    assert names == {p.stem for p in (REPO / "scripts").glob("*.py")}
    assert any(name == "adapt" and any("=" in a for a in argv) for name, argv in filter(None, calls))


def test_every_recipe_key_is_in_the_training_page():
    text = (REPO / "docs" / "training.md").read_text()
    keys = schema_keys()
    assert {"train.lora.r", "ttt.chunk_size", "eval.seq_len", "export.push_to_hub"} <= keys
    assert sorted(k for k in keys if f"`{k}`" not in text) == []


def test_the_readme_is_short_and_links_every_docs_page():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    linked = {(REPO / target.partition("#")[0]).resolve() for target in LINK.findall(text)}
    assert sorted(p.name for p in PAGES[1:] if p.resolve() not in linked) == []


def python_blocks():
    return [pytest.param(page, b, id=f"{page.name}:{b.line}") for page in PAGES for b in blocks(page.read_text())
            if b.lang == "python"]


@pytest.mark.parametrize("page,block", python_blocks())
def test_python_snippet(page, block, tmp_path, monkeypatch):
    code = block.code
    for folder in REPO_FOLDERS:  # repository paths, as when run from the repository root
        code = code.replace(f'"{folder}', f'"{REPO / folder}/')
    tree = compile(code, f"{page.name}:{block.line}", "exec", ast.PyCF_ONLY_AST)
    if block.marker and block.marker.startswith("compile-only:"):
        imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        importable = [n for n in imports if all(
            importlib.util.find_spec(top) is not None
            for top in ([a.name.split(".")[0] for a in n.names] if isinstance(n, ast.Import) else [n.module.split(".")[0]])
        )]
        assert any(importable) or not imports
        exec(compile(ast.Module(importable, []), page.name, "exec"), {})
        return
    if block.marker:
        m = re.fullmatch(r"replace (\S+) with (\S+)", block.marker)
        assert m, f"unknown docs-test marker: {block.marker}"
        old, new = m.groups()
        assert old in code
        code = code.replace(old, str(REPO / new) if new.startswith(REPO_FOLDERS) else new)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page.name}:{block.line}", "exec"), {"__name__": "__docs__"})


def test_the_checker_reports_renamed_flags_keys_files_and_links(tmp_path):
    """Each check fails on a renamed flag, recipe key, recipe file, script, quoted key or link: shown on a copy
    of the real docs with one name changed each time, and on a copy of a script whose flag was renamed."""
    keys = schema_keys()
    page = REPO / "docs" / "training.md"
    text = page.read_text()
    assert check_text(page, text, keys) == []
    renamed = [  # (the name in the docs, a new name, what the report must say)
        ("--device-memory 80GB", "--device-mem 80GB", "does not accept"),  # a flag
        ("train.max_steps=50", "train.max_step=50", "train.max_step: unknown key (did you mean 'max_steps'?)"),
        ("recipes/tiny_qwen3.yaml train.max_steps", "recipes/tiny_qwen.yaml train.max_steps",
         "recipes/tiny_qwen.yaml does not exist"),  # a recipe file
        ("scripts/make_tiny_base.py --write", "scripts/make_base.py --write", "scripts/make_base.py does not exist"),
        ("`train.spike_factor`", "`train.spike_ratio`", "`train.spike_ratio` names no recipe key"),
        ("(export.md)", "(exporting.md)", "link exporting.md leads nowhere"),
        ("(model.md#families)", "(model.md#family)", "link model.md#family: no such heading in model.md"),
        ("`ttt_adapt/loss.py`", "`ttt_adapt/losses.py`", "`ttt_adapt/losses.py` does not exist"),
    ]
    for old, new, expected in renamed:
        assert old in text, old
        problems = check_text(page, text.replace(old, new), keys)
        assert problems and all(expected in p for p in problems), (old, problems)

    # the schema loses a documented key: the coverage test's condition, and quoted keys, catch it
    assert "`train.spike_factor`" in text and "train.spike_factor" in keys
    assert any("train.spike_factor" in p for p in check_text(page, text, keys - {"train.spike_factor"}))

    # a script renames a flag that the docs use
    copy = tmp_path / "repo"
    (copy / "scripts").mkdir(parents=True)
    (copy / "recipes").symlink_to(REPO / "recipes")
    (copy / "ttt_adapt").symlink_to(REPO / "ttt_adapt")
    source = (REPO / "scripts" / "export.py").read_text()
    (copy / "scripts" / "export.py").write_text(source.replace('"--refresh-code"', '"--refresh"'))
    command = shlex.split("python scripts/export.py --refresh-code exports/my-model")
    assert check_command(command) == []
    problems = check_command(command, repo=copy)
    assert len(problems) == 1 and "--refresh-code" in problems[0], problems
