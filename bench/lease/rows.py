"""Measured rows of the lease check: one JSON object per line, appended and flushed to disk the moment a row is
measured, so that a process killed by its deadline keeps every row it had measured."""
from __future__ import annotations

import json
import os
import time
import traceback
from typing import Callable, Dict, Iterable, Optional


def rows_path() -> Optional[str]:
    """The rows file (``LEASE_ROWS``), or None when rows are only printed."""
    return os.environ.get("LEASE_ROWS") or None


def write_row(step: str, row: Dict[str, object], path: Optional[str] = None) -> Dict[str, object]:
    """Append ``row`` (tagged with ``step`` and the time) to the rows file and print it; returns the stored row."""
    out = {"step": step, "time": time.strftime("%H:%M:%S"), **row}
    line = json.dumps(out, default=str)
    print(f"row: {line}", flush=True)
    path = path or rows_path()
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    stall = os.environ.get("LEASE_TEST_STALL")
    if stall and stall == os.environ.get("LEASE_STEP"):  # tests of the deadline: wait here until killed
        print(f"LEASE_TEST_STALL={stall}: waiting for the time limit", flush=True)
        while True:
            time.sleep(60)
    return out


def read_rows(path: str):
    """Every complete row of a rows file (a line cut by a kill is skipped)."""
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def run_each(items: Iterable[str], run_one: Callable[[str], None], on_cuda: bool) -> int:
    """Runs ``run_one(item)`` for every item; an item that raises becomes a row with its error (its traceback goes to
    stderr) and the next item still runs. Frees the CUDA cache after each item when ``on_cuda``. Returns 1 when an
    item failed, else 0."""
    status = 0
    for item in items:
        try:
            run_one(item)
        except Exception as exc:  # noqa: BLE001 - the next item still runs
            status = 1
            write_row(item, {"item": item, "error": f"{type(exc).__name__}: {exc}"[:500]})
            traceback.print_exc()
        if on_cuda:
            import torch
            torch.cuda.empty_cache()
    return status
