"""Per-row score functions for the evaluate tests: importable, so workers load them by name."""

import numpy as np


def crps_gaussian_quadrature(y_true, y_pred):
    """A CRPS-like score by numerical quadrature, one value per row (the seed's slow NumPy case)."""
    grid = np.linspace(-3.0, 3.0, 64)
    y = np.asarray(y_true, np.float64).reshape(len(y_true), -1)[:, :1]
    p = np.asarray(y_pred, np.float64).reshape(len(y_pred), -1)[:, :1]
    cdf = 1.0 / (1.0 + np.exp(-(grid[None, :] - p) * 4.0))
    step = (grid[None, :] >= y).astype(np.float64)
    return np.trapezoid((cdf - step) ** 2, grid, axis=1)


def abs_error_first(y_true, y_pred):
    return np.abs(np.asarray(y_true["reg"])[:, 0] - np.asarray(y_pred["reg"])[:, 0])


def wrong_shape(y_true, y_pred):
    return np.zeros((len(y_pred), 2))


def worker_pid(y_true, y_pred):
    """The process that scored each row."""
    import os

    return np.full(len(y_pred), float(os.getpid()))


def raises(y_true, y_pred):
    raise ValueError("a score function that fails")


def segfault(marker=None):
    """A score function that kills its process with SIGSEGV: every call, or once (`marker`)."""
    import ctypes
    import os

    def score(y_true, y_pred):
        if marker is None or not os.path.exists(marker):
            if marker is not None:
                open(marker, "w").close()
            ctypes.string_at(0)
        return np.abs(np.asarray(y_true) - np.asarray(y_pred)).mean(axis=1)

    return score
