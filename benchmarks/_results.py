"""Benchmark result rows: printed as one JSON line each, and appended to a JSONL file when one is given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(row: dict[str, Any], path: Path | None) -> None:
    line = json.dumps(row)
    print(line, flush=True)
    if path:
        with path.open("a") as f:
            f.write(line + "\n")
