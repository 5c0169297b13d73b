"""The shape of the repository (../shared/DESIGN.md): at the top the user's files and the commands, over one
package (cxr14/); imports pointing one way; every file described once; the manual's links resolving; files and
functions short enough to read at once."""

import ast
import re

from helpers import ROOT

USER_FILES = {"train", "model", "dataset", "transforms", "compute_pos_weight"}
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
PACKAGE = ROOT / "cxr14"
TEST_TOPICS = {"layout", "trust", "grad_cam"}  # test files named after what they check across modules
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MAX_README_BYTES = 15_000


def top_files():
    return sorted(ROOT.glob("*.py"))


def package_files():
    return sorted(path for path in PACKAGE.glob("*.py") if path.name != "__init__.py")


def module_name(path):
    """train for train.py at the top, cxr14.loop for cxr14/loop.py."""
    return path.stem if path.parent == ROOT else f"cxr14.{path.stem}"


def project_imports(path, modules):
    """The project's modules a file imports, at the top or inside functions (or in code it runs as text)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & modules


def import_graph():
    files = [*top_files(), *package_files()]
    modules = {module_name(path) for path in files}
    return {module_name(path): project_imports(path, modules) - {module_name(path)} for path in files}


def test_the_top_holds_the_users_files_and_the_commands_alone():
    assert {path.stem for path in top_files()} == USER_FILES | COMMANDS


def test_no_command_imports_another_and_the_package_imports_no_command():
    """model.py, dataset.py and transforms.py are imported by commands and package alike; train.py and
    compute_pos_weight.py, the user's files that run, by nothing."""
    wrong = [
        f"{module} imports the command {other}.py"
        for module, imported in import_graph().items()
        for other in sorted(imported & COMMANDS)
    ]
    assert not wrong, wrong


def test_imports_have_no_cycle():
    """The user's files (model.py, dataset.py, transforms.py) import only the package's lowest layer, which imports
    none of them; the rest of the package imports them; the commands import both. A cycle would mean two modules
    that cannot be read apart."""
    graph, state, cycles = import_graph(), {}, []

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                cycles.append(" -> ".join([*path[path.index(other) :], other]))
            elif other not in state:
                visit(other, [*path, other])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_files_and_functions_are_short_enough_to_read_at_once():
    long_modules, long_functions = [], []
    for path in [*top_files(), *package_files()]:
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.name}: {node.name} {lines} lines")
    assert not long_modules and not long_functions, (long_modules, long_functions)


def test_every_file_is_described_once_in_the_readme():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    missing = [path.name for path in top_files() if readme.count(f"| `{path.name}` |") != 1]
    assert not missing, f"README's file tables lack (or repeat) {missing}"
    package_table = readme[readme.index("| `cxr14/` |") :].split("\n\n")[0]
    named = re.findall(r"`(\w+)`", package_table)
    unnamed = [path.stem for path in package_files() if named.count(path.stem) != 1]
    assert not unnamed, f"README's package table names these not exactly once: {unnamed}"
    assert not set(named) - {path.stem for path in package_files()} - {"cxr14"}, named


def test_no_two_modules_differ_by_a_suffix():
    """dataset/datasets, evaluate/evaluation: one name for one concept (the stale-name check's twin)."""
    modules = sorted({path.stem for path in [*top_files(), *package_files()]})

    def stem(name):
        return re.sub(r"(ions|ion|ings|ing|es|e|s)$", "", name)

    pairs = [(a, b) for a in modules for b in modules if a < b and stem(a) == stem(b)]
    assert not pairs, pairs


def test_tests_are_named_after_a_module():
    modules = {path.stem for path in [*top_files(), *package_files()]}
    strays = [path.name for path in (ROOT / "tests").glob("test_*.py") if path.stem[5:] not in modules | TEST_TOPICS]
    assert not strays, strays


def heading_anchor(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_the_readme_is_a_page_and_every_link_of_it_and_the_manual_resolves():
    assert len((ROOT / "README.md").read_bytes()) < MAX_README_BYTES
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target):
                continue  # a web address: not checked offline
            file_part, _, anchor = target.partition("#")
            linked = (page.parent / file_part).resolve() if file_part else page
            if not linked.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", linked.read_text(encoding="utf-8"), re.M)
                if anchor not in {heading_anchor(heading) for heading in headings}:
                    broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_messages_that_send_the_user_to_the_manual_name_a_page_that_exists():
    """'see docs/training.md, "GPU setup"': the page, and its heading."""
    wrong = []
    for path in [*top_files(), *package_files()]:
        for page, heading in re.findall(r"(docs/\w+\.md)(?:, [\"']([^\"']+)[\"'])?", path.read_text(encoding="utf-8")):
            if not (ROOT / page).is_file():
                wrong.append(f"{path.name}: {page}")
            elif heading and heading not in (ROOT / page).read_text(encoding="utf-8"):
                wrong.append(f"{path.name}: {page}, {heading!r}")
        if re.search(r"\bREADME\b", path.read_text(encoding="utf-8")):
            wrong.append(f"{path.name} sends the user to the README, which is a page now: name the docs/ page")
    assert not wrong, wrong


FILE_SUFFIXES = {"py", "pth", "onnx", "json", "csv", "png", "txt", "md", "npy", "tmp", "part", "gz", "jpg", "html"}


def defined_names(path):
    """The names a module defines or imports at its top level, and each class's attributes as Class.name."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
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
    for token in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if token.type == tokenize.COMMENT:
            texts.append(token.string)
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            texts.append(ast.get_docstring(node) or "")
    return "\n".join(texts)


def test_every_module_name_that_a_comment_or_docstring_names_exists():
    import re

    modules = {path.stem: path for path in [*top_files(), *package_files()]}
    defined = {name: defined_names(path) for name, path in modules.items()}
    pattern = re.compile(r"\b(" + "|".join(sorted(modules)) + r")\.([A-Za-z_]\w*)")
    stale = []
    for path in sorted([*top_files(), *package_files(), *(ROOT / "tests").glob("*.py")]):
        for module, name in pattern.findall(comments_and_docstrings(path)):
            if name not in FILE_SUFFIXES and name not in defined[module]:
                stale.append(f"{path.name} names {module}.{name}")
    assert not stale, sorted(set(stale))


NO_USER_ERRORS = {"bench", "demo_data"}  # they read nothing a user gives but numbers argparse checks


def test_every_command_turns_a_user_error_into_one_line():
    """The catch and exit lives once (errors.one_line_errors), in every command that reads a user's files."""
    import pytest

    from cxr14.errors import DataError, one_line_errors

    missing = [
        name
        for name in COMMANDS - NO_USER_ERRORS
        if "one_line_errors(" not in (ROOT / f"{name}.py").read_text(encoding="utf-8")
    ]
    assert not missing and "one_line_errors(FloatingPointError)" in (ROOT / "train.py").read_text(encoding="utf-8"), (
        missing
    )
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


TEXT_CALLS = ("read_text", "write_text", "open")
NOT_TEXT_FILES = {"tarfile", "gzip", "Image", "os", "zipfile", "webbrowser"}  # modules whose open() is no text file


def opens_text_without_encoding(node):
    """A read_text, write_text or text-mode open() call that leaves the encoding to the platform."""
    if not isinstance(node, ast.Call) or any(keyword.arg in ("encoding", None) for keyword in node.keywords):
        return False  # named, or forwarded with **options from a caller that is checked in turn
    function = node.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    if name not in TEXT_CALLS:
        return False
    if name == "open":
        owner = getattr(getattr(function, "value", None), "id", None)
        mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
        modes = [part.value for part in ast.walk(mode) if isinstance(part, ast.Constant)] if mode else []
        return owner not in NOT_TEXT_FILES and not (modes and all("b" in str(value) for value in modes))
    return True


def test_every_text_file_is_read_and_written_as_utf8():
    """A Windows user's default encoding is cp1252, which cannot write compare.md's Δ: every text file names
    UTF-8."""
    unnamed = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in [*top_files(), *package_files(), *sorted((ROOT / "tests").glob("*.py"))]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if opens_text_without_encoding(node)
    ]
    assert not unnamed, unnamed
