"""A training run's log: JSON lines in log.jsonl and, where the `tensorboard` package is installed (the
`tensorboard` extra), the same records as TensorBoard scalars in an event file beside it.

A resumed run opens a new event file whose first events tell TensorBoard to drop the records of steps past the
checkpoint it resumed from (those a killed run logged before it was stopped), so TensorBoard shows each step once;
log.jsonl keeps every record, as written. TensorBoard reads a folder's event files in name order, whose first
field is the second the file was made in, so a new file is made in a later second than the folder's others.
"""
from __future__ import annotations

import importlib.util
import json
import numbers
import time
from pathlib import Path
from typing import Any


class RunLog:
    """Appends records {"step": int, key: value, ...} to `path` (a JSON line each) and their numeric values (bools
    excepted) as scalars tagged by key at global_step=record["step"] to an event file in path's folder.

    Nothing is written before the first record: it makes the folder and, when tensorboard is importable, the event
    file. resumed_from: the step of the checkpoint the run resumed from (0 for a fresh run).
    """

    def __init__(self, path: str | Path, resumed_from: int = 0) -> None:
        self.path = Path(path)
        self.resumed_from = resumed_from
        self.tensorboard = importlib.util.find_spec("tensorboard") is not None
        self._writer: Any = None

    def append(self, record: dict[str, Any]) -> None:
        """Write `record` to log.jsonl and, where tensorboard is installed, its numeric values to the event file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if not self.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            _wait_for_a_later_second(self.path.parent)
            self._writer = SummaryWriter(self.path.parent, purge_step=self.resumed_from + 1)
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, global_step=record["step"])

    def flush(self) -> None:
        """Write the pending scalars to the event file (log.jsonl is written at once)."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flush and close the event file."""
        if self._writer is not None:
            self._writer.close()


def _wait_for_a_later_second(folder: Path) -> None:
    """Sleep until time.time() is in a later second than the creation second in the names of folder's event files
    (events.out.tfevents.SECONDS.host.pid.n)."""
    names = (p.name.split(".") for p in folder.glob("events.out.tfevents.*"))
    newest = max((int(parts[3]) for parts in names if len(parts) > 3 and parts[3].isdigit()), default=-1)
    while (now := time.time()) < newest + 1:
        time.sleep(newest + 1 - now)
