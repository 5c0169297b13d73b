"""The errors a user can fix. Each message names the file, row, setting or device and says what to do; every
command's main turns them into one line (`error: ...`) instead of a traceback. No imports: the torch-free ONNX path
(films.py, predict.py --onnx) raises them too."""


class UserError(Exception):
    """Bad input or an unusable setup that the user can fix; the message says which and how."""


class DataError(UserError):
    """A label file, image, split or cache that cannot be used as it is."""


class SettingsError(UserError):
    """A setting (train.py constant, config file or flag) outside its allowed values, or settings that conflict."""


class CheckpointError(UserError):
    """A checkpoint or weights file that cannot be used here."""


class DeviceError(UserError):
    """A GPU or PyTorch build that cannot run the job as asked."""
