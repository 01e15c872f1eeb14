"""The run's console output, kept as OUT/train.log beside metrics.jsonl.

What train.py prints (the chat format, the data summary, the recipe, warnings, eval lines, the world's report,
errors met mid-run) is what a user reads to know what a run did, and it scrolls away. ConsoleLog copies every
write to stdout and stderr into a log while passing it through unchanged. The run directory exists only once every
input is read and checked (a refused run leaves none), and a refused --resume changes none of its files, so the
lines printed before training starts are buffered and written to train.log when `keep_in` is called (train.py's
loop, once every check has passed); a resumed run appends to it. A log that cannot be written (a full disk)
stops being kept, with one line at the end, and never interrupts the run: the run's own writes say what failed. Progress-bar redraws (writes holding a carriage
return, which is how tqdm redraws its line) are shown but not kept.
"""
from __future__ import annotations

import sys
from pathlib import Path


class _Tee:
    """A text stream that writes through to `stream` and hands every write to `keep`."""

    def __init__(self, stream, keep):
        self.stream, self.keep = stream, keep

    def write(self, text: str) -> int:
        self.keep(text)
        return self.stream.write(text)

    def __getattr__(self, name):  # flush, isatty, encoding, fileno, ...: the stream's own
        return getattr(self.stream, name)


class ConsoleLog:
    """`with ConsoleLog(enabled) as console: ... console.keep_in(out / "train.log") ...`: sys.stdout and
    sys.stderr are copied to the log from the start of the block (buffered until keep_in) to its end."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.buffer, self.file, self.failed, self.path = enabled, [], None, None, None

    def __enter__(self):
        if self.enabled:
            self.saved = sys.stdout, sys.stderr
            sys.stdout, sys.stderr = _Tee(sys.stdout, self._keep), _Tee(sys.stderr, self._keep)
        return self

    def _keep(self, text: str) -> None:
        if "\r" in text or self.failed:  # a progress bar redrawing its line; a log that can no longer be written
            return
        if self.file is None:
            self.buffer.append(text)
        else:
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as error:
            self.failed = f"{self.path}: not kept from here on ({error.strerror or error})"

    def keep_in(self, path: Path) -> None:
        """From now on write to `path` (appending), starting with what was printed so far."""
        if self.enabled and self.file is None and not self.failed:
            self.path = path
            try:
                self.file = open(path, "a", encoding="utf-8")
            except OSError as error:
                self.failed = f"{path}: not kept ({error.strerror or error})"
                return
            self._write("".join(self.buffer))
            self.buffer = []

    def __exit__(self, *exc):
        if self.enabled:
            sys.stdout, sys.stderr = self.saved
            if self.file is not None:
                try:
                    self.file.close()
                except OSError:
                    pass
            if self.failed:
                print(f"train.py: {self.failed}", file=sys.stderr)
        return False
