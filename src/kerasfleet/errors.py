"""The exception tree.

FleetError                      anything kerasfleet raises on its own account
├── InputError (ValueError)     bad input, refused before any work starts
├── ModelLoadError              the model file is missing, corrupt, or needs custom objects
│   └── PrecisionRefused        a reduced precision failed the accuracy gate (the numbers say by how much)
├── FleetClosedError            the fleet was closed (or broken) before the call
├── WorkerStartError            workers keep dying (or hang) while starting; their stderr is shown
└── WorkerError                 an exception raised inside a worker (its traceback is the cause)
    ├── WorkerCrashedError      a worker died (signal, exit code) on the same task too often
    └── TaskTimeoutError        a task ran past its hard deadline; its worker was killed
"""

from __future__ import annotations


class FleetError(Exception):
    """Base class of every error kerasfleet raises on its own account."""


class InputError(FleetError, ValueError):
    """The input (data, model or argument) is not usable; nothing was started."""


class ModelLoadError(FleetError):
    """The model could not be loaded (missing or corrupt file, unknown custom object)."""


class PrecisionRefused(ModelLoadError):
    """No reduced-precision candidate kept the answers within the accuracy gate's thresholds."""


class FleetClosedError(FleetError):
    """The fleet is closed; create a new one."""


class WorkerStartError(FleetError):
    """Worker processes keep dying, or never report ready, while starting."""


class WorkerError(FleetError):
    """An exception was raised inside a worker; the worker's traceback is `__cause__`."""


class WorkerCrashedError(WorkerError):
    """A worker process died while running the same task too many times."""


class TaskTimeoutError(WorkerError, TimeoutError):
    """A task ran past its hard deadline; its worker was killed and replaced."""


class RemoteTraceback(Exception):
    """Carries a worker's formatted traceback, so it prints as the cause of the error."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'
