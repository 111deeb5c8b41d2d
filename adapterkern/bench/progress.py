"""A progress bar over the grid: tqdm when installed, else a one-line bar on stderr."""
from __future__ import annotations

import sys
import time


class _Simple:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.n, self.enabled = max(total, 1), desc, 0, enabled
        self.start = time.perf_counter()
        self.postfix = ""
        self.tty = sys.stderr.isatty()
        self._last_print = 0.0

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw(force=self.n >= self.total)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and not force and now - self._last_print < 5.0:
            return  # a log file gets a line every few seconds, not a flood
        self._last_print = now
        frac = min(self.n / self.total, 1.0)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s {self.postfix}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _Tqdm:
    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 5.0)

    def set_postfix(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str, enabled: bool = True):
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return _Simple(total, desc, enabled)
    return _Tqdm(total, desc, enabled)
