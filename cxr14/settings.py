"""A run's settings as the library takes them: small frozen records, one per concern, built once from a config
mapping (train.py's parsed settings, or the `config` a checkpoint carries) by `from_config`. A field's name is its
setting's name in lower case, the same as its --flag, so renaming a setting touches train.py and one field here.
"""

from dataclasses import asdict, dataclass, fields

from cxr14.errors import SettingsError


@dataclass(frozen=True)
class DataSettings:
    """Which films, split how, and the pixels the network sees."""

    dataset: str  # "nih", another dataset, or a comma-separated union (training_films.py)
    data_dir: str  # one folder per dataset, comma-separated in the same order
    csv: str
    uncertain: str  # an uncertain label (-1): "ignore" (unlabelled), "zeros" or "ones"
    dataset_weights: str  # a union's share of each epoch per dataset: "" by size, or one weight each ("1,1")
    cache: str
    load_size: int
    image_size: int
    drop_missing_images: bool
    val_fraction: float
    test_fraction: float
    seed: int  # the split, the data order, augmentation and dropout


@dataclass(frozen=True)
class LoaderSettings:
    """How batches reach the device."""

    batch_size: int
    num_workers: int
    augment_on: str
    cache_on_device: str


@dataclass(frozen=True)
class ModelSettings:
    """What network is built, from which weights, and what of it trains."""

    backbone: str
    pretrained: str
    trainable_layers: str
    dropout: float
    drop_path: float
    pooling: str


@dataclass(frozen=True)
class TrainingSettings:
    """The loss, the optimizer and its schedule, and when training stops."""

    pos_weight: str
    pos_weight_cap: float
    learning_rate: float
    weight_decay: float
    layer_decay: float
    lr_schedule: str
    lr_patience: int
    lr_factor: float
    warmup_epochs: float
    min_learning_rate: float
    epochs: int
    early_stopping_patience: int


@dataclass(frozen=True)
class RunSettings:
    """Where and how this process runs, and what it keeps."""

    device: str
    amp: bool
    channels_last: bool
    compile: bool
    cuda_graphs: bool
    tensorboard: bool
    out_dir: str
    resume: str
    keep_training_state: str


@dataclass(frozen=True)
class Settings:
    """Every setting of train.py, by concern."""

    data: DataSettings
    loader: LoaderSettings
    model: ModelSettings
    training: TrainingSettings
    run: RunSettings

    def value(self, name):
        """The value of the setting NAME, whichever record holds it."""
        for record in self.records():
            if hasattr(record, name.lower()):
                return getattr(record, name.lower())
        raise KeyError(name)

    def records(self):
        return [getattr(self, part.name) for part in fields(self)]

    def as_config(self):
        """{NAME: value} of every setting: what config.json and each checkpoint's `config` hold."""
        return {name.upper(): value for record in self.records() for name, value in asdict(record).items()}


def record_from_config(record_type, config, source="the settings"):
    """A record_type built from the settings its fields name, in a {NAME: value} mapping (`source` names it in the
    error when one is missing)."""
    names = [field.name for field in fields(record_type)]
    missing = [name.upper() for name in names if name.upper() not in config]
    if missing:
        raise SettingsError(
            f"{source} lacks the setting(s) {', '.join(missing)}: written by an older train.py? Train it again."
        )
    return record_type(**{name: config[name.upper()] for name in names})


def from_config(config, source="the settings"):
    """Settings from a {NAME: value} mapping of every setting."""
    return Settings(**{part.name: record_from_config(part.type, config, source) for part in fields(Settings)})


def setting_names():
    """The NAME of every field of every record: train.py's settings, exactly."""
    return [field.name.upper() for part in fields(Settings) for field in fields(part.type)]
