"""Stop signals, from a script's first line to its last: SIGINT (Ctrl-C) and SIGTERM end a run with one line and
exit code 128 + signal (130, 143), never a traceback, and with a checkpoint where there is something to save.

    import time (torch, seconds)  exit_quietly_on_stop: one line, os._exit (nothing is open yet)
    loading, the reference pass   StopSignals(immediate=True): Stopped is raised where the program is; what a
                                  half-done write began is removed by its own cleanup (models/files.py)
    the loop and its outputs      StopSignals(): a flag, checked after each optimizer step (a checkpoint, then
                                  Stopped) and after the outputs are written (a write is never cut)

This module imports nothing heavy, so a script can install the first handler before it imports torch.
"""
from __future__ import annotations

import os
import signal
import sys

__all__ = ["Stopped", "StopSignals", "exit_quietly_on_stop"]


def exit_quietly_on_stop(module_name: str, script: str) -> None:
    """When `module_name` is "__main__" (the script runs, not imported), until main() installs StopSignals:
    SIGINT/SIGTERM print "<script>: SIGINT: stopped while starting" and exit 128 + signal at once. For the
    seconds a script spends importing torch (Python's own SIGINT handler would print a KeyboardInterrupt
    traceback from inside some import)."""
    if module_name != "__main__":
        return

    def handle(signum, frame):
        sys.stderr.write(f"{script}: {signal.Signals(signum).name}: stopped while starting\n")
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handle)


class Stopped(BaseException):
    """A stop signal that ends the run: str(stop) is its one line ("SIGINT: saved ...; continue with ..."), and
    the script exits 128 + signum (130 for SIGINT, 143 for SIGTERM). A BaseException, as KeyboardInterrupt is,
    so that no `except Exception` on the way up swallows it."""

    def __init__(self, signum: int, what: str):
        self.signum, self.name = signum, signal.Signals(signum).name
        super().__init__(f"{self.name}: {what}")

    def exit(self, script: str, quiet: bool = False) -> int:
        """Print the one line, "<script>: SIGINT: <what>" (unless quiet: a torchrun process but rank 0), and
        return the exit code, 128 + signal."""
        if not quiet:
            print(f"{script}: {self}", file=sys.stderr)
        return 128 + self.signum


class StopSignals:
    """SIGINT/SIGTERM from the moment a script starts. immediate=True (loading, the reference pass: nothing to
    save yet): the signal raises Stopped where the program is, and the script prints one line. immediate=False
    (the training loop and the writing of its outputs): it sets a flag that the loop checks after each optimizer
    step, to save a checkpoint and stop (check()). A second signal while the flag is set falls back to the
    default behaviour (immediate exit); checkpoints stay consistent because saves are atomic. Nested blocks
    restore the handlers they replaced."""

    def __init__(self, immediate: bool = False, what: str = "stopped before training began; nothing to save yet"):
        self.immediate, self.what = immediate, what
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.immediate:
            raise Stopped(signum, self.what)
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.received = signum

    def check(self, what: str) -> None:
        """Raise Stopped(what) if a signal came (flag mode)."""
        if self.received is not None:
            raise Stopped(self.received, what)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
