"""The speed yardstick's results as a baseline for our benchmarks (``--baseline FILE``).

The yardstick is a plain Llama-style trainer run on the same GPU in the same sitting; it prints one JSON line per
run (``{"cfg": "360m", "B": 16, "T": 2048, "compile": true, "tok_s": ..., "mfu_vs_989T": ..., "mem_GB": ...}``).
Save its output to a file and hand it to ``pretrain.tools.model_bench`` or ``pretrain.tools.bench``: every row they
print then carries ``vs_baseline``, its tokens/s over the baseline run's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from conf.errors import ConfigError


def read_baseline(path: str, batch: Optional[int] = None) -> dict:
    """The baseline run of ``path`` (JSON lines; other lines are skipped): the one at micro-batch ``batch``, or
    the first. ConfigError, one line, when there is none."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--baseline {path}: cannot be read ({e.strerror})") from None
    runs = []
    for number, line in enumerate(lines, 1):
        if not line.lstrip().startswith("{"):
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"--baseline {path}, line {number}: not a JSON object; give the yardstick's "
                              "output as it printed it") from None
        if isinstance(row, dict) and isinstance(row.get("tok_s"), (int, float)):
            runs.append(row)
    if not runs:
        raise ConfigError(f"--baseline {path}: no run with tokens/s (a JSON line with \"tok_s\") in it")
    if batch is None:
        return runs[0]
    for row in runs:
        if row.get("B") == batch:
            return row
    have = ", ".join(str(r.get("B")) for r in runs)
    raise ConfigError(f"--baseline {path}: no run at micro-batch {batch} (it has {have}); pick one with "
                      "--baseline-batch")


def describe(row: dict) -> str:
    return (f"baseline {row.get('cfg', '?')} micro-batch {row.get('B', '?')} x {row.get('T', '?')} "
            f"{'compiled' if row.get('compile') else 'eager'}: {row['tok_s']:,.0f} tokens/s, "
            f"peak {row.get('mem_GB', '?')} GB")


def ratio(tokens_per_s: Optional[float], row: Optional[dict]) -> Optional[float]:
    if row is None or not tokens_per_s:
        return None
    return round(tokens_per_s / row["tok_s"], 3)
