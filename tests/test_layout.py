"""The shape of the repository (../shared/DESIGN.md): commands over a library, imports pointing one way."""

import ast

from conftest import ROOT

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
