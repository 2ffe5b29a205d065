"""The progress bar of a long pass over the inputs (tokenizing, or hashing for --dedup): input bytes read, with
an ETA, documents/s and tokens/s, on stderr; and warnings that keep the bar intact."""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional


class Progress:
    """The tqdm bar when asked for (``show``), else nothing but the warnings, through ``log``."""

    def __init__(self, show: bool, total: int, initial: int, log: Callable[[str], None], desc: str = "tokenize"):
        self.bar, self.log, self.t_start, self.t_last = None, log, time.time(), 0.0
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                            desc=desc, dynamic_ncols=True, file=sys.stderr, smoothing=0.1)

    def warn(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(f"warning: {msg}", file=sys.stderr)
        else:
            self.log(f"warning: {msg}")

    def update(self, position: int, docs: int, tokens: Optional[int]) -> None:
        """Bytes of input consumed so far, documents and tokens (None: not counted in this pass)."""
        if self.bar is None:
            return
        self.bar.update(position - self.bar.n)
        now = time.time()
        if now - self.t_last > 0.5:
            el = max(now - self.t_start, 1e-9)
            dps = docs / el
            rate = f"{dps:,.{0 if dps >= 100 else 1}f} docs/s"
            self.bar.set_postfix_str(rate if tokens is None else f"{rate}, {tokens / el:,.0f} tok/s", refresh=False)
            self.t_last = now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
