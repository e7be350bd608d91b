"""The output file of a batch job: what it already holds (resumption) and crash-safe appends.

Input: the output path (it may hold lines from an earlier, interrupted run of the same job).
Output: ``OutputFile.done_ids`` / ``done_lines`` (what a rerun skips) and ``append``.
Errors: ``BatchOutputError`` when a complete line of the file is not an output line (the file is
not this job's output, or was edited): nothing is guessed and nothing is overwritten.

Each line goes out as one ``write`` of the whole line followed by ``fsync``, so a crash or a
killed process leaves whole lines plus, at worst, one partial last line (a write cut short by
the crash). Opening the file again finds such a partial line (the file does not end with a
newline) and cuts it off: that request was not answered and runs again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_TAIL_CHUNK = 64 * 1024


class BatchOutputError(ValueError):
    """The output file holds something that is not a batch output line."""


class OutputFile:
    """An output JSONL opened for appending, with the custom_ids it already answers."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.truncated_bytes = 0  # a partial last line cut off at open
        self.done_ids: set[str] = set()
        self.done_lines: set[int] = set()  # input lines without a custom_id, already reported
        self.lines = 0
        if self.path.is_dir():
            raise BatchOutputError(f"the output {self.path} is a directory; give a file path")
        if self.path.exists():
            self.truncated_bytes = _cut_partial_line(self.path)
            self._read_done()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _read_done(self) -> None:
        with open(self.path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                    custom_id = record["custom_id"]
                    error = record.get("error") or {}
                except (ValueError, TypeError, KeyError, AttributeError):
                    raise BatchOutputError(
                        f"{self.path} line {number} is not a batch output line; "
                        "give another output file (this one is left as it is)"
                    ) from None
                if isinstance(custom_id, str):
                    self.done_ids.add(custom_id)
                elif isinstance(error.get("line"), int):
                    self.done_lines.add(error["line"])
                self.lines += 1

    def append(self, record: dict[str, Any]) -> None:
        """Write one line in one ``write`` call and make it durable before returning."""
        data = (json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:  # a regular file takes it all at once; a short write only when the disk fills
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)
        self.lines += 1

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> OutputFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _cut_partial_line(path: Path) -> int:
    """Truncate the file after its last newline; return how many bytes went."""
    with open(path, "r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - _TAIL_CHUNK)
            handle.seek(start)
            chunk = handle.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return 0
            newline = chunk.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        handle.truncate(keep)
        handle.flush()
        os.fsync(handle.fileno())
        return size - keep
