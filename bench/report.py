"""What every benchmark script ends with: the JSON file and the table printed last."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable


def finish(results: dict, out: str | None, default_name: str, table: Callable[[dict], str]) -> dict:
    """Write ``results`` as JSON (``out`` or bench/out/<default_name>) and print the table last."""
    path = Path(out or Path(__file__).parent / "out" / default_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(table(results))
    return results
