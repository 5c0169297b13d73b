"""The shape of the repository (../shared/DESIGN.md): commands over a library, imports pointing one way."""

import ast

from helpers import ROOT

COMMANDS = {
    "train",
    "evaluate",
    "predict",
    "app",
    "export",
    "cache",
    "compute_pos_weight",
    "demo_data",
    "bench",
    "gpu_check",
    "compare",
    "download",
}
ALLOWED = {("bench", "train")}  # bench.py times train.py's own loop


def project_imports(path, modules):
    """The project's modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & modules


def test_commands_import_the_library_and_the_library_imports_no_command():
    modules = {path.stem for path in ROOT.glob("*.py")}
    assert COMMANDS <= modules
    wrong = []
    for path in ROOT.glob("*.py"):
        for imported in project_imports(path, modules) - {path.stem}:
            if imported in COMMANDS and (path.stem, imported) not in ALLOWED:
                wrong.append(f"{path.name} imports the command {imported}.py")
    assert not wrong, wrong


def test_every_file_at_the_top_has_a_row_in_the_readme_and_the_count_is_right():
    import re

    readme = (ROOT / "README.md").read_text()
    files = sorted(path.name for path in ROOT.glob("*.py"))
    missing = [name for name in files if f"| `{name}` |" not in readme]
    assert not missing, f"README's file tables lack {missing}"
    said = re.search(r"That is (\d+) files at the top", readme)
    assert said and int(said.group(1)) == len(files), (said and said.group(0), len(files))


FILE_SUFFIXES = {"py", "pth", "onnx", "json", "csv", "png", "txt", "md", "npy", "tmp", "part", "gz", "jpg", "html"}


def defined_names(path):
    """The names a module defines or imports at its top level, and each class's attributes as Class.name."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {target.id for target in targets if isinstance(target, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return names


def comments_and_docstrings(path):
    """The text of a file's comments and docstrings."""
    import io
    import tokenize

    texts = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type == tokenize.COMMENT:
            texts.append(token.string)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts.append(ast.get_docstring(node) or "")
    return "\n".join(texts)


def test_every_module_name_that_a_comment_or_docstring_names_exists():
    import re

    modules = {path.stem: path for path in ROOT.glob("*.py")}
    defined = {name: defined_names(path) for name, path in modules.items()}
    pattern = re.compile(r"\b(" + "|".join(sorted(modules)) + r")\.([A-Za-z_]\w*)")
    stale = []
    for path in sorted([*ROOT.glob("*.py"), *(ROOT / "tests").glob("*.py")]):
        for module, name in pattern.findall(comments_and_docstrings(path)):
            if name not in FILE_SUFFIXES and name not in defined[module]:
                stale.append(f"{path.name} names {module}.{name}")
    assert not stale, sorted(set(stale))


NO_USER_ERRORS = {"bench", "demo_data"}  # they read nothing a user gives but numbers argparse checks


def test_every_command_turns_a_user_error_into_one_line():
    """The catch and exit lives once (errors.one_line_errors), in every command that reads a user's files."""
    import pytest

    from errors import DataError, one_line_errors

    missing = [
        name for name in COMMANDS - NO_USER_ERRORS if "one_line_errors(" not in (ROOT / f"{name}.py").read_text()
    ]
    assert not missing and "one_line_errors(FloatingPointError)" in (ROOT / "train.py").read_text(), missing
    with pytest.raises(SystemExit) as stopped, one_line_errors():
        raise DataError("labels.csv, row 7: no such finding")
    assert stopped.value.code == "error: labels.csv, row 7: no such finding"
    with pytest.raises(KeyError), one_line_errors():  # a bug stays a traceback
        raise KeyError("x")
    with pytest.raises(SystemExit) as stopped, one_line_errors(interrupted="the next run resumes"):
        raise KeyboardInterrupt
    assert stopped.value.code == "interrupted: the next run resumes"
    with pytest.raises(KeyboardInterrupt), one_line_errors():  # a command that says nothing of Ctrl-C
        raise KeyboardInterrupt
