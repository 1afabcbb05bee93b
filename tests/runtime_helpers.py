"""Worker handlers for runtime tests, imported by bare workers through the caller's sys.path."""

import os
import sys


def dying_handler(config):
    sys.stderr.write("boom: this worker cannot start (runtime_helpers.dying_handler)\n")
    sys.stderr.flush()
    os._exit(1)


def hanging_handler(config):
    import time

    sys.stderr.write("hanging while starting (runtime_helpers.hanging_handler)\n")
    sys.stderr.flush()
    time.sleep(3600)
