"""configurator.py: every value checked at parse time, config files read as text and never run."""

import argparse

import pytest

import evaluate
from configurator import Above, AtLeast, Between, flag_type, read_config_file
from errors import SettingsError

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

    (tmp_path / "huge.py").write_text("LEARNING_RATE = 1e999\n")
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
    (tmp_path / "twice.py").write_text("EPOCHS = 3\nLEARNING_RATE = 0.1\nEPOCHS = 9\n")
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
