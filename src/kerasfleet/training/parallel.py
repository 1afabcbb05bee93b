"""Data-parallel training with plain `model.fit`, on the backend Keras runs.

    with kerasfleet.data_parallel():          # every visible GPU (or TPU)
        model = build(); model.compile(...); model.fit(...)

What replaced `multi_gpu_model` differs per backend; this picks it:

| backend | how | batch not divisible by the device count |
| --- | --- | --- |
| JAX | `keras.distribution.DataParallel` over the devices (set for the block, restored after) | clear error before the step runs (JAX cannot split it) |
| TensorFlow | `tf.distribute.MirroredStrategy` over the devices (its scope for the block) | split unevenly by TensorFlow (exact, no padding) |
| torch | refused: Keras has no distribution support on torch | - |

With one device (one GPU, or a CPU not split) nothing is set: there is nothing to split, and a
one-device distribution only adds work.

Build, compile and fit inside the block: on JAX the distribution is read at each `fit` step; on
TensorFlow a model is tied to the strategy it was created under.

`cpu_devices=N` splits the host into N devices (JAX's `jax_num_cpu_devices`, TensorFlow's
logical CPU devices): for tests, and to measure what data parallelism does on CPUs. Both must
be set before the backend starts its runtime (before the first array is made), or a clear error
says so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import keras

from ..errors import InputError


def devices(cpu_devices: int | None = None) -> list[str]:
    """The devices `data_parallel()` would use: the accelerators, else the host's CPU devices."""
    backend = keras.backend.backend()
    if cpu_devices is not None:
        split_cpu(cpu_devices)
    if backend == "jax":
        import jax

        accelerators = [d for d in jax.devices() if d.platform != "cpu"]
        chosen = accelerators or jax.devices("cpu")
        return [f"{d.platform}:{d.id}" for d in chosen]
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        chosen = gpus or tf.config.list_logical_devices("CPU")
        return [_tf_short(d.name) for d in chosen]
    if backend == "torch":
        import torch

        if torch.cuda.is_available():
            return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
        return ["cpu:0"]
    raise InputError(f"Expected the jax, tensorflow or torch backend. Received: KERAS_BACKEND={backend!r}.")


def split_cpu(count: int) -> None:
    """Make the host `count` devices for this backend (before its runtime starts)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InputError(f"Expected cpu_devices to be a positive int. Received: cpu_devices={count!r}.")
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", count)  # type: ignore[no-untyped-call]
        except RuntimeError:
            have = len(jax.devices("cpu"))
            if have != count:
                raise _too_late(count, have, "JAX") from None
    elif backend == "tensorflow":
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
        except RuntimeError:
            have = len(tf.config.list_logical_devices("CPU"))
            if have != count:
                raise _too_late(count, have, "TensorFlow") from None
    else:
        raise InputError(
            f"Expected the jax or tensorflow backend for cpu_devices. Received: KERAS_BACKEND={backend!r}; "
            "torch cannot split the host into devices."
        )


@contextlib.contextmanager
def data_parallel(devices: str | Sequence[str] = "auto", *, cpu_devices: int | None = None) -> Iterator[Any]:
    """Models built, compiled and fit in this block train data-parallel (see the module doc).

    `devices`: "auto" (what `kerasfleet.devices()` lists) or a list of them ("gpu:0", "cpu:1").
    Yields the backend's object: the Keras `DataParallel` distribution, or the TF strategy; with
    one device, None (nothing is set: the model trains as it would outside the block).
    """
    backend = keras.backend.backend()
    if backend == "torch":
        raise InputError(
            "Expected the jax or tensorflow backend for data_parallel. Received: KERAS_BACKEND='torch'; Keras has no "
            "distribution support on torch. Switch the backend (KERAS_BACKEND=jax), or train with torch's own "
            "DistributedDataParallel (torchrun) in a torch training loop."
        )
    available = _available(cpu_devices)
    if isinstance(devices, str):
        if devices != "auto":
            raise InputError(f"Expected devices='auto' or a list of device names. Received: devices={devices!r}.")
        chosen = available
    else:
        chosen = [str(d).lower() for d in devices]
        unknown = [d for d in chosen if d not in available]
        if not chosen or unknown:
            raise InputError(f"Expected devices among {available}. Received: devices={list(devices)!r}.")
    if len(chosen) == 1:
        # Nothing to split: the model trains as it would outside the block. A one-device
        # distribution only adds work (measured on an H200: 7.6 ms a step instead of 1.5).
        yield None
        return
    if backend == "jax":
        from keras.distribution import DataParallel, distribution, set_distribution

        def check_rows(shape: Sequence[int]) -> None:
            if len(shape) and shape[0] % len(chosen):
                raise InputError(
                    f"Expected every global batch to divide evenly over the {len(chosen)} devices. Received: a batch "
                    f"of {shape[0]} rows. Use a batch_size that is a multiple of {len(chosen)}, and an input "
                    "whose row count is too (or drop the last partial batch), so that no batch is smaller."
                )

        class CheckedDataParallel(DataParallel):  # type: ignore[misc]
            """Refuses a batch JAX cannot split across the devices, with what to do about it."""

            def get_data_layout(self, data_shape: Sequence[int]) -> Any:
                check_rows(data_shape)
                return super().get_data_layout(data_shape)

        # Keras computes the layouts from an epoch's first batch only; every batch goes through
        # `distribute_data_input`, so a short last batch is refused there, before JAX fails.
        from keras.src import backend as keras_backend

        lib: Any = getattr(keras_backend, "distribution_lib", None)
        original = getattr(lib, "distribute_data_input", None)

        def checked(per_process_batch: Any, layout: Any, batch_dim_name: Any = None) -> Any:
            check_rows(getattr(per_process_batch, "shape", ()))
            assert original is not None
            return original(per_process_batch, layout, batch_dim_name)

        previous = distribution()
        strategy = CheckedDataParallel(devices=chosen)
        set_distribution(strategy)
        if original is not None:
            lib.distribute_data_input = checked
        try:
            yield strategy
        finally:
            if original is not None:
                lib.distribute_data_input = original
            set_distribution(previous)
    else:
        import tensorflow as tf

        mirrored = tf.distribute.MirroredStrategy(devices=[_tf_long(d) for d in chosen])
        with mirrored.scope():
            yield mirrored


def _available(cpu_devices: int | None) -> list[str]:
    return devices(cpu_devices)


def _too_late(count: int, have: int, runtime: str) -> InputError:
    return InputError(
        f"Expected cpu_devices={count} to be set before {runtime} started its runtime. Received: it already runs with "
        f"{have} CPU device(s). Call kerasfleet.data_parallel(cpu_devices={count}) (or kerasfleet.devices(cpu_devices="
        f"{count})) first thing after the imports, before any model, layer or array is made."
    )


def _tf_short(name: str) -> str:
    """'/device:CPU:1' -> 'cpu:1' (the names Keras's distribution API uses)."""
    kind, index = name.rsplit(":", 2)[-2:]
    return f"{kind.lower()}:{index}"


def _tf_long(short: str) -> str:
    kind, index = short.split(":")
    return f"/device:{kind.upper()}:{index}"
