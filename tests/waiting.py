"""Waiting on producers in loader tests: poll a condition, or serve batches (which polls the producers) until it holds."""

import time


def wait_until(condition, timeout=90.0, interval=0.05):
    """True once ``condition()`` holds, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return False


def serve_until(loader, condition, timeout=180.0, step_s=0.02):
    """Iterate ``loader`` (serving polls its producers: dead ones restart) until ``condition()``; the last item.

    ``step_s`` stands for a training step, so that producers on the same CPU get time to run.
    """
    deadline, item = time.monotonic() + timeout, None
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {loader.stats()}"
        for item in loader:
            if condition():
                break
            time.sleep(step_s)
    return item
