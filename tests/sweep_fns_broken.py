"""A trial module that defines its function but fails to import (tests/test_sweep.py)."""

raise RuntimeError("this module cannot be imported (sweep_fns_broken)")


def run(seed):
    return {"v": 1}
