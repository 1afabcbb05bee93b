"""Training input pipelines and data parallelism: where the epoch time goes.

    KERAS_BACKEND=jax python bench/train.py [--batches 60] [--epochs 4]
    KERAS_BACKEND=tensorflow python bench/train.py          # adds tf.data + py_function
    KERAS_BACKEND=torch python bench/train.py               # adds torch DataLoader(num_workers=2)
    KERAS_BACKEND=jax python bench/train.py --data-parallel [--devices 2]

(a) One `PyDataset` whose `__getitem__` does CPU-bound NumPy augmentation of 32x32x3 images
(pad + random crop, flip, brightness/contrast jitter, a 3x3 blur, cutout: about 8 ms for a batch
of 64 on one core) feeding a small CNN, fed to `model.fit` by each pipeline:

- no workers: the dataset itself (Keras calls `__getitem__` in its loop);
- `PyDataset(workers=N, use_multiprocessing=True)` (Keras's own process pool, forked);
- `tf.data.Dataset.range(n).map(tf.py_function(...), num_parallel_calls=N).prefetch` (TF only);
- torch `DataLoader(dataset, batch_size=None, num_workers=N)` (torch only);

(N: the usable cores, 2 on the development machine, as the Loader's default.)
- `kerasfleet.Loader(dataset)` (workers started before the timed epochs, as a warm loader is).

Epoch time is the median of epochs 2..N (the first compiles the step); the first epoch is shown
too. Every pipeline trains the same model from the same weights on the same batches.

(b) `--data-parallel`: the same CNN's training step on a batch of 256 with one device, and under
`kerasfleet.data_parallel()` over `--devices` CPU devices (`cpu_devices=`), or every GPU when
there are GPUs: what splitting the batch across devices gives on this machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine_facts  # noqa: E402

IMAGE = (32, 32, 3)
CLASSES = 10


class Augmenting:
    """Synthetic images and labels, augmented in NumPy per batch (seeded by the index)."""

    def __init__(self, batches: int, batch_size: int = 64, repeats: int = 3) -> None:
        self.batches, self.batch_size, self.repeats = batches, batch_size, repeats
        rng = np.random.default_rng(0)
        self.images = rng.random((batches * batch_size, *IMAGE), dtype=np.float32)
        self.labels = rng.integers(0, CLASSES, batches * batch_size).astype("int32")

    def __len__(self) -> int:
        return self.batches

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(i)
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        x = self.images[sl]
        for _ in range(self.repeats):
            x = augment(x, rng)
        return x, self.labels[sl]


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    out = np.empty_like(x)
    for j in range(n):
        dy, dx = rng.integers(0, 9, 2)
        img = padded[j, dy : dy + h, dx : dx + w]
        out[j] = img[:, ::-1] if rng.random() < 0.5 else img
    scale = rng.uniform(0.8, 1.2, (n, 1, 1, 1)).astype(np.float32)
    shift = rng.uniform(-0.1, 0.1, (n, 1, 1, 1)).astype(np.float32)
    mean = out.mean(axis=(1, 2, 3), keepdims=True)
    out = (out - mean) * scale + mean + shift
    blurred = np.pad(out, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(blurred[:, a : a + h, b : b + w] for a in range(3) for b in range(3)) / np.float32(9)
    for j in range(n):
        cy, cx = rng.integers(0, h - 8, 2)
        out[j, cy : cy + 8, cx : cx + 8] = 0.0
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def build_model():
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input(IMAGE),
            keras.layers.Conv2D(8, 4, strides=4, activation="relu"),
            keras.layers.Conv2D(16, 2, strides=2, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(CLASSES),
        ]
    )
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


class EpochTimes:
    def __init__(self) -> None:
        import keras

        class _Cb(keras.callbacks.Callback):
            def on_epoch_begin(cb, epoch, logs=None):  # noqa: N805
                cb.t = time.perf_counter()

            def on_epoch_end(cb, epoch, logs=None):  # noqa: N805
                self.times.append(time.perf_counter() - cb.t)

        self.times: list[float] = []
        self.callback = _Cb()


def time_fit(data, epochs: int) -> tuple[float, float, float]:
    """(first epoch, median of the later ones, this process's CPU seconds a later epoch)."""
    model = build_model()
    times = EpochTimes()
    model.fit(data, epochs=1, verbose=0, callbacks=[times.callback])
    cpu = time.process_time()
    model.fit(data, epochs=epochs - 1, verbose=0, callbacks=[times.callback])
    return times.times[0], statistics.median(times.times[1:]), (time.process_time() - cpu) / (epochs - 1)


def pipelines(backend: str, batches: int):
    import keras

    import kerasfleet

    base = Augmenting(batches)

    class Keras(keras.utils.PyDataset):
        def __init__(self, **kwargs) -> None:
            super().__init__(**kwargs)
            self.inner = base

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, i: int):
            return self.inner[i]

    class Premade(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.batches = [base[i] for i in range(len(base))]

        def __len__(self) -> int:
            return len(self.batches)

        def __getitem__(self, i: int):
            return self.batches[i]

    yield "batches made before (the floor: training alone)", Premade, None
    yield "no workers (PyDataset)", lambda: Keras(), None
    n = len(os.sched_getaffinity(0))  # the peers get one process (or call) per core, like the Loader
    yield f"PyDataset(workers={n}, use_multiprocessing=True)", lambda: Keras(workers=n, use_multiprocessing=True), None
    if backend == "tensorflow":
        import tensorflow as tf

        def tf_data():
            def load(i):
                x, y = tf.py_function(lambda j: base[int(j)], [i], [tf.float32, tf.int32])
                x.set_shape((None, *IMAGE))
                y.set_shape((None,))
                return x, y

            return tf.data.Dataset.range(len(base)).map(load, num_parallel_calls=n).prefetch(4)

        yield f"tf.data + py_function ({n} parallel calls)", tf_data, None
    if backend == "torch":
        import torch

        class Torch(torch.utils.data.Dataset):
            def __len__(self) -> int:
                return len(base)

            def __getitem__(self, i: int):
                return base[i]

        yield (
            "torch DataLoader(num_workers=2)",
            lambda: torch.utils.data.DataLoader(Torch(), batch_size=None, num_workers=2),
            None,
        )
    loader = kerasfleet.Loader(Keras()).wait_ready(300)
    yield "kerasfleet.Loader", lambda: loader, loader


def loaders(args: argparse.Namespace) -> None:
    import keras

    backend = keras.backend.backend()
    one = Augmenting(args.batches)
    one[0]
    t = time.process_time()
    for i in range(len(one)):
        one[i]
    aug_cpu = time.process_time() - t  # one core: NumPy's elementwise work is single-threaded
    print(machine_facts())
    print(
        f"backend {backend}; {args.batches} batches of 64 images per epoch, {args.epochs} epochs; "
        f"augmentation {aug_cpu / len(one) * 1e3:.1f} ms of CPU a batch\n"
    )
    rows = []
    for name, make, closer in pipelines(backend, args.batches):
        first, steady, cpu = time_fit(make(), args.epochs)
        if closer is not None:
            closer.close()
        rows.append((name, first, steady, cpu))
        print(f"  {name:48s} first epoch {first:6.2f} s   epoch {steady:6.3f} s", flush=True)
    fleet = rows[-1][2]
    print("\nkerasfleet.Loader's epoch vs each (higher: kerasfleet faster)")
    for name, _, steady, _ in rows[1:-1]:
        print(f"  vs {name:48s} {steady / fleet:5.2f}x")
    # The machine's ceiling: every core busy with the augmentation's CPU time plus the
    # training's (the floor line's CPU time, all of this process's threads), nothing else.
    ncores = len(os.sched_getaffinity(0))
    best = (aug_cpu + rows[0][3]) / ncores
    plain = rows[1][2]
    print(
        f"\nceiling on {ncores} cores: (augmentation {aug_cpu:.3f} s + training {rows[0][3]:.3f} s of CPU) / {ncores} = "
        f"{best:.3f} s an epoch, {plain / best:.2f}x no workers; kerasfleet.Loader reaches {best / fleet:.0%} of it"
    )


def data_parallel(args: argparse.Namespace) -> None:
    import keras

    import kerasfleet

    devices = kerasfleet.devices(cpu_devices=args.devices)
    print(machine_facts())
    print(f"backend {keras.backend.backend()}; devices {devices}; batch 256, CNN {IMAGE}\n")
    rng = np.random.default_rng(0)
    x = rng.random((256 * 16, *IMAGE), dtype=np.float32)
    y = rng.integers(0, CLASSES, len(x)).astype("int32")

    def step_ms(model) -> float:
        model.fit(x, y, batch_size=256, epochs=1, verbose=0)  # compile
        t = time.perf_counter()
        model.fit(x, y, batch_size=256, epochs=3, verbose=0, shuffle=False)
        return (time.perf_counter() - t) / (3 * len(x) // 256) * 1e3

    single = step_ms(build_model())
    with kerasfleet.data_parallel():
        split = step_ms(build_model())
    print(f"  one device:                       {single:7.2f} ms a step")
    print(f"  data_parallel over {len(devices)} devices:     {split:7.2f} ms a step   ({single / split:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--data-parallel", action="store_true")
    parser.add_argument("--devices", type=int, default=2, help="CPU devices for --data-parallel without GPUs")
    args = parser.parse_args()
    if args.data_parallel:
        data_parallel(args)
    else:
        loaders(args)


if __name__ == "__main__":
    main()
