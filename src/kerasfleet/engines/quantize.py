"""int8 files from the checked fp32 export, through ONNX Runtime's quantization tool.

| variant | what it writes | runs on |
| --- | --- | --- |
| `"static"` | QDQ: weights int8 per channel, activations uint8 with ranges calibrated on given rows | ONNX Runtime; OpenVINO reads the same QDQ file and runs its layers in int8 |
| `"dynamic"` | MatMul/Conv weights int8, activation ranges computed per batch at run time | ONNX Runtime |

Nothing here says whether the result is good enough: that is the accuracy gate's job
(`tune/precision.py`). Keras is never imported.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("static", "dynamic")
_CALIBRATION_BATCH = 32


def quantize(onnx_path: Path, meta: dict[str, Any], variant: str, calibration: list[np.ndarray[Any, Any]], out: Path) -> Path:
    """Write the `variant` int8 file of `onnx_path` to `out` (atomically); returns `out`."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, quantize_static

    names = list(meta["inputs"])

    class Rows(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            rows = int(calibration[0].shape[0]) if calibration else 0
            self._batches: Iterator[dict[str, np.ndarray[Any, Any]]] = iter(
                [
                    {n: np.ascontiguousarray(a[lo : lo + _CALIBRATION_BATCH]) for n, a in zip(names, calibration)}
                    for lo in range(0, rows, _CALIBRATION_BATCH)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray[Any, Any]] | None:
            return next(self._batches, None)

    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.onnx")
    # The tool logs a "consider pre-processing" warning per call: not the user's concern.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        if variant == "static":
            quantize_static(
                str(onnx_path),
                str(tmp),
                Rows(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                per_channel=True,
            )
        elif variant == "dynamic":
            quantize_dynamic(str(onnx_path), str(tmp), weight_type=QuantType.QInt8)
        else:
            raise ValueError(f"Expected a quantization variant among {VARIANTS}. Received: {variant!r}.")
        os.replace(tmp, out)
    finally:
        logger.setLevel(level)
        tmp.unlink(missing_ok=True)
        # The static tool leaves its calibration model beside the output in some versions.
        for stray in out.parent.glob(f"{tmp.stem}*"):
            stray.unlink(missing_ok=True)
    return out
