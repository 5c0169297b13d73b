"""Settings, checked once when they are parsed: train.py's constants, config files and --name value flags; and the
flags every command shares (--device, --amp, --out).

    python train.py config/demo.py --epochs 3 --batch_size=32

train.py's settings are its annotated UPPER_CASE constants, `NAME: Rule = default  # what it means`: the annotation
says which values the setting may take, the default is its value, the comment is its --help. They are found as
annotated assignments (Python's own parser), never by the look of a line, and --help lists each with its allowed
values and default. A config file holds `NAME = value` lines of plain values (numbers, text, true/false, lists,
None): it is read, never run, and anything else in it is an error naming the file and the line. Every value, from a
file or a flag, is checked against its rule before the command writes or reads anything; a wrong one is one line
that names the setting and lists what it may be. This file imports no torch: `python train.py --help` stays instant.
"""

import argparse
import ast
import inspect
import io
import math
import os
import sys
import tokenize
from pathlib import Path

from cxr14.errors import DataError, SettingsError


class Rule:
    """Which values a setting may take: its type (str, int, float, bool), a check, and the allowed values in words."""

    def __init__(self, kind, allowed, check=None, values=(), cost=None):
        check = check or (lambda value: True)
        self.cost = cost  # what a refused value would have taken, said beside the refusal, or None
        if kind in (int, float):  # inf and NaN pass every comparison's check or none: neither is ever a setting
            self.check = lambda value: math.isfinite(value) and check(value)
        else:
            self.check = check
        self.kind, self.allowed = kind, allowed
        self.values = values  # the allowed values, where they can be listed

    def parse(self, text):
        """A command-line value of this setting's type (argparse's `type`)."""
        if self.kind is bool:
            return _parse_bool(text)
        try:
            return self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {_KIND_NAMES[self.kind]}") from None

    def validate(self, name, value):
        """Raise SettingsError, naming the setting and what it may be, unless `value` is allowed."""
        typed = isinstance(value, self.kind) and not (self.kind is not bool and isinstance(value, bool))
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            typed = True  # 1 for 1.0
        if not typed or not self.check(value):
            raise SettingsError(f"{name} = {value!r}: it must be {self.allowed}{self.costs(value) if typed else ''}")

    def costs(self, value):
        said = None if self.cost is None else self.cost(value)
        return f" ({value} {said})" if said else ""


_KIND_NAMES = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}


def _weights(value):
    try:
        return value.strip() == "" or all(math.isfinite(w) and w > 0 for w in map(float, value.split(",")))
    except ValueError:
        return False


Text = Rule(str, "text")
Flag = Rule(bool, "true or false")
Weights = Rule(str, "empty, or comma-separated numbers above 0 (1,1)", _weights)


def OneOf(*values, prefix=None):  # noqa: N802 (read as a type in annotations: NAME: OneOf(...) = value)
    """One of `values`, or (with a prefix) any text that starts with the prefix and names something after it."""
    allowed = f"one of {', '.join(map(repr, values))}" + (f", or {prefix}NAME" if prefix else "")

    def check(value):
        return value in values or bool(prefix and value.startswith(prefix) and value[len(prefix) :].strip())

    return Rule(str, allowed, check, values)


def AtLeast(minimum):  # noqa: N802
    return Rule(type(minimum), f"{_KIND_NAMES[type(minimum)]} of at least {minimum}", lambda value: value >= minimum)


def Above(minimum):  # noqa: N802
    return Rule(float, f"a number above {minimum}", lambda value: value > minimum)


def Between(low, high, *, low_included=True, high_included=False):  # noqa: N802
    """A number from `low` to `high`, each end included or not."""
    start, end = "[" if low_included else "(", "]" if high_included else ")"

    def check(value):
        return (low <= value if low_included else low < value) and (value <= high if high_included else value < high)

    return Rule(float, f"a number in {start}{low}, {high}{end}", check)


def WholeBetween(low, high):  # noqa: N802
    """A whole number from `low` to `high`, both included (a port number, say)."""
    return Rule(int, f"a whole number from {low} to {high}", lambda value: low <= value <= high)


MAX_SIDE = 1024  # NIH's films are 1024 px square: a larger side only enlarges them, at side² bytes a film
NIH_FILMS = 112_120  # what a side costs is said for NIH's films


def _side_cost(side):
    if side <= MAX_SIDE:
        return None
    return (
        f"px would take {NIH_FILMS * side**2 / 1e9:,.0f} GB of disk for NIH's {NIH_FILMS:,} films in a cache, and "
        f"{64 * 3 * side**2 * 4 / 1e9:,.1f} GB of memory for one batch of 64 as the network takes them, before its "
        "activations"
    )


def Side():  # noqa: N802
    """A film's side in pixels, from 32 to MAX_SIDE; a refused value says the disk and memory it would take."""
    allowed = f"a whole number from 32 to {MAX_SIDE} (pixels; NIH's films are {MAX_SIDE})"
    return Rule(int, allowed, lambda value: 32 <= value <= MAX_SIDE, cost=_side_cost)


def CommaList(*names, alone=None, count=None):  # noqa: N802
    """A comma-separated list of some of `names`, each once, or the single word `alone`, or (with `count`, what it
    counts) a whole number from 1."""

    def check(value):
        chosen = [name.strip() for name in value.split(",") if name.strip()]
        listed = bool(chosen) and all(name in names for name in chosen) and len(set(chosen)) == len(chosen)
        counted = bool(count) and value.strip().isdigit() and int(value) >= 1
        return chosen == [alone] or listed or counted

    listed = f"a comma-separated list of {', '.join(names)}, each once"
    listed = f"{alone!r}, or {listed}" if alone else listed
    return Rule(str, f"{listed}, or a number N (the last N {count})" if count else listed, check)


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


# ----------------------------------------------------------------------------- finding a script's settings


def rules(module):
    """{NAME: Rule} of a module's settings: its annotated module-level names whose annotation is a Rule, in order."""
    annotations = inspect.get_annotations(module)
    return {name: rule for name, rule in annotations.items() if isinstance(rule, Rule)}


def settings(module):
    """{NAME: (default, comment)} of a module's settings (see rules), the comment being the one on its line."""
    source = Path(module.__file__).read_text(encoding="utf-8")
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    lines = {
        node.target.id: range(node.lineno, node.end_lineno + 1)
        for node in ast.parse(source).body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    return {
        name: (getattr(module, name), next((comments[k] for k in lines.get(name, ()) if k in comments), ""))
        for name in rules(module)
    }


# ----------------------------------------------------------------------------- parsing


def _parser(module, description):
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("config_files", nargs="*", metavar="CONFIG.py", help="files of NAME = value lines")
    known, allowed = settings(module), rules(module)
    for name, (default, comment) in known.items():
        rule = allowed[name]
        parser.add_argument(
            f"--{name.lower()}",
            type=rule.parse,
            metavar={str: "TEXT", int: "INT", float: "FLOAT", bool: "BOOL"}[rule.kind],
            help=f"{comment}{'' if rule is Text else f'; {rule.allowed}'} (default: {default!r})",
        )
    return parser


def exit_after_help(module):
    """Print --help and exit when it is asked for: before the script imports torch, so it takes no time."""
    if {"-h", "--help"} & set(sys.argv[1:]):
        _parser(module, module.__doc__).parse_args(["--help"])


def parse_config(argv, module, description, check=None):
    """The settings with config-file and command-line overrides applied, each checked against its rule, then
    check(config) for the rules between settings; a wrong value exits with one line naming it (exit code 2)."""
    parser = _parser(module, description)
    args, unknown = parser.parse_known_args(argv)
    known = settings(module)
    if unknown:
        parser.error(f"unknown setting(s) {unknown}. Valid: {', '.join('--' + n.lower() for n in known)}")
    config = {name: default for name, (default, _) in known.items()}
    try:
        for path in args.config_files:
            config.update(read_config_file(path, known))
        for name in known:
            if getattr(args, name.lower()) is not None:
                config[name] = getattr(args, name.lower())
        for name, rule in rules(module).items():
            rule.validate(name, config[name])
        if check is not None:
            check(config)
    except SettingsError as error:
        parser.error(str(error))
    return config


def read_config_file(path, known):
    """{NAME: value} of a config file: `NAME = value` lines of plain values and comments, read and never run."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file not found: {path} (settings are --name value; config/demo.py is a file)")
    data = path.read_bytes()
    try:
        source = data.decode("utf-8-sig")  # a byte-order mark (Windows editors write one) is not part of the text
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SettingsError(
            f"{path}, line {line}: not UTF-8 text (byte {data[error.start]:#04x}; saved as Latin-1 or another "
            "encoding?). Save the file as UTF-8."
        ) from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as error:
        raise SettingsError(f"{path}, line {error.lineno}: not a NAME = value line ({error.msg})") from None
    values, lines = {}, {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SettingsError(
                f"{path}, line {node.lineno}: only NAME = value lines are allowed in a config file, not "
                f"{ast.get_source_segment(source, node)!r} (a config file is read, never run)"
            )
        name = node.targets[0].id
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            raise SettingsError(
                f"{path}, line {node.lineno}: {name} = {ast.get_source_segment(source, node.value)} is not a plain "
                "value (a number, text in quotes, True/False, a list or None); a config file is read, never run"
            ) from None
        if name not in known:
            raise SettingsError(f"{path}, line {node.lineno}: unknown setting {name}. Valid: {', '.join(known)}")
        if name in values:
            raise SettingsError(
                f"{path}, lines {lines[name]} and {node.lineno}: {name} is set twice; keep the one you mean"
            )
        values[name], lines[name] = value, node.lineno
    return values


# ----------------------------------------------------------------------------- flags every command shares


def flag_type(rule):
    """An argparse `type` for a command's flag: parsed and checked by the same rule as train.py's settings."""

    def parse(text):
        value = rule.parse(text)
        if not rule.check(value):
            raise argparse.ArgumentTypeError(f"{text!r}: it must be {rule.allowed}{rule.costs(value)}")
        return value

    return parse


def add_device_flags(parser, amp=True):
    """--device (and --amp / --no-amp) as train.py's DEVICE and AMP mean them."""
    parser.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), or a torch device")
    if amp:
        parser.add_argument(
            "--amp",
            action=argparse.BooleanOptionalAction,
            default=True,
            help="bf16 (fp16 on GPUs before Ampere) and channels_last where training uses them; --no-amp: fp32 "
            "(default: on)",
        )


def add_out_flag(parser, default, what, default_text=None):
    """--out: where a command writes (a folder or a file)."""
    parser.add_argument("--out", default=default, help=f"{what} (default: {default_text or default})")


def check_out_folder(out, name="--out"):
    """Before any work: `out` (the flag or setting `name`) names a folder this user may write in, or one that can be
    made there; a file, or a folder below a file or in a read-only place, is an error now rather than after the work
    is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{name} {out} is a file: name the folder to write into (it is made if missing)")
    existing = next(folder for folder in (out.absolute(), *out.absolute().parents) if folder.exists())
    if not existing.is_dir():
        raise DataError(f"{name} {out}: {existing} is a file, so no folder can be made below it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"{name} {out}: {existing} is not a folder this user may write in")


def add_checkpoint_flag(parser, required=True):
    """--checkpoint: the train.py checkpoint a command reads (`parser` may be a mutually exclusive group)."""
    parser.add_argument("--checkpoint", required=required, help="a checkpoint written by train.py (e.g. best.pth)")
