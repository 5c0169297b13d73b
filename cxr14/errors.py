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


class one_line_errors:
    """`with one_line_errors():` around a command's work: a UserError (or one of `also`) ends the command with its
    message as one line, `error: ...`, and exit code 1, instead of a traceback; given `interrupted`, so does Ctrl-C,
    with `interrupted: ` and that text (what was kept, how to go on). A plain class, not contextlib's decorator: this
    file imports nothing."""

    def __init__(self, *also, interrupted=None):
        self.caught, self.interrupted = (UserError, *also), interrupted

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is not None and issubclass(kind, self.caught):
            raise SystemExit(f"error: {error}") from None
        if kind is KeyboardInterrupt and self.interrupted:
            raise SystemExit(f"interrupted: {self.interrupted}") from None
        return False
