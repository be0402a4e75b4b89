"""What the conformance scripts share: registering checks, asserting, and running them all.

Every check runs even when an earlier one fails; the exit status is 1 if any failed.
"""

import sys
import time
import traceback

CHECKS = []


def check(fn):
    """Registers a check."""
    CHECKS.append(fn)
    return fn


def expect(cond, message):
    if not cond:
        raise AssertionError(message)


def run(title):
    """Runs every registered check; returns the exit status."""
    print(title)
    failed = []
    for fn in CHECKS:
        t0 = time.monotonic()
        try:
            fn()
            print(f"PASS {fn.__name__} ({time.monotonic() - t0:.1f}s)", flush=True)
        except Exception as e:  # noqa: BLE001 - report every failure, keep going
            failed.append(fn.__name__)
            print(f"FAIL {fn.__name__} ({time.monotonic() - t0:.1f}s): {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(limit=3, file=sys.stdout)
    print(f"{len(CHECKS) - len(failed)}/{len(CHECKS)} checks passed")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0
