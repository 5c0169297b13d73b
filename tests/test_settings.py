"""settings.py: train.py's settings reach the library as typed records, built from a config mapping in one place."""

import dataclasses

import pytest

import train
from cxr14 import settings
from cxr14.errors import SettingsError


def test_every_setting_of_train_py_is_exactly_one_field_of_one_record():
    names = settings.setting_names()
    assert len(names) == len(set(names))  # no setting in two records
    assert sorted(names) == sorted(train.settings())  # none left out, none invented


def test_flags_land_in_their_record_and_the_config_mapping_round_trips(tmp_path):
    config_file = tmp_path / "mine.py"
    config_file.write_text('LR_SCHEDULE = "cosine"\n', encoding="utf-8")
    argv = [str(config_file), "--batch_size=8", "--backbone=densenet121", "--amp=false", "--seed=5"]
    parsed = train.parse_settings(argv)
    assert parsed.loader.batch_size == 8 and parsed.model.backbone == "densenet121" and parsed.run.amp is False
    assert parsed.data.seed == 5 and parsed.training.lr_schedule == "cosine"
    assert parsed.as_config() == train.parse_config(argv)  # what config.json and checkpoints hold: every setting
    assert settings.from_config(parsed.as_config()) == parsed
    assert parsed.value("BATCH_SIZE") == 8 and parsed.value("lr_schedule") == "cosine"
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed.loader.batch_size = 16  # built once: nothing deeper changes a run's settings


def test_a_mapping_without_a_setting_names_it_and_where_it_came_from():
    config = train.parse_config([])
    del config["LOAD_SIZE"], config["SEED"]
    with pytest.raises(SettingsError, match="old.pth lacks the setting.s. LOAD_SIZE, SEED"):
        settings.from_config(config, "old.pth")
    model = settings.record_from_config(settings.ModelSettings, config)  # a record needs only its own fields
    assert model.trainable_layers == train.TRAINABLE_LAYERS
