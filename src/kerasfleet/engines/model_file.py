"""The model as a file, and what can be read from it without importing Keras.

Workers load the model from a file: a path the user gave, or a `.keras` file written once
from an in-memory model. Reading the signature (input names, per-row shapes, dtypes) and the
custom classes from the file's JSON config lets the caller refuse bad input and missing custom
objects before a single worker starts, without paying Keras's multi-second import.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, ModelLoadError

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, per-row shape (None where any size fits), dtype."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name!r}: (rows, {dims}) {self.dtype}" if dims else f"{self.name!r}: (rows,) {self.dtype}"


@dataclass(frozen=True)
class Signature:
    """The model's inputs as `model.predict` takes them.

    `structure` is "single" (one array), "list" (a list of arrays, in order) or "dict" (arrays
    keyed by input name). `inputs` is None when the file does not say (subclassed models):
    validation then waits for the workers, which still check before any row is predicted.
    """

    inputs: tuple[TensorSpec, ...] | None
    structure: str
    custom_modules: tuple[str, ...] = field(default=())

    @property
    def fixed(self) -> bool:
        """Every input's per-row shape is known: workers can warm up and a trial can run ahead."""
        return self.inputs is not None and all(d is not None for s in self.inputs for d in s.shape)

    def row_specs(self) -> tuple[tuple[tuple[int, ...], str], ...]:
        """((per-row shape, dtype str), ...) of a fixed signature: the rows part of an engine key."""
        import numpy as np

        assert self.inputs is not None and self.fixed
        return tuple((tuple(int(d) for d in s.shape if d is not None), _dtype_str(np, s.dtype)) for s in self.inputs)


@dataclass
class ModelFile:
    """A model file the workers can load; owns the temporary copy of an in-memory model."""

    path: Path
    signature: Signature
    _tmpdir: str | None = None

    def cleanup(self) -> None:
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None


def resolve_model(model: Any, custom_objects: dict[str, Any] | None = None, *, for_workers: bool = True) -> ModelFile:
    """Turn `model` (a path or an in-memory `keras.Model`) into a checked file and signature.

    `for_workers=False` (an in-memory model used in this process only) skips the check that
    every custom class imports in a worker.
    """
    tmpdir = None
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).expanduser()
        if path.suffix.lower() not in MODEL_SUFFIXES:
            raise InputError(
                f"Expected a model file ending in {', '.join(MODEL_SUFFIXES)} or a keras.Model. "
                f"Received: model={str(model)!r}. Save the model with model.save('model.keras')."
            )
        if not path.is_file():
            raise ModelLoadError(f"Expected an existing model file. Received: model={str(path)!r} (no such file).")
    elif _is_keras_model(model):
        # Saved once; the workers load this file. Never pickled per task.
        tmpdir = tempfile.mkdtemp(prefix="kerasfleet-model-")
        path = Path(tmpdir) / "model.keras"
        try:
            model.save(path)
        except Exception as exc:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise ModelLoadError(
                f"Expected a keras.Model that can be saved to a .keras file. Received: {type(model).__name__}, "
                f"and saving failed: {exc}. Custom layers need get_config() and "
                "@keras.saving.register_keras_serializable()."
            ) from exc
    else:
        raise InputError(
            f"Expected model to be a path to a .keras/.h5 file or a keras.Model. Received: model of type {type(model).__name__}."
        )
    try:
        config = read_config(path)
        signature = signature_from_config(config)
        custom = [
            (name, module or _registered_module(registered), registered) for name, module, registered in _custom_classes(config)
        ]
        if for_workers:
            _check_custom_classes(custom, custom_objects or {}, path)
        modules = tuple(sorted({m for _, m, _ in custom if m and m != "__main__" and not m.startswith("keras")}))
        signature = Signature(signature.inputs, signature.structure, modules)
    except BaseException:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)
        raise
    return ModelFile(path=path, signature=signature, _tmpdir=tmpdir)


def _is_keras_model(obj: Any) -> bool:
    # Checked by class name so that kerasfleet never imports keras in the caller's process.
    return any(c.__name__ == "Model" and c.__module__.startswith("keras") for c in type(obj).__mro__)


def read_config(path: Path) -> dict[str, Any]:
    """The model's JSON config from a .keras zip or an .h5 file."""
    if path.suffix.lower() == ".keras":
        try:
            with zipfile.ZipFile(path) as zf:
                return dict(json.loads(zf.read("config.json")))
        except (zipfile.BadZipFile, KeyError, json.JSONDecodeError, OSError) as exc:
            raise ModelLoadError(
                f"Expected a .keras file written by model.save() (a zip holding config.json). "
                f"Received: {str(path)!r}, which is corrupt or not a Keras model ({exc})."
            ) from exc
    try:
        import h5py
    except ImportError as exc:  # h5py comes with keras; without it the workers cannot load .h5 either
        raise ModelLoadError("Expected h5py to be installed to read an .h5 model. Install keras.") from exc
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
    except OSError as exc:
        raise ModelLoadError(
            f"Expected an HDF5 model file written by model.save(). Received: {str(path)!r}, which is corrupt ({exc})."
        ) from exc
    if raw is None:
        raise ModelLoadError(
            f"Expected an .h5 file holding a whole model (model.save). Received: {str(path)!r}, which has no "
            "model_config (weights only?). Load the model and pass the keras.Model instead."
        )
    return dict(json.loads(raw if isinstance(raw, str) else raw.decode()))


def _dtype_str(np: Any, name: str) -> str:
    try:
        return str(np.dtype(name).str)
    except TypeError:  # a Keras-only dtype name: the engines compute in float32
        return str(np.dtype("float32").str)


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, dict):  # a serialised DTypePolicy
        return str(dtype.get("config", {}).get("name", "float32"))
    return str(dtype or "float32")


def _input_spec(layer_cfg: dict[str, Any]) -> TensorSpec:
    cfg = layer_cfg.get("config", {})
    shape = cfg.get("batch_shape") or cfg.get("batch_input_shape") or [None]
    return TensorSpec(
        name=str(cfg.get("name", layer_cfg.get("name"))), shape=tuple(shape[1:]), dtype=_dtype_name(cfg.get("dtype"))
    )


def signature_from_config(config: dict[str, Any]) -> Signature:
    """Read input names, shapes and dtypes from a Functional or Sequential config."""
    cfg = config.get("config", {})
    layers = cfg.get("layers", [])
    if "input_layers" in cfg:
        by_name = {layer.get("name", layer.get("config", {}).get("name")): layer for layer in layers}
        declared = cfg["input_layers"]

        def spec(node: Any) -> TensorSpec:
            return _input_spec(by_name[node[0]])

        try:
            if isinstance(declared, dict):
                return Signature(tuple(spec(v) for v in declared.values()), "dict")
            if declared and isinstance(declared[0], str):
                return Signature((spec(declared),), "single")
            specs = tuple(spec(node) for node in declared)
            return Signature(specs, "single" if len(specs) == 1 else "list")
        except (KeyError, IndexError, TypeError):
            return Signature(None, "single")
    if config.get("class_name") == "Sequential":
        if layers and layers[0].get("class_name") == "InputLayer":
            return Signature((_input_spec(layers[0]),), "single")
        shape = cfg.get("build_input_shape")
        if shape:
            return Signature((TensorSpec("input", tuple(shape[1:]), "float32"),), "single")
    return Signature(None, "single")


def _custom_classes(node: Any) -> list[tuple[str, str | None, str]]:
    """(class name, module, registered name) of every non-Keras object in a config."""
    found: list[tuple[str, str | None, str]] = []
    if isinstance(node, dict):
        registered = node.get("registered_name")
        if "class_name" in node and registered and not str(node.get("module", "")).startswith("keras"):
            found.append((str(node["class_name"]), node.get("module"), str(registered)))
        for value in node.values():
            found.extend(_custom_classes(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_custom_classes(value))
    return found


def _check_custom_classes(custom: list[tuple[str, str | None, str]], custom_objects: dict[str, Any], path: Path) -> None:
    for key, obj in custom_objects.items():
        if getattr(obj, "__module__", None) == "__main__":
            raise ModelLoadError(
                f"Expected the classes in custom_objects to be importable by the worker processes. Received: "
                f"{key!r}: {getattr(obj, '__qualname__', obj)!r}, defined in the script or notebook that was run (module "
                f"'__main__'), which workers do not run. Move it to a module next to your script (for example "
                f"my_layers.py) and import it from there."
            )
    for class_name, module, registered in custom:
        if class_name in custom_objects or registered in custom_objects:
            continue
        if module == "__main__":
            # Workers never run the caller's script (a script without a main guard would start
            # workers from its workers), so a class defined there cannot load in them.
            raise ModelLoadError(
                f"Expected every custom class in the model to be importable by the worker processes. Received: "
                f"{class_name!r} (registered as {registered!r}), defined in the script or notebook that was run "
                "(module '__main__'), which workers do not run. Move the class to a module next to your script "
                f"(for example my_layers.py), import it from there (from my_layers import {class_name}), and save the "
                "model again."
            )
        if module and _importable(module):
            continue
        raise ModelLoadError(
            f"Expected every custom class in the model to be loadable by the worker processes. Received: "
            f"{class_name!r} (registered as {registered!r}, module {module!r}) in {str(path)!r}, which is neither in "
            f"custom_objects nor importable. Pass custom_objects={{{class_name!r}: {class_name}}} with the class "
            "defined in an importable module, or decorate it with @keras.saving.register_keras_serializable() "
            "in such a module."
        )


def _registered_module(registered: str) -> str | None:
    """Where a class registered with Keras lives, when the caller has Keras imported.

    A `.keras` config names the module of a registered class only sometimes; the caller's own
    registry knows it (and whether it is the caller's `__main__`, which workers never run).
    """
    keras = sys.modules.get("keras")
    saving = getattr(keras, "saving", None)
    if saving is None:
        return None
    try:
        obj = saving.get_registered_object(registered)
    except Exception:  # noqa: BLE001 - an odd registry entry: fall back to the config alone
        return None
    module = getattr(obj, "__module__", None)
    return str(module) if module else None


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
