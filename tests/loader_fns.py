"""Datasets for the Loader tests: importable by the workers (by reference) and by the tests."""

import os
import random
import threading
import time

import keras
import numpy as np


class Rows(keras.utils.PyDataset):
    """(x, y) batches that are a function of the index: what a worker makes can be checked."""

    def __init__(self, batches=12, rows=8, features=6, delay_s=0.0, **kwargs):
        super().__init__(**kwargs)
        self.batches, self.rows, self.features, self.delay_s = batches, rows, features, delay_s

    def __len__(self):
        return self.batches

    def __getitem__(self, i):
        if self.delay_s:
            time.sleep(self.delay_s)
        r = np.random.default_rng(i)
        x = r.normal(size=(self.rows, self.features)).astype("float32")
        y = (x.sum(axis=1, keepdims=True) > 0).astype("float32")
        return x, y


class Dicts(Rows):
    """({"a": .., "b": ..}, y, sample_weight) batches."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"a": x[:, :3], "b": x[:, 3:]}, y, np.linspace(0.5, 1.5, len(y)).astype("float32")


class Augmented(Rows):
    """Draws from NumPy's and Python's global generators, like most augmentation code."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        noise = np.random.normal(size=x.shape).astype("float32")
        return x + noise * random.random(), y


class Reshuffling(Rows):
    """Reorders its own samples at each epoch end (the Keras tutorial pattern), seeded."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rng = np.random.default_rng(7)
        self.perm = np.arange(self.batches)
        self.epochs = 0

    def __getitem__(self, i):
        return super().__getitem__(int(self.perm[i]))

    def on_epoch_end(self):
        self.epochs += 1
        self.perm = self.rng.permutation(self.batches)


class Growing(Rows):
    """Batch i has 8 * (i + 1) rows."""

    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return np.repeat(x, i + 1, axis=0), np.repeat(y, i + 1, axis=0)


class Failing(Rows):
    def __getitem__(self, i):
        if i == 5:
            raise ValueError("bad record in batch 5")
        return super().__getitem__(i)


class Unpicklable(Rows):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.lock = threading.Lock()


class Plain:
    """Not a PyDataset: only __len__ and __getitem__."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return np.full((2, 3), i, dtype="float32"), np.full((2, 1), os.getpid() * 0 + i, dtype="float32")


def make_rows():
    return Rows(batches=6)


def make_reshuffling():
    return Reshuffling(batches=6)
