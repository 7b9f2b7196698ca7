"""``run_ingest``: OQMD database -> graph cache, restartable, in parallel, on one of N machines.

Flow: :class:`ingest.reader.OqmdReader` pages through the selected materials in key order (the main
process), :func:`cgnn_dgl.pipeline.build_many` coordinates and builds graphs in ``workers`` processes
(results in input order), and :class:`cgnn_dgl.cache.ShardStream` cuts the ordered stream into shards
of ``shard_size`` materials (graphs + rejects) that :class:`cgnn_dgl.cache.CacheWriter` writes
atomically.

Why a resumed cache equals a clean one: a shard is always the next ``shard_size`` selected materials
after the previous shard's last key, so its boundaries depend only on the data, never on when a run
stopped. On restart the writer reports the last key of the finished shards (``resume_key``) and
reading restarts right after it; a shard that was being written when the run died never entered the
manifest and is simply redone. Shards dropped as corrupt (``writer.gaps``) are re-read by key range.

Per-material provenance that the graph file does not hold (calculation and formation-energy ids, the
NULL flags, ``volume_deviation``) goes to ``CACHE/ingest/flags-<first>-<last>.jsonl`` next to each
shard (written before the shard, named by its key range, so it is the same after a resume), and is
consolidated into ``CACHE/ingest_flags.csv`` at the end. Rejects are in the shard sidecars and
``CACHE/rejects.csv`` (key, name, reason, message), one line per entry even after resumes.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cgnn_dgl.errors import CgnnError, UsageError
from cgnn_dgl.fileio import atomic_open, atomic_write_text
from ingest.db import make_engine, require_tables, resolve_url, safe_url
from ingest.reader import OqmdReader, Record
from ingest.select import QUERY_VERSION, SELECTIONS, Filters

log = logging.getLogger(__name__)

FLAG_COLUMNS = ("key", "name", "entry_id", "calculation_id", "formationenergy_id", "calc_label", "fit",
                "band_gap_null", "magmom_null", "atomic_volume_per_atom", "volume_deviation", "synthetic")


# Why a key of the key column is not a material (the selection rule, ingest/select.py); such keys are
# counted, not written as rejects: they are not in the selection, like the reference's extraction.
NOT_SELECTED_WHY = {
    "reference": "entry groups without a converged static/standard calculation with delta_e < 5",
    "canonical": "duplicates, and entries without a converged static/standard calculation with a "
                 "standard-fit formation energy",
}


@dataclass
class IngestSummary:
    entries_read: int = 0
    graphs_written: int = 0
    rejects: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    resumed_after: int | None = None
    already_done: int = 0
    db_retries: int = 0
    window_functions: bool | None = None
    total_graphs: int = 0
    total_rejects: int = 0
    not_selected: int = 0
    selection: str = "reference"

    @property
    def rate(self) -> float:
        return self.entries_read / self.seconds if self.seconds > 0 else float("nan")

    def as_dict(self) -> dict:
        return {"entries_read": self.entries_read, "graphs_written": self.graphs_written,
                "rejects_by_reason": dict(sorted(self.rejects.items())), "seconds": round(self.seconds, 3),
                "entries_per_s": None if math.isnan(self.rate) else round(self.rate, 1),
                "resumed_after": self.resumed_after, "db_retries": self.db_retries,
                "not_selected": self.not_selected, "not_selected_why": NOT_SELECTED_WHY[self.selection],
                "window_functions": self.window_functions}

    def rows(self) -> list[tuple]:
        rows = [("entries read (this run)", self.entries_read), ("graphs written (this run)", self.graphs_written),
                ("rejected (this run)", sum(self.rejects.values()))]
        rows += [(f"  rejected: {reason}", n) for reason, n in sorted(self.rejects.items())]
        if self.not_selected:
            rows.append((f"not selected ({NOT_SELECTED_WHY[self.selection]})", self.not_selected))
        rows += [("seconds", round(self.seconds, 2)), ("entries/s", round(self.rate, 1) if self.seconds else "-")]
        if self.resumed_after is not None:
            rows.append(("resumed after entry", self.resumed_after))
            rows.append(("already in cache", self.already_done))
        if self.db_retries:
            rows.append(("database retries", self.db_retries))
        rows += [("graphs in cache", self.total_graphs), ("rejects in cache", self.total_rejects)]
        return rows


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` -> (i, N) with 0 <= i < N."""
    if not text:
        return 0, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard {text!r}: expected i/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"--shard {text!r}: need 0 <= i < N")
    return i, n


def parse_elements(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    from pymatgen.core.periodic_table import Element

    out = []
    for tok in text.replace(" ", "").split(","):
        if not tok:
            continue
        sym = tok[0].upper() + tok[1:].lower()
        try:
            Element(sym)
        except Exception:
            raise UsageError(f"--elements: {tok!r} is not an element symbol") from None
        out.append(sym)
    if not out:
        raise UsageError("--elements: no element symbols given")
    return tuple(sorted(set(out)))


class _FlagWriter:
    """Writes ``ingest/flags-<first>-<last>.jsonl`` for a shard just before the shard itself."""

    def __init__(self, root: Path):
        self.dir = root / "ingest"
        self.pending: list[dict] = []

    def add(self, rec: Record) -> None:
        if rec.ok:
            row = {"key": rec.key, "name": rec.name}
            row.update({k: rec.flags.get(k) for k in FLAG_COLUMNS[2:]})
            for k in ("atomic_volume_per_atom", "volume_deviation"):
                if isinstance(row[k], float) and not math.isfinite(row[k]):
                    row[k] = None
            self.pending.append(row)

    def flush(self, key_first: int, key_last: int) -> None:
        rows = [r for r in self.pending if key_first <= r["key"] <= key_last]
        self.pending = [r for r in self.pending if r["key"] > key_last]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
        atomic_write_text(self.dir / f"flags-{key_first}-{key_last}.jsonl", text)

    def consolidate(self, shards: list[dict], out: Path) -> Path:
        ranges = {(s["key_first"], s["key_last"]) for s in shards}
        if self.dir.exists():
            for f in self.dir.glob("flags-*.jsonl"):
                a, b = (int(x) for x in f.stem.split("-")[1:3])
                if (a, b) not in ranges:
                    f.unlink()  # left by a shard that never made it into the manifest
        with atomic_open(out, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(FLAG_COLUMNS)
            for a, b in sorted(ranges):
                p = self.dir / f"flags-{a}-{b}.jsonl"
                if not p.exists():
                    continue
                for line in p.read_text().splitlines():
                    row = json.loads(line)
                    w.writerow(["" if row.get(k) is None else row.get(k) for k in FLAG_COLUMNS])
        return out


def _make_stream(writer, flags: _FlagWriter):
    """A :class:`cgnn_dgl.cache.ShardStream` that writes the flags sidecar of a shard just before it."""
    from cgnn_dgl.cache import ShardStream

    class _Stream(ShardStream):
        def flush(self, key_last: int | None = None) -> None:
            if self.first is not None:
                flags.flush(self.first, max(self.last, key_last or self.last))
            super().flush(key_last)

    stream = _Stream(writer)
    stream.flags = flags
    return stream


def _build(records: Iterator[Record], stream, summary: IngestSummary, *, workers: int, params,
           bar=None) -> None:
    """Records (key order) -> graphs in worker processes -> shards, keeping reader rejects in key order.

    Reader rejects never go to the workers; they wait in ``pending`` and are emitted just before the
    first built result that follows them, so the stream reaching the shards is in key order.
    """
    from cgnn_dgl.cache import Reject
    from cgnn_dgl.pipeline import BuildItem, build_many

    pending: deque = deque()  # in read order: an int key (sent to the workers) or a reject Record

    def items():
        for rec in records:
            summary.entries_read += 1
            stream.flags.add(rec)
            if rec.ok:
                pending.append(rec.key)
                yield BuildItem(rec.key, rec.crystal, rec.targets, rec.flags)
            else:
                pending.append(rec)

    def emit(res) -> None:
        if isinstance(res, Reject):
            summary.rejects[res.reason] += 1
        else:
            summary.graphs_written += 1
        stream.add(res)
        if bar is not None:
            bar.update(1)
            n_rej = sum(summary.rejects.values())
            if n_rej:
                bar.set_postfix(rejects=n_rej, refresh=False)

    def emit_waiting_rejects() -> None:
        while pending and not isinstance(pending[0], int):
            rec = pending.popleft()
            emit(Reject(rec.key, rec.name, rec.reason, rec.message))

    for res in build_many(items(), workers=workers, params=params):
        emit_waiting_rejects()
        key = pending.popleft()
        if key != res.key:  # build_many keeps input order; anything else is a bug worth stopping for
            raise RuntimeError(f"graph results out of order: {res.key} where {key} was expected")
        emit(res)
    emit_waiting_rejects()


def _limited(records: Iterator[Record], n: int | None) -> Iterator[Record]:
    if n is None:
        yield from records
        return
    for k, rec in enumerate(records):
        if k >= n:
            return
        yield rec


def run_ingest(db_url, cache_dir, *, selection: str = "reference", workers: int = 1,
               shard_size: int | None = None, shard: tuple[int, int] = (0, 1), elements=None,
               min_id: int | None = None, max_id: int | None = None, batch_size: int = 1000,
               limit: int | None = None, params=None, progress: bool | None = None, window: bool | None = None,
               overwrite: bool = False) -> IngestSummary:
    """Read the selected OQMD materials of ``db_url`` into the graph cache at ``cache_dir``.

    Re-running the same call resumes an interrupted run. ``limit`` caps the total number of materials
    in the cache (graphs + rejects), counting those of earlier runs.
    """
    from cgnn_dgl.cache import DEFAULT_SHARD_SIZE, CacheWriter
    from cgnn_dgl.coordinator import DEFAULT_PARAMS
    from cgnn_dgl.report import progress as progress_bar

    if selection not in SELECTIONS:
        raise UsageError(f"--selection {selection!r}: expected one of {', '.join(SELECTIONS)}")
    if batch_size < 1 or (shard_size is not None and shard_size < 1) or workers < 1:
        raise UsageError("--batch-size, --shard-size and --workers must be >= 1")
    url = resolve_url(db_url) if not hasattr(db_url, "drivername") else db_url
    if isinstance(elements, str):
        elements = parse_elements(elements)
    filters = Filters(elements=tuple(elements) if elements else None, min_id=min_id, max_id=max_id,
                      shard=tuple(shard))
    params = params or DEFAULT_PARAMS
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            require_tables(conn, url)
    except CgnnError:
        engine.dispose()
        raise
    except Exception as exc:
        engine.dispose()
        from ingest.db import describe_error

        raise CgnnError(describe_error(exc, url)) from None

    source = {"kind": "oqmd-db", "db": safe_url(url), "selection": selection,
              "query_version": QUERY_VERSION[selection], "filters": filters.as_dict()}
    root = Path(cache_dir)
    writer = CacheWriter(root, source=source, params=params, shard_size=shard_size or DEFAULT_SHARD_SIZE,
                         overwrite=overwrite)
    flags = _FlagWriter(root)
    stream = _make_stream(writer, flags)
    summary = IngestSummary(selection=selection)
    summary.resumed_after = writer.resume_key
    summary.already_done = sum(s["n_graphs"] + s["n_rejects"] for s in writer.shards)
    reader = OqmdReader(engine, selection=selection, filters=filters, batch_size=batch_size, window=window)
    remaining = None if limit is None else max(0, limit - summary.already_done)
    t0 = time.perf_counter()
    bar = None
    try:
        # 1. key ranges of shards dropped as corrupt/stale, re-read exactly
        for a, b in writer.gaps:
            gap_reader = OqmdReader(engine, selection=selection, batch_size=batch_size, window=window,
                                    filters=Filters(elements=filters.elements, shard=filters.shard,
                                                    min_id=max(a, min_id or a), max_id=min(b, max_id or b)))
            log.info("re-reading entries %d..%d for the dropped shard", a, b)
            _build(gap_reader.records(after=a - 1), stream, summary, workers=workers, params=params)
            stream.flush()
            summary.db_retries += gap_reader.retried
            summary.not_selected += gap_reader.not_selected
        # 2. everything after the last finished shard
        after = writer.resume_key
        if remaining != 0:
            show = sys.stderr.isatty() if progress is None else bool(progress)
            total = reader.count(after=after) if show else None  # the count is one more scan: only for the bar
            if remaining is not None and total is not None:
                total = min(total, remaining)
            bar = progress_bar(total=total, desc=f"ingest {selection}", unit="entry", disable=not show)
            _build(_limited(reader.records(after=after), remaining), stream, summary, workers=workers,
                   params=params, bar=bar)
            stream.flush()
    finally:
        if bar is not None:
            bar.close()
        summary.seconds = time.perf_counter() - t0
        summary.db_retries += reader.retried
        summary.not_selected += reader.not_selected
        summary.window_functions = reader.window
        engine.dispose()
    totals = writer.close(summary.as_dict())
    flags.consolidate(writer.shards, root / "ingest_flags.csv")
    summary.total_graphs, summary.total_rejects = totals["graphs"], totals["rejects"]
    return summary

