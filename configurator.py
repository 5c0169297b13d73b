"""train.py's settings parser: its UPPER_CASE constants, then config files, then --name value flags.

    python train.py config/demo.py --epochs 3 --batch_size=32

The constants at the top of train.py are the defaults and the documentation: --help lists each with the
comment beside it. A config file is Python of NAME = value lines (nanoGPT's convention); every value, from a
file or a flag, is checked against its default's type, and an unknown name is an error that lists the valid ones.
"""

import argparse
import re
from pathlib import Path


def settings(script, namespace):
    """{NAME: (default, comment)} for the `NAME = value  # comment` lines of `script`, valued from `namespace`
    (the script's globals()), so --help says exactly what the file says."""
    source = Path(script).read_text(encoding="utf-8")
    comments = re.findall(r"^([A-Z_]+) = .*?  # (.*)$", source, re.MULTILINE)
    return {name: (namespace[name], comment) for name, comment in comments}


def _parse_bool(text):
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_config(argv, known, description):
    """The settings with config-file and command-line overrides applied, typed from their defaults."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("config_files", nargs="*", metavar="CONFIG.py", help="files of NAME = value lines")
    for name, (default, comment) in known.items():
        kind = _parse_bool if isinstance(default, bool) else type(default)
        metavar = type(default).__name__.upper()
        parser.add_argument(f"--{name.lower()}", type=kind, metavar=metavar, help=f"{comment} (default: {default!r})")
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unknown setting(s) {unknown}. Valid: {', '.join('--' + n.lower() for n in known)}")
    config = {name: default for name, (default, _) in known.items()}
    for path in args.config_files:
        config.update(_read_config_file(path, known, parser))
    for name in known:
        if getattr(args, name.lower()) is not None:
            config[name] = getattr(args, name.lower())
    return config


def _read_config_file(path, known, parser):
    if not Path(path).is_file():
        parser.error(f"config file not found: {path} (settings are given as --name value; config/demo.py is one)")
    overrides = {}
    exec(Path(path).read_text(encoding="utf-8"), {}, overrides)
    overrides = {name: value for name, value in overrides.items() if not name.startswith("_")}
    bad = [name for name in overrides if name not in known]
    if bad:
        parser.error(f"{path}: unknown setting(s) {bad}. Valid: {', '.join(known)}")
    for name, value in overrides.items():
        default = known[name][0]
        if not isinstance(value, type(default)) and not (type(default) is float and type(value) is int):
            parser.error(f"{path}: {name} = {value!r} should be a {type(default).__name__}, like {default!r}")
    return overrides
