"""How the trial function reaches the workers: by name, or by value with cloudpickle.

    caller                                                   worker (started with python -c)
    ──────                                                   ───────────────────────────────
    "module:fn"      -> FunctionRef(name)        (checked:   import module, getattr fn
                        module found, fn bound at top level)
    fn from a module -> FunctionRef(name)                    import module, getattr fn
    fn from __main__,
    a lambda, a      -> FunctionRef(name, cloudpickle bytes) cloudpickle.loads: the function
    closure, partial                                         and the globals it uses, by value

Workers never run the caller's script (see runtime/bootstrap.py), so a function defined there
cannot be imported by name: it travels by value, once per worker (in `WorkerInit`, not in
every trial). `name` ("module:qualname") is the function's identity in the store: a re-run
finds its finished trials by name, not by code.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

# A by-value function this large carries big globals (a dataset loaded at the top of the
# script): every worker start receives it. Worth a warning, not a refusal.
LARGE_PICKLE_BYTES = 64 << 20


@dataclass(frozen=True)
class FunctionRef:
    """The trial function as workers receive it."""

    name: str  # "module:qualname": the identity recorded in the store
    module: str
    qualname: str
    pickled: bytes | None = None  # cloudpickle of the function when it cannot be imported by name


def function_ref(fn: Any) -> FunctionRef:
    """Check `fn` in the caller and say how it travels; InputError names the fix."""
    if isinstance(fn, str):
        return _from_string(fn)
    if not callable(fn):
        raise InputError(
            f"Expected fn to be a function or a 'module:function' string. Received: fn={fn!r} ({type(fn).__name__})."
        )
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise InputError(f"Expected a plain function that returns a dict of numbers. Received: an async function {fn!r}.")
    inner = fn.func if isinstance(fn, functools.partial) else fn  # a partial is named after its function
    module = getattr(inner, "__module__", None) or "__main__"
    qualname = getattr(inner, "__qualname__", None) or type(inner).__qualname__
    name = f"{module}:{qualname}" + ("(partial)" if inner is not fn else "")
    if inner is fn and module != "__main__" and "<" not in qualname and _lookup(module, qualname) is fn:
        return FunctionRef(name, module, qualname)
    # Defined in the caller's script, a lambda, a closure, a partial: by value.
    try:
        import cloudpickle
    except ImportError:
        raise InputError(
            f"Expected cloudpickle to be installed to send {name} to the workers by value (it is defined in "
            f"{'the script being run' if module == '__main__' else 'a function'}, which workers cannot import). "
            "Received: no cloudpickle. Install it with: pip install 'kerasfleet[sweep]', or move the function to a module "
            "next to your script and pass it (or 'module:function')."
        ) from None
    try:
        data = cloudpickle.dumps(fn)
    except Exception as exc:  # noqa: BLE001 - anything it captures may refuse to pickle
        raise InputError(
            f"Expected a trial function cloudpickle can send to the workers. Received: {name}: {type(exc).__name__}: {exc}. "
            "It (or a global it uses) holds something that does not pickle (a lock, an open file, a model); "
            "create that inside the function, or move the function to a module."
        ) from exc
    if len(data) > LARGE_PICKLE_BYTES:
        warnings.warn(
            f"{name} pickles to {len(data) / (1 << 20):.0f} MB (it captures large globals); every worker receives it at "
            "start. Load large data inside the function (from a file) instead.",
            RuntimeWarning,
            stacklevel=3,
        )
    return FunctionRef(name, module, qualname, data)


def load_function(ref: FunctionRef) -> Callable[..., Any]:
    """The function itself, in a worker (or in the caller, for checks)."""
    if ref.pickled is not None:
        import cloudpickle

        fn = cloudpickle.loads(ref.pickled)
    else:
        fn = importlib.import_module(ref.module)
        for part in ref.qualname.split("."):
            fn = getattr(fn, part)
    if not callable(fn):
        raise TypeError(f"Expected {ref.name} to be a function. Received: {type(fn).__name__}.")
    return fn  # type: ignore[no-any-return]


def signature_of(fn: Any) -> inspect.Signature | None:
    """fn's signature; for a "module:function" string read from the module's source (a plain
    top-level def), without importing it. None when it cannot be known here (a builtin, a
    decorated function, a name bound otherwise): the worker checks the loaded function."""
    if not isinstance(fn, str):
        try:
            return inspect.signature(fn)
        except (TypeError, ValueError):
            return None
    module, _, qualname = fn.partition(":")
    spec = importlib.util.find_spec(module)  # found before (function_ref): its parents are imported
    if spec is None or not spec.origin or not spec.origin.endswith(".py") or "." in qualname:
        return None
    with open(spec.origin, encoding="utf-8", errors="replace") as f:
        tree = ast.parse(f.read(), spec.origin)
    defs = [
        n
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign)) and _binds(n, qualname)
    ]
    if len(defs) != 1 or not isinstance(defs[0], ast.FunctionDef) or defs[0].decorator_list:
        return None
    return _ast_signature(defs[0].args)


def check_signature(sig: inspect.Signature | None, keysets: Iterable[tuple[str, ...]], name: str) -> None:
    """Every `fn(**config, seed=seed)` call the sweep will make binds to fn's signature."""
    if sig is None:
        return  # unknown here: the worker checks the loaded function, or the call itself tells
    for keys in keysets:
        try:
            sig.bind(**dict.fromkeys(keys), seed=0)
        except TypeError as exc:
            raise InputError(
                f"Expected {name}{sig} to accept fn(**config, seed=seed) with config keys {list(keys)}. "
                f"Received: {exc}. Add the parameter (or **kwargs) to the function, or fix the grid's keys."
            ) from None


def _lookup(module: str, qualname: str) -> Any:
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception:  # noqa: BLE001 - not importable by name: it goes by value
        return None
    return obj


def _from_string(text: str) -> FunctionRef:
    module, sep, qualname = text.partition(":")
    if not (sep and _dotted(module) and _dotted(qualname)):
        raise InputError(
            f"Expected fn as 'module:function' (e.g. 'train:run' for def run in train.py, importable from here). "
            f"Received: fn={text!r}."
        )
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError) as exc:  # a parent package that does not import
        raise InputError(f"Expected the module of fn={text!r} to be importable. Received: {type(exc).__name__}: {exc}.") from exc
    if spec is None:
        raise InputError(
            f"Expected the module of fn={text!r} to be importable. Received: no module named {module!r} on sys.path "
            f"(the working folder is {os.getcwd()}). Run from the folder that holds {module.replace('.', '/')}.py, "
            "or add that folder to PYTHONPATH."
        )
    # Look for the name in the module's source without running it: importing a training module
    # here would load its framework in the caller for nothing. Workers import it for real.
    origin = spec.origin
    if origin and origin.endswith(".py") and os.path.isfile(origin):
        with open(origin, encoding="utf-8", errors="replace") as f:
            try:
                tree = ast.parse(f.read(), origin)
            except SyntaxError as exc:
                raise InputError(f"Expected {origin} (module of fn={text!r}) to be valid Python. Received: {exc}.") from None
        head = qualname.split(".")[0]
        found = _top_level_binding(tree, head)
        if found == "async":
            raise InputError(f"Expected a plain function for fn={text!r}. Received: an async def in {origin}.")
        if found is None:
            raise InputError(
                f"Expected module {module!r} ({origin}) to define {head!r} at top level. "
                f"Received: no def, class, assignment or import named {head!r} there."
            )
    return FunctionRef(text, module, qualname)


def _binds(node: ast.stmt, name: str) -> bool:
    if isinstance(node, ast.Assign):
        return any(isinstance(n, ast.Name) and n.id == name for t in node.targets for n in ast.walk(t))
    return getattr(node, "name", None) == name


def _ast_signature(args: ast.arguments) -> inspect.Signature:
    """The signature a def's arguments describe (defaults stand in as None: only binding matters)."""
    P = inspect.Parameter
    params = []
    positional = [*args.posonlyargs, *args.args]
    first_default = len(positional) - len(args.defaults)
    for i, arg in enumerate(positional):
        kind = P.POSITIONAL_ONLY if i < len(args.posonlyargs) else P.POSITIONAL_OR_KEYWORD
        params.append(P(arg.arg, kind, default=P.empty if i < first_default else None))
    if args.vararg is not None:
        params.append(P(args.vararg.arg, P.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(P(arg.arg, P.KEYWORD_ONLY, default=P.empty if default is None else None))
    if args.kwarg is not None:
        params.append(P(args.kwarg.arg, P.VAR_KEYWORD))
    return inspect.Signature(params)


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _top_level_binding(tree: ast.Module, name: str) -> str | None:
    """What binds `name` at the module's top level: "def", "async", "other" (class, assignment,
    import) or None; "other" also when the module may create names dynamically (a star import,
    a module __getattr__)."""
    for node in tree.body:
        if isinstance(node, ast.AsyncFunctionDef) and node.name == name:
            return "async"
        if isinstance(node, ast.FunctionDef) and node.name in (name, "__getattr__"):
            return "def"
        if isinstance(node, ast.ClassDef) and node.name == name:
            return "other"
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == name:
                    return "other"
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            targets = [node.target]
        for target in targets:
            if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target)):
                return "other"
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            # Conditional definitions (try: from x import f / except ImportError: def f...).
            inner = ast.Module(body=[n for n in ast.walk(node) if isinstance(n, ast.stmt) and n is not node], type_ignores=[])
            found = _top_level_binding(inner, name)
            if found is not None:
                return found
    return None
