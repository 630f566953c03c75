"""The README (the front page) and the documentation site (``docs/``, ``mkdocs.yml``) say what the code does.

- the site builds with ``mkdocs build --strict`` (every page in the nav, every link between pages and every anchor
  resolved);
- every ```python block runs as written, offline (no weights are downloaded), except those that open with
  ``# needs:`` (files made by another step, such as the deployment recipe, which tests/test_export.py runs on files
  it exports itself);
- every command line of a ```bash / ```sh / ```shell block that runs ``fl-rpn-train``, ``-eval``, ``-predict``,
  ``-export`` or ``-check-data`` (also through ``python -m fl_rpn.cli.<name>``, ``torchrun``, ``srun``, ``make demo
  ARGS=...``) composes its command's config in process, with no unknown key (a sweep by its first value); those of
  ``fl-rpn-report`` and ``fl-rpn-weights`` parse with the command's own argparse parser;
- the README stays a front page (at most 260 lines), and every relative link points at a file (and heading) that
  exists.
"""

import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from fl_rpn.config import CONF_DIR

ROOT = CONF_DIR.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 260


def python_blocks(page: Path = README) -> list[str]:
    """``page``'s ```python blocks, except those that open with ``# needs:``."""
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    return [b for b in blocks if not b.startswith("# needs:")]


def test_every_python_snippet_runs_offline(monkeypatch, tmp_path):
    import torch.hub
    import torchvision.models._api

    def offline(url, *args, **kwargs):
        raise AssertionError(f"a documented snippet downloads {url}")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached either
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    assert python_blocks(README), "no ```python block in the README"
    for page in PAGES:
        for block in python_blocks(page):
            namespace: dict = {}
            exec(compile(block, str(page), "exec"), namespace)  # noqa: S102
            model = namespace.get("model")
            if page == README and model is not None:  # the README's last model is the swapped Mask R-CNN
                from fl_rpn import FocalLossRPN

                assert isinstance(model.rpn, FocalLossRPN)


@pytest.mark.parametrize("name", ["maskrcnn_resnet50_fpn"])
def test_the_snippet_names_the_offline_arguments(name):
    assert any(f"{name}(weights=None, weights_backbone=None" in block for block in python_blocks(README))


# -- the documented command lines ------------------------------------------------------------------------------
HYDRA_COMMANDS = {  # console script -> the config it composes
    "fl-rpn-train": "train", "fl-rpn-eval": "evaluate", "fl-rpn-predict": "predict", "fl-rpn-export": "export",
    "fl-rpn-check-data": "train",
}  # fmt: skip
ARGPARSE_COMMANDS = ("fl-rpn-report", "fl-rpn-weights")
MODULES = {
    "fl_rpn.cli.train": "fl-rpn-train", "fl_rpn.cli.eval": "fl-rpn-eval", "fl_rpn.cli.predict": "fl-rpn-predict",
    "fl_rpn.cli.export": "fl-rpn-export", "fl_rpn.cli.check_data": "fl-rpn-check-data",
    "fl_rpn.cli.report": "fl-rpn-report", "fl_rpn.cli.weights": "fl-rpn-weights",
}  # fmt: skip
MAKE_TARGETS = {"demo": "fl-rpn-train", "weights": "fl-rpn-weights"}  # the Makefile: $(VENV)/bin/<command> $(ARGS)
OPERATORS = {";", "&&", "||", "|", "&", "(", ")"}
HEREDOC = re.compile(r"<<-?\s*(['\"]?)(\w+)\1")


@dataclass
class CommandLine:
    where: str  # page:line
    command: str  # the console script
    args: list[str]
    files: dict[str, str]  # files the block wrote before this line (cat > FILE <<'EOF' ... EOF), relative paths

    def __repr__(self) -> str:
        return self.where


def strip_comment(line: str) -> str:
    """``line`` without its shell comment: a ``#`` at the start of a word, outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def logical_lines(block: str):
    """``(offset, line, files)`` of a shell block: comments stripped, ``\\`` continuations joined, here-documents
    taken out (``cat > FILE <<'EOF'`` bodies become ``files``, the files written so far)."""
    lines, files, i, pending, start = block.split("\n"), {}, 0, "", 0
    while i < len(lines):
        raw = lines[i]
        i += 1
        heredoc = HEREDOC.search(raw)
        if heredoc:  # the body, up to the delimiter, is data
            body = []
            while i < len(lines) and lines[i].strip() != heredoc.group(2):
                body.append(lines[i])
                i += 1
            i += 1
            target = re.search(r">\s*(\S+)", raw[: heredoc.start()])
            if target:
                files[target.group(1)] = "\n".join(body) + "\n"
            raw = raw[: heredoc.start()]
        line = strip_comment(raw)
        if not pending:
            start = i - 1
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.strip():
            yield start, line, dict(files)


def find_command(tokens: list[str]) -> tuple[str, list[str]] | None:
    """The console script a shell segment runs and its arguments, wherever the command word is (after an
    environment assignment, ``torchrun ... -m``, ``srun python -m``, ``make demo ARGS=...``), or None."""
    for i, token in enumerate(tokens):
        name = token.rsplit("/", 1)[-1]
        if name in HYDRA_COMMANDS or name in ARGPARSE_COMMANDS:
            return name, tokens[i + 1 :]
        if token == "-m" and i + 1 < len(tokens) and tokens[i + 1] in MODULES:
            return MODULES[tokens[i + 1]], tokens[i + 2 :]
        if token == "make":
            target = next((t for t in tokens[i + 1 :] if t in MAKE_TARGETS), None)
            if target is None:
                return None
            args = next((t.split("=", 1)[1] for t in tokens[i + 1 :] if t.startswith("ARGS=")), "")
            return MAKE_TARGETS[target], shlex.split(args)
    return None


def command_lines() -> list[CommandLine]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in re.finditer(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
            first = text.count("\n", 0, match.start(1)) + 1
            for offset, line, files in logical_lines(match.group(1)):
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split, lexer.commenters = True, ""
                tokens, segment = list(lexer), []
                for token in [*tokens, ";"]:
                    if token not in OPERATORS:
                        segment.append(token)
                        continue
                    command = find_command(segment)
                    segment = []
                    if command:
                        args = [a for a in command[1] if a not in ("...", "…")]  # "..." stands for more arguments
                        found.append(CommandLine(f"{page.name}:{first + offset}", command[0], args, files))
    return found


COMMAND_LINES = command_lines()


def test_the_pages_document_every_command():
    assert {c.command for c in COMMAND_LINES} == {*HYDRA_COMMANDS, *ARGPARSE_COMMANDS}


# conf/hydra/launcher/{joblib,submitit_local}.yaml share their plugin's schema name: harmless (fl_rpn/cli/train.py)
@pytest.mark.filterwarnings(r"ignore:\s*'hydra/launcher/\w+' is validated against ConfigStore schema:UserWarning")
@pytest.mark.parametrize("line", COMMAND_LINES, ids=repr)
def test_every_documented_command_line_composes(line, tmp_path, monkeypatch):
    """In process, as the command's preflight parses it: Hydra's override parser, the command's config, a sweep
    by its first value. Placeholders (``DIR``, ``outputs/.../last.pt``) are plain strings to the config."""
    for name, content in line.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(content)
    monkeypatch.chdir(tmp_path)
    args = [a.replace("${PWD}", str(tmp_path)).replace("$PWD", str(tmp_path)) for a in line.args]
    if line.command in ARGPARSE_COMMANDS:
        from fl_rpn.cli import report, weights

        parser = (report if line.command == "fl-rpn-report" else weights).parser()
        if "--help" not in args and "-h" not in args:
            try:
                parser.parse_args(args)
            except SystemExit as err:
                pytest.fail(f"{line.where}: {line.command} {' '.join(args)}: argparse exits with {err.code}")
        return
    if {"--help", "-h", "--hydra-help"} & set(args):
        return  # the command prints its help and exits
    from hydra._internal.utils import get_args_parser

    from fl_rpn.cli.preflight import _overrides, unknown_key_message
    from fl_rpn.config import compose_config

    parsed = _overrides(args)
    assert parsed is not None, f"{line.where}: Hydra's parser refuses {args}"
    overrides, _ = parsed
    composed = []
    for o in overrides:
        if o.is_sweep_override():
            prefix = "++" if o.is_force_add() else "+" if o.is_add() else "~" if o.is_delete() else ""
            composed.append(f"{prefix}{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
        else:
            composed.append(o.input_line)
    config_dir = get_args_parser().parse_args(args).config_dir
    if config_dir:  # --config-dir DIR: Hydra searches DIR first
        composed.append(f"hydra.searchpath=[file://{(tmp_path / config_dir).resolve()}]")
    config_name = HYDRA_COMMANDS[line.command]
    try:
        compose_config(composed, config_name=config_name)
    except Exception as err:  # the preflight's message when it is an unknown key, else Hydra's
        message = unknown_key_message(line.command, config_name, overrides) or f"{type(err).__name__}: {err}"
        pytest.fail(f"{line.where}: {line.command} {' '.join(args)}\n{message}")


# -- the front page and the links --------------------------------------------------------------------------------
def test_the_readme_is_a_front_page():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines; move sections to docs/ (at most {README_MAX_LINES})"
    )


def slug(heading: str) -> str:
    """The anchor of a heading, as MkDocs' toc extension and GitHub make it for plain ASCII headings."""
    text = heading.replace("`", "").replace("*", "").strip().lower()  # the rendered text: code and emphasis kept
    text = re.sub(r"[^\w\s-]", "", text)
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def links(page: Path) -> list[str]:
    """The targets of ``page``'s markdown links, outside code."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_a_file_that_exists(page):
    targets = links(page)
    if page == README:
        assert any(t.startswith("docs/") for t in targets) and any(t.startswith("experiments/") for t in targets)
    for target in targets:
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: the link {target} points at {file}, which does not exist"
        if page.parent == DOCS:
            assert file.is_relative_to(DOCS), f"{page.name}: {target} leaves docs/ (MkDocs cannot link there)"
        if anchor and file.suffix == ".md":
            assert anchor in anchors(file), f"{page.name}: {target}: no heading of {file.name} has the anchor #{anchor}"


# -- the site ----------------------------------------------------------------------------------------------------
def test_the_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="mkdocs is not installed: pip install -e '.[dev]'")
    pytest.importorskip("material", reason="mkdocs-material is not installed: pip install -e '.[dev]'")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pages = {p.relative_to(DOCS).with_suffix("").as_posix() for p in DOCS.glob("*.md")}
    for page in pages - {"index"}:
        assert (tmp_path / "site" / page / "index.html").is_file(), page


def test_the_layout_names_every_module_and_config():
    """docs/extending.md's layout lists every module of the package and every config folder and root file."""
    text = (DOCS / "extending.md").read_text()
    layout = re.search(r"## Layout\n\n```\n(.*?)```", text, flags=re.S).group(1)
    package = ROOT / "fl_rpn"
    for module in package.rglob("*.py"):
        if module.name != "__init__.py" or module.parent == package:
            assert module.name in layout, f"the layout of docs/extending.md does not name {module.relative_to(ROOT)}"
    for folder in sorted({p.parent for p in package.rglob("*.py")} - {package}):
        assert f"fl_rpn/{folder.name}/" in layout, folder
    for item in CONF_DIR.iterdir():
        if item.suffix == ".yaml":
            assert item.name in layout, item
        elif item.is_dir():
            assert f"{item.name}/" in layout, item
