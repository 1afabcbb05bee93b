"""The `kerasfleet` command (also `python -m kerasfleet`)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..errors import FleetError


def _fail(error: BaseException) -> click.ClickException:
    return click.ClickException(str(error))


ENGINES = ["auto", "keras", "onnx", "openvino"]


def _precision_options(fn: Any) -> Any:
    """--precision, --calibration and the gate's thresholds, shared by predict, serve and tune."""
    options = [
        click.option(
            "--precision",
            type=click.Choice(["fp32", "int8", "bf16", "fp16"]),
            default="fp32",
            show_default=True,
            help="int8/bf16/fp16 only if the accuracy gate passes (cached per model and machine); else refused with the numbers.",
        ),
        click.option(
            "--calibration",
            type=click.Path(dir_okay=False, exists=True),
            default=None,
            help=".npy/.npz rows to calibrate int8 and run the gate on (predict: default the first rows of INPUT).",
        ),
        click.option(
            "--max-top1-disagreement",
            type=float,
            default=0.005,
            show_default=True,
            help="Gate: largest share of rows whose top-1 class may differ from fp32 Keras.",
        ),
        click.option(
            "--atol", type=float, default=None, help="Gate: largest abs difference from fp32 Keras (default: not checked)."
        ),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kerasfleet")
def main() -> None:
    """Keras models on every core and GPU of this machine."""


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("input", type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help=".npy (results memory-mapped to disk) or .npz (one array per output).",
)
@click.option("--workers", type=int, default=None, help="Worker processes (default: cores / threads).")
@click.option("--threads-per-worker", type=int, default=None, help="Threads each worker uses (default 1 on CPU).")
@click.option("--batch-size", type=int, default=None, help="Rows per compiled call (default: about 4 MB of input).")
@click.option("--backend", type=click.Choice(["jax", "tensorflow", "torch"]), default=None, help="Keras backend of the workers.")
@click.option("--devices", default="auto", show_default=True, help="auto, cpu, gpu, or GPU ids like 0,1.")
@click.option(
    "--unsafe", is_flag=True, help="Load with Keras safe_mode=False (runs Lambda code from the file: trusted files only)."
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on when stderr is a terminal).")
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="auto",
    show_default=True,
    help="auto: measured once per model and machine; keras: compiled Keras; onnx: ONNX Runtime; openvino: OpenVINO (both parity-checked).",
)
@click.option(
    "--cluster", default=None, help="Run on a Ray cluster: 'ray' (the running one, or a local one) or its address (host:6379)."
)
@_precision_options
def predict(
    model: str,
    input: str,
    output: str,
    workers: int | None,
    threads_per_worker: int | None,
    batch_size: int | None,
    backend: str | None,
    devices: str,
    unsafe: bool,
    progress: bool | None,
    engine: str,
    cluster: str | None,
    precision: str,
    calibration: str | None,
    max_top1_disagreement: float,
    atol: float | None,
) -> None:
    """Predict every row of INPUT (.npy/.npz) with MODEL (.keras/.h5) into OUTPUT."""
    from ..prediction import predict as run

    suffix = Path(output).suffix.lower()
    if suffix not in (".npy", ".npz"):
        raise click.BadParameter(f"Expected a .npy or .npz output path. Received: {output!r}.", param_hint="-o")
    started = time.perf_counter()
    try:
        result = run(
            model,
            input,
            out=output if suffix == ".npy" else None,
            workers=workers,
            threads_per_worker=threads_per_worker,
            batch_size=batch_size,
            backend=backend,
            devices=_devices(devices),
            safe_mode=not unsafe,
            progress=progress,
            engine=engine,
            cluster=cluster,
            precision=precision,
            calibration=calibration,
            max_top1_disagreement=max_top1_disagreement,
            atol=atol,
        )
    except FleetError as exc:
        if suffix == ".npy" and "multi-output" not in str(exc) and "outputs" in str(exc):
            raise click.ClickException(f"{exc} Write a multi-output model's results to a .npz instead.") from exc
        raise _fail(exc) from exc
    if suffix == ".npz":
        arrays = (
            result if isinstance(result, dict) else dict(enumerate(result)) if isinstance(result, list) else {"output_0": result}
        )
        np_savez(output, {str(k) if not isinstance(k, int) else f"output_{k}": v for k, v in arrays.items()})
    first = (
        result if not isinstance(result, (dict, list)) else next(iter(result.values() if isinstance(result, dict) else result))
    )
    seconds = time.perf_counter() - started
    click.echo(f"{len(first)} rows -> {output} in {seconds:.2f} s ({len(first) / seconds:,.0f} rows/s)", err=True)


def np_savez(path: str, arrays: dict[str, Any]) -> None:
    import numpy as np

    np.savez(path, **arrays)


def _devices(text: str) -> Any:
    if text in ("auto", "cpu", "gpu"):
        return text
    try:
        return [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise click.BadParameter(
            f"Expected auto, cpu, gpu or GPU ids like 0,1. Received: {text!r}.", param_hint="--devices"
        ) from None


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the .onnx file.")
@click.option("--unsafe", is_flag=True, help="Load with Keras safe_mode=False (trusted files only).")
def export(model: str, output: str, unsafe: bool) -> None:
    """Export MODEL to ONNX through Keras's exporter, checked against Keras on a sample batch."""
    from ..engines.export import export as run
    from ..engines.model_file import resolve_model

    if Path(output).suffix.lower() != ".onnx":
        raise click.BadParameter(f"Expected an .onnx output path. Received: {output!r}.", param_hint="-o")
    try:
        resolved = resolve_model(model)
        onnx = run(resolved, custom_objects=None, safe_mode=not unsafe, out=Path(output))
    except FleetError as exc:
        raise _fail(exc) from exc
    parity = onnx.meta["parity"]
    click.echo(
        f"{output}: inputs {onnx.meta['inputs']}, outputs {onnx.meta['output_names']}; matches Keras on a sample batch "
        f"(max abs diff {parity['max_abs']:.2g}, max relative {parity['max_rel']:.2g})"
    )


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--seconds", type=float, default=None, help="Trial budget beyond the slowest start-up (default 8).")
@click.option("--backend", type=click.Choice(["jax", "tensorflow", "torch"]), default=None)
@click.option("--unsafe", is_flag=True, help="Load with Keras safe_mode=False (trusted files only).")
@click.option(
    "--engine",
    type=click.Choice(["auto", "onnx", "openvino"]),
    default="auto",
    show_default=True,
    help="With --precision: the runtimes to try.",
)
@_precision_options
def tune(
    model: str,
    seconds: float | None,
    backend: str | None,
    unsafe: bool,
    engine: str,
    precision: str,
    calibration: str | None,
    max_top1_disagreement: float,
    atol: float | None,
) -> None:
    """Measure engines, workers x threads and batch sizes for MODEL here; store and print the plan.

    With --precision int8/bf16/fp16 and --calibration rows: measure the reduced-precision
    candidates and run the accuracy gate instead; store and print the verdict.
    """
    from ..engines.model_file import resolve_model
    from ..prediction import Fleet
    from ..runtime import default_backend
    from ..tune import DEFAULT_TRIAL_S, plan_path
    from ..tune import tune as run

    if precision != "fp32":
        _tune_precision(
            model, backend or default_backend(), not unsafe, engine, precision, calibration, max_top1_disagreement, atol
        )
        return
    try:
        resolved = resolve_model(model)
        click.echo(f"measuring {model} (rows/s on synthetic rows of its signature):")
        plan = run(
            resolved,
            backend=backend or default_backend(),
            safe_mode=not unsafe,
            seconds=seconds or DEFAULT_TRIAL_S,
            verbose=True,
            fleet_factory=Fleet,
        )
    except FleetError as exc:
        raise _fail(exc) from exc
    click.echo(f"plan: {plan.describe()}")
    click.echo(f"stored in {plan_path(resolved, backend or default_backend())}")
    for line in _precision_lines(resolved, backend or default_backend()):
        click.echo(line)


def _precision_lines(model: Any, backend: str) -> list[str]:
    """The stored reduced-precision verdicts of MODEL on this machine, one line each."""
    from ..tune import cached_choices, describe_verdict

    return [f"precision {describe_verdict(v)}" for v in cached_choices(model, backend)]


def _tune_precision(
    model: str,
    backend: str,
    safe_mode: bool,
    engine: str,
    precision: str,
    calibration: str | None,
    max_top1_disagreement: float,
    atol: float | None,
) -> None:
    from ..engines.model_file import resolve_model
    from ..prediction.calibration import precision_request
    from ..tune import PrecisionRefused

    if calibration is None:
        raise click.BadParameter(
            f"Expected --calibration ROWS.npy for --precision {precision}. Received: none.", param_hint="--calibration"
        )
    try:
        resolved = resolve_model(model)
        click.echo(
            f"measuring {precision} candidates for {model} and running the accuracy gate on held-out rows of {calibration}:"
        )
        request = precision_request(precision, engine, resolved.signature, calibration, max_top1_disagreement, atol)
        try:
            choice = request.choose(resolved, engine, backend, None, safe_mode)
        except PrecisionRefused as exc:
            raise click.ClickException(str(exc)) from exc
    except FleetError as exc:
        raise _fail(exc) from exc
    for c in choice.candidates:
        gate = (
            ""
            if "max_abs" not in c
            else f"  gate {'pass' if c['passed'] else 'FAIL'}: "
            + (
                (f"top-1 {c['top1_agreement']:.2%}, " if c.get("top1_agreement") is not None else "")
                + f"max abs {c['max_abs']:.3g}, mean abs {c['mean_abs']:.3g}"
                + (f" ({c['reason']})" if c.get("reason") else "")
            )
        )
        rate = f"{c['rows_per_s']:>14,.0f} rows/s" if "rows_per_s" in c else f"{'-':>14}       "
        click.echo(f"  {c['variant']:<16} {rate}{gate}")
    click.echo(f"precision: {choice.describe()}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--batch-sizes", default="1,32,256", show_default=True, help="Comma-separated batch sizes to time.")
@click.option(
    "--calls", type=int, default=200, show_default=True, help="Timed calls per path and batch size (model.predict: at most 100)."
)
@click.option(
    "-o", "--output", type=click.Path(file_okay=False), default=None, help="Report folder (default: ./kerasfleet-profile-MODEL)."
)
@click.option("--backend", type=click.Choice(["jax", "tensorflow", "torch"]), default=None)
def profile(model: str, batch_sizes: str, calls: int, output: str | None, backend: str | None) -> None:
    """Latency distributions per prediction path, trace and retrace costs, and the plan kerasfleet would use."""
    from ..runtime import default_backend
    from .profile import profile as run

    try:
        sizes = tuple(sorted({int(b) for b in batch_sizes.split(",") if b.strip()}))
    except ValueError:
        raise click.BadParameter(
            f"Expected comma-separated integers. Received: {batch_sizes!r}.", param_hint="--batch-sizes"
        ) from None
    if not sizes or sizes[0] < 1 or calls < 1:
        raise click.BadParameter(f"Expected positive batch sizes and calls. Received: {batch_sizes!r}, {calls}.")
    chosen = backend or default_backend()
    os.environ["KERAS_BACKEND"] = chosen  # profile imports Keras in this process
    try:
        report = run(
            model, batch_sizes=sizes, calls=calls, out_dir=Path(output) if output else None, backend=chosen, echo=click.echo
        )
    except FleetError as exc:
        raise _fail(exc) from exc
    click.echo(f"\nreport: {report}")


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False))
@click.option("--workers", type=int, default=None)
@click.option("--threads-per-worker", type=int, default=None)
@click.option("--devices", default="auto", show_default=True)
@click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(
    model: str | None, workers: int | None, threads_per_worker: int | None, devices: str, engine: str, as_json: bool
) -> None:
    """Cores, workers, threads, backend, devices and batch size kerasfleet would use."""
    from ..engines import default_batch_size, row_bytes
    from ..engines.model_file import resolve_model
    from ..runtime import default_backend, make_plan

    try:
        plan = make_plan(workers, threads_per_worker, devices=_devices(devices))
        facts: dict[str, Any] = {
            "python": sys.version.split()[0],
            "usable_cores": len(plan.usable_cpus),
            "cpu_count": os.cpu_count(),
            "device": plan.device,
            "gpus": list(plan.gpus),
            "workers": plan.workers,
            "threads_per_worker": plan.threads_per_worker,
            "cores_per_worker": [list(s.cpus) for s in plan.slots],
            "backend": default_backend(),
            "engine": engine,
        }
        if model is not None:
            sig = resolve_model(model).signature
            facts["model"] = model
            if engine == "auto":
                from ..tune import cached_plan

                tuned = cached_plan(resolve_model(model), default_backend())
                plan_in_force = (
                    tuned.describe() if tuned else "not measured yet (kerasfleet tune MODEL, or the first auto call, measures it)"
                )
                facts["plan_in_force"] = plan_in_force
                if tuned is not None and plan.device == "cpu":
                    # What a call would use: the plan's engine, split (unless given here) and batch.
                    facts["engine"] = f"auto ({tuned.engine})"
                    if workers is None and threads_per_worker is None:
                        tuned_split = make_plan(tuned.workers, tuned.threads_per_worker, devices=_devices(devices))
                        facts["workers"], facts["threads_per_worker"] = tuned_split.workers, tuned_split.threads_per_worker
                        facts["cores_per_worker"] = [list(s.cpus) for s in tuned_split.slots]
                    facts["batch_size_in_force"] = tuned.batch_size
            verdicts = _precision_lines(resolve_model(model), default_backend())
            if verdicts:
                facts["precision_verdicts"] = verdicts
            if sig.inputs is None:
                facts["inputs"] = "not declared in the file (subclassed model): checked by the workers"
            else:
                facts["inputs"] = [s.describe() for s in sig.inputs]
                if sig.fixed:
                    facts["batch_size"] = default_batch_size(
                        row_bytes(sig.row_specs()), plan.device, "keras" if engine == "auto" else engine
                    )
                else:
                    facts["batch_size"] = "chosen per call from the input's row size"
    except FleetError as exc:
        raise _fail(exc) from exc
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if key == "precision_verdicts":  # long sentences: one line each
            for i, line in enumerate(value):
                click.echo(f"{key.replace('_', ' ') if i == 0 else '':<{width}}  {line}")
            continue
        click.echo(f"{key.replace('_', ' '):<{width}}  {value}")


@main.command()
@click.argument("models", nargs=-1, required=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind (0.0.0.0: every network; warns).")
@click.option("--port", type=int, default=8000, show_default=True, help="TCP port (0: a free one, printed).")
@click.option("--max-batch-size", type=int, default=64, show_default=True, help="Rows per merged batch.")
@click.option(
    "--max-delay-ms", type=float, default=2.0, show_default=True, help="Longest a request waits for others to join its batch."
)
@click.option("--max-queue", type=int, default=256, show_default=True, help="Requests waiting per model; past it: 503 at once.")
@click.option("--timeout-s", type=float, default=30.0, show_default=True, help="Per request; past it: 504.")
@click.option("--max-body-mb", type=float, default=64.0, show_default=True, help="Largest request body; past it: 413.")
@click.option(
    "--token", default=None, envvar="KERASFLEET_TOKEN", help="Bearer token every route but health needs (or $KERASFLEET_TOKEN)."
)
@click.option("--grace-s", type=float, default=30.0, show_default=True, help="On SIGTERM/SIGINT: time for requests in flight.")
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="auto",
    show_default=True,
    help="auto: the fastest verified engine for this model and machine; keras; onnx; openvino.",
)
@_precision_options
@click.option(
    "--execution",
    type=click.Choice(["auto", "in-process", "fleet"]),
    default="auto",
    show_default=True,
    help="Where batches run: in the server's process, on worker processes, or auto (measured once, remembered).",
)
@click.option("--workers", type=int, default=None, help="Fleet worker processes (default: the plan's).")
@click.option("--threads-per-worker", type=int, default=None, help="Threads per fleet worker, or of the in-process engine.")
@click.option(
    "--backend", type=click.Choice(["jax", "tensorflow", "torch"]), default=None, help="Keras backend (default: KERAS_BACKEND)."
)
@click.option(
    "--unsafe", is_flag=True, help="Load with Keras safe_mode=False (runs Lambda code from the file: trusted files only)."
)
def serve(models: tuple[str, ...], backend: str | None, unsafe: bool, **options: Any) -> None:
    """Serve MODELS over HTTP (KServe V2 and TF Serving REST) with dynamic batching.

    Each MODEL is a .keras/.h5 path or name=path (the name defaults to the file's stem).
    Stops on SIGTERM or SIGINT after answering the requests in flight.
    """
    if backend is not None:
        # Before Keras is imported here: the in-process engine uses this process's backend.
        os.environ["KERAS_BACKEND"] = backend
    try:
        from ..serving import serve as run

        run(list(models), backend=backend, safe_mode=not unsafe, **options)
    except (FleetError, ImportError) as exc:
        raise _fail(exc) from exc


def _json_option(text: str | None, option: str) -> Any:
    """Inline JSON, or the path of a JSON file."""
    if text is None:
        return None
    try:
        if text.lstrip().startswith(("{", "[")):
            return json.loads(text)
        with open(text) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(f"Expected a JSON file or inline JSON. Received: {text!r} ({exc}).", param_hint=option) from None


@main.command("sweep")
@click.argument("fn")
@click.option("--grid", "grid_text", default=None, help='JSON file (or inline JSON) of {"name": [values], ...}.')
@click.option("--configs", "configs_text", default=None, help="Instead of --grid: a JSON list of configs (file or inline).")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds; every config runs once per seed.")
@click.option("--sampler", type=click.Choice(["grid", "random"]), default="grid", show_default=True)
@click.option("--n-trials", type=int, default=None, help="Configs to draw with --sampler random.")
@click.option("--timeout", type=float, default=None, help="Seconds per trial; past it the trial is killed (status timeout).")
@click.option("--store", default="sweep.sqlite", show_default=True, help="SQLite file: one row per trial, committed as it ends.")
@click.option("--workers", type=int, default=None, help="Trials at once (default: usable cores / threads per trial).")
@click.option("--threads-per-trial", type=int, default=None, help="Threads each trial uses (default 1 on CPU).")
@click.option("--devices", default="auto", show_default=True, help="auto, cpu, gpu, or GPU ids like 0,1.")
@click.option("--backend", type=click.Choice(["jax", "tensorflow", "torch"]), default=None, help="Keras backend of the workers.")
@click.option("--retry-failed", is_flag=True, help="Run failed, timed-out and crashed trials of the store again.")
@click.option("--metric", default=None, help="The metric the summary table shows (default: the only one).")
@click.option("--mode", type=click.Choice(["max", "min"]), default=None, help="Whether a higher metric is better (default max).")
@click.option("--max-trials-per-worker", type=int, default=50, show_default=True, help="Replace a worker after this many trials.")
@click.option(
    "--compile-cache/--no-compile-cache",
    default=True,
    show_default=True,
    help="JAX: workers share XLA's persistent compilation cache (an architecture compiles once per sweep).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on when stderr is a terminal).")
@click.option(
    "--cluster", default=None, help="Run on a Ray cluster: 'ray' (the running one, or a local one) or its address (host:6379)."
)
def sweep_command(
    fn: str,
    grid_text: str | None,
    configs_text: str | None,
    seeds: str,
    devices: str,
    **options: Any,
) -> None:
    """Run FN ('module:function') for every config and every seed in worker processes.

    FN(**config, seed=seed) returns a dict of numbers. Running the same command again skips the
    trials the store has finished. Prints the mean ± std over seeds per config at the end.
    """
    from ..sweeps import sweep as run

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise click.BadParameter(f"Expected comma-separated integers. Received: {seeds!r}.", param_hint="--seeds") from None
    # As `python -m` does: modules in the working folder import, here and in the workers.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        result = run(
            fn,
            _json_option(grid_text, "--grid"),
            configs=_json_option(configs_text, "--configs"),
            seeds=seed_list,
            devices=_devices(devices),
            **options,
        )
    except FleetError as exc:
        raise _fail(exc) from exc
    _print_results(result, options["metric"])


@main.command("results")
@click.argument("store", type=click.Path(dir_okay=False))
@click.option("--metric", default=None, help="The metric to summarise (default: the only one).")
@click.option("--mode", type=click.Choice(["max", "min"]), default="max", show_default=True, help="Whether higher is better.")
def results(store: str, metric: str | None, mode: str) -> None:
    """Mean ± std over seeds per config of a sweep STORE, best first; then the trials that did not finish."""
    from ..sweeps import SweepResult, read_store

    try:
        fn_name, rows = read_store(store)
        click.echo(f"{store}: trials of {fn_name}")
        _print_results(SweepResult(rows, metric=metric, mode=mode, store=store), metric)
    except FleetError as exc:
        raise _fail(exc) from exc


def _print_results(result: Any, metric: str | None) -> None:
    from ..sweeps.results import describe_not_done

    click.echo(repr(result))
    if result.counts.get("done"):
        try:
            click.echo(result.table(metric))
        except FleetError as exc:  # several metrics and none chosen
            click.echo(str(exc))
    not_done = describe_not_done(result.trials)
    if not_done:
        click.echo(not_done)
