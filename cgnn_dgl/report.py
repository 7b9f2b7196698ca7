"""Plain-text tables and progress bars shared by every command (stdout stays grep-friendly)."""
from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterable, Sequence


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (and optionally its finished children), in MiB."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if children:
        rss = max(rss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return rss / 1024.0


def format_table(rows: Sequence[Sequence], header: Sequence[str] | None = None) -> str:
    cells = [[_fmt(c) for c in row] for row in ([header] if header else []) + list(rows)]
    if not cells:
        return ""
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(max(len(r) for r in cells))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if header and k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(title: str, rows: Iterable[Sequence], header: Sequence[str] | None = None, file=None) -> None:
    file = file or sys.stdout
    print(f"\n{title}", file=file)
    print(format_table(list(rows), header), file=file, flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "", 1).replace("-", "", 1).replace("e", "", 1).isdigit()


_PROGRESS_OFF = False  # set by ``--no-progress`` (any command) or $CGNN_NO_PROGRESS


def disable_progress(off: bool = True) -> None:
    """Turn every progress bar of this process off (``cgnn ... --no-progress``)."""
    global _PROGRESS_OFF
    _PROGRESS_OFF = off


def progress(iterable=None, *, total=None, desc: str = "", unit: str = "it", disable: bool | None = None):
    """tqdm on stderr, silent when stderr is not a terminal unless asked (keeps CI logs short)."""
    from tqdm.auto import tqdm

    if _PROGRESS_OFF or os.environ.get("CGNN_NO_PROGRESS", "") not in ("", "0"):
        disable = True
    elif disable is None:
        disable = not sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1)
