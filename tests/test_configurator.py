"""configurator.py: train.py's settings from its constants, config files (read as text, never run) and flags, every
value checked at parse time and a bad one refused in one line before anything is written; --help without torch."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import evaluate
import train
from cxr14.configurator import Above, AtLeast, Between, flag_type, read_config_file
from cxr14.errors import SettingsError
from helpers import ROOT

KNOWN = {"LEARNING_RATE": (1e-3, None), "EPOCHS": (6, None)}


@pytest.mark.parametrize("rule", [Above(0), AtLeast(0.0), Between(0, 1)])
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_no_numeric_rule_accepts_inf_or_nan(rule, value):
    with pytest.raises(SettingsError, match="it must be"):
        rule.validate("LEARNING_RATE", value)
    with pytest.raises(argparse.ArgumentTypeError):
        flag_type(rule)(str(value))
    rule.validate("LEARNING_RATE", 0.5)  # a finite value inside the rule still passes


@pytest.mark.parametrize("source", ["file", "flag"])
def test_an_infinite_learning_rate_is_refused_by_train_py_naming_it(source, tmp_path, capsys):
    import train

    (tmp_path / "huge.py").write_text("LEARNING_RATE = 1e999\n", encoding="utf-8")
    argv = [str(tmp_path / "huge.py")] if source == "file" else ["--learning_rate", "inf"]
    with pytest.raises(SystemExit) as stopped:
        train.main([*argv, f"--out_dir={tmp_path / 'run'}"])
    assert stopped.value.code == 2 and "LEARNING_RATE = inf: it must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_byte_order_mark_is_read_latin_1_is_named_with_its_line_and_a_setting_twice_is_refused(tmp_path):
    (tmp_path / "bom.py").write_bytes("\ufeffEPOCHS = 3\n".encode())
    assert read_config_file(tmp_path / "bom.py", KNOWN) == {"EPOCHS": 3}
    (tmp_path / "latin.py").write_bytes("EPOCHS = 3\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(SettingsError, match=r"latin.py, line 2: not UTF-8 text .* Save the file as UTF-8"):
        read_config_file(tmp_path / "latin.py", KNOWN)
    (tmp_path / "twice.py").write_text("EPOCHS = 3\nLEARNING_RATE = 0.1\nEPOCHS = 9\n", encoding="utf-8")
    with pytest.raises(SettingsError, match=r"twice.py, lines 1 and 3: EPOCHS is set twice"):
        read_config_file(tmp_path / "twice.py", KNOWN)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--bootstrap", "0"),
        ("--batch_size", "0"),
        ("--sensitivity", "1.5"),
        ("--sensitivity", "-0.5"),
        ("--sensitivity", "1"),
        ("--sensitivity", "nan"),
    ],
)
def test_evaluate_refuses_impossible_flags_before_any_work(flag, value, capsys):
    with pytest.raises(SystemExit) as stopped:
        evaluate.parse_args(["--checkpoint", "missing.pth", flag, value])
    assert stopped.value.code == 2 and flag in capsys.readouterr().err
    assert evaluate.parse_args(["--checkpoint", "x.pth", "--sensitivity", "0.9"]).sensitivity == 0.9


def test_help_lists_every_setting_with_its_default():
    result = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    help_text = " ".join(result.stdout.split())
    for name, (default, _) in train.settings().items():
        assert f"--{name.lower()}" in help_text and f"(default: {default!r})" in help_text, name
    assert len(train.settings()) >= 25


def test_help_answers_from_another_folder_without_torch(tmp_path):
    """python path/to/train.py --help: the script's own folder is on sys.path, so the package imports from anywhere,
    and --help answers before torch is imported (a torch that cannot be imported shadows the real one here)."""
    fake = tmp_path / "no_torch" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('torch was imported')\n", encoding="utf-8")
    environment = {**os.environ, "PYTHONPATH": str(fake.parent)}
    command = [sys.executable, str(ROOT / "train.py"), "--help"]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "--image_size INT" in result.stdout and "--trainable_layers" in result.stdout
    broken = subprocess.run(  # the fake is what a real run would import: the test would see an import of torch
        [sys.executable, str(ROOT / "train.py"), "--epochs", "1"], cwd=tmp_path, env=environment, capture_output=True
    )
    assert b"torch was imported" in broken.stderr


def test_command_line_and_config_file_overrides(tmp_path):
    config_file = tmp_path / "mine.py"
    config_file.write_text('EPOCHS = 7\nOUT_DIR = "checkpoints/mine"\n', encoding="utf-8")
    config = train.parse_config([str(config_file), "--epochs", "3", "--learning_rate=0.5", "--amp", "false"])
    assert config["EPOCHS"] == 3 and isinstance(config["EPOCHS"], int)  # the command line wins
    assert config["LEARNING_RATE"] == 0.5 and config["AMP"] is False
    assert config["OUT_DIR"] == "checkpoints/mine" and config["BATCH_SIZE"] == train.BATCH_SIZE
    config_file.write_text('EPOCHS = "7"\n', encoding="utf-8")
    with pytest.raises(SystemExit):
        train.parse_config([str(config_file)])


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_config([str(tmp_path / "typo.py")])
    error = capsys.readouterr().err
    assert "config file not found" in error and str(tmp_path / "typo.py") in error


@pytest.mark.parametrize(
    "argv, offending",
    [(["--epoch", "3"], "'--epoch'"), (["--epochs", "three"], "'three'"), (["--amp", "maybe"], "'maybe'")],
)
def test_unknown_or_mistyped_settings_are_errors(argv, offending, capsys):
    with pytest.raises(SystemExit) as stopped:
        train.parse_config(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert offending in error  # the bad name or value is named
    if argv[0] == "--epoch":
        assert "Valid:" in error and "--learning_rate" in error


@pytest.mark.parametrize("config_file", sorted((ROOT / "config").glob("*.py")), ids=lambda path: path.name)
def test_every_shipped_config_file_is_valid(config_file, tmp_path, monkeypatch):
    """A recipe that names a weights file (config/mgca_resnet50.py) is valid where that file is."""
    from cxr14.configurator import read_config_file, settings

    pretrained = read_config_file(config_file, settings(train)).get("PRETRAINED", "imagenet")
    if Path(pretrained).suffix:
        monkeypatch.chdir(tmp_path)
        Path(pretrained).write_bytes(b"")
    config = train.parse_config([str(config_file)])  # unknown names or wrong types would exit
    assert config["OUT_DIR"].startswith("checkpoints/") and config["LOAD_SIZE"] >= config["IMAGE_SIZE"]


def enumerated_settings():
    from cxr14.configurator import rules

    return {name: rule.values for name, rule in rules(train).items() if rule.values}


@pytest.mark.parametrize("name", sorted(enumerated_settings()))
def test_every_enumerated_setting_refuses_another_value_before_writing_anything(name, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        train.main([f"--out_dir={out}", f"--{name.lower()}=bogus"])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and f"{name} = 'bogus'" in error
    assert all(repr(value) in error for value in enumerated_settings()[name])  # the allowed values, listed
    assert not out.exists()


@pytest.mark.parametrize(
    "flag, said",
    [
        ("--batch_size=0", "BATCH_SIZE = 0: it must be a whole number of at least 1"),
        ("--learning_rate=-1", "LEARNING_RATE = -1.0: it must be a number above 0.0"),
        ("--dropout=1.5", "DROPOUT = 1.5: it must be a number in [0.0, 1.0)"),
        ("--image_size=7", "IMAGE_SIZE = 7: it must be a whole number from 32 to 1024"),
        ("--load_size=2560", "(2560 px would take 735 GB of disk for NIH's 112,120 films in a cache, and 5.0 GB of"),
        ("--epochs=0", "EPOCHS = 0: it must be a whole number of at least 1"),
        ("--trainable_layers=layer5", "TRAINABLE_LAYERS = 'layer5'"),
        ("--val_fraction=0.5", "leave no patient for training"),
        ("--pretrained=missing.pth", "PRETRAINED = 'missing.pth'"),
    ],
)
def test_settings_out_of_range_are_one_line_before_anything_is_written(flag, said, tmp_path, capsys):
    extra = ["--test_fraction=0.5"] if "val_fraction" in flag else []
    with pytest.raises(SystemExit) as stopped:
        train.main([f"--out_dir={tmp_path / 'run'}", flag, *extra])
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and said in error and "Traceback" not in error
    assert not (tmp_path / "run").exists()


def test_a_config_file_is_read_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    for code in (
        f"import os\nos.system('touch {marker}')\n",
        "import os as _os\nEPOCHS = 3\n",
        f"EPOCHS = open('{marker}', 'w')\n",
    ):
        config_file = tmp_path / "evil.py"
        config_file.write_text("# a config\n" + code, encoding="utf-8")
        with pytest.raises(SystemExit) as stopped:
            train.parse_config([str(config_file)])
        error = capsys.readouterr().err
        assert stopped.value.code == 2 and f"{config_file}, line 2" in error
        assert not marker.exists()  # nothing in it ran
    config_file.write_text(
        'EPOCHS = 3\nOUT_DIR = "checkpoints/x"  # a comment\nLR_SCHEDULE = "cosine"\n', encoding="utf-8"
    )
    assert train.parse_config([str(config_file)])["EPOCHS"] == 3


def test_a_config_file_with_a_syntax_error_names_its_file_and_line(tmp_path, capsys):
    config_file = tmp_path / "typo.py"
    config_file.write_text("EPOCHS = 3\nBATCH_SIZE = = 4\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        train.parse_config([str(config_file)])
    error = capsys.readouterr().err
    assert f"{config_file}, line 2" in error and "Traceback" not in error


def test_help_answers_without_importing_torch():
    code = (
        "import runpy, sys; sys.argv = ['train.py', '--help']\n"
        "try:\n    runpy.run_path('train.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "--image_size INT" in result.stdout and result.stdout.strip().endswith("False")


@pytest.mark.parametrize("command", ["predict", "evaluate", "compare"])
def test_an_out_that_cannot_be_a_folder_is_refused_before_any_work(command, tmp_path, capsys):
    """predict.py, evaluate.py and compare.py write a folder: a file there, or a file above it, failed only after
    the whole work; now before the checkpoint is even read (it does not exist here)."""
    import importlib

    a_file = tmp_path / "predictions.csv"
    a_file.write_text("kept\n", encoding="utf-8")
    given = {
        "predict": ["film.png", "--checkpoint", "missing.pth"],
        "evaluate": ["--checkpoint", "missing.pth"],
        "compare": ["missing_a.pth", "missing_b.pth"],
    }[command]
    module = importlib.import_module(command)
    for out, said in ((a_file, f"--out {a_file} is a file"), (a_file / "sub", f"{a_file} is a file, so no folder")):
        with pytest.raises(SystemExit) as stopped:
            module.main([*given, "--out", str(out)])
        message = str(stopped.value.code)
        assert message.startswith(f"error: --out {out}") and said in message, message
    assert a_file.read_text(encoding="utf-8") == "kept\n"
