"""Structures -> graphs in parallel, and the `cgnn graphs` command that caches them.

Work is sent to worker processes in chunks (one pickle round trip per chunk, not per crystal), results
come back in input order, and any failure of one structure becomes a :class:`Reject` with a reason,
never an aborted run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from cgnn_dgl import TARGETS
from cgnn_dgl.cache import Built, CacheWriter, Reject, ShardStream
from cgnn_dgl.structures import Crystal, StructureError, read_structure_file


@dataclass
class BuildItem:
    key: int
    source: Crystal | Path | StructureError
    # labels: a mapping name -> value (missing / None / NaN = unlabelled), or an array in the order of the
    # target names the build uses (the cache's; the OQMD four by default)
    targets: Mapping[str, float | None] | np.ndarray | None = None
    flags: dict = field(default_factory=dict)
    # how rejects name this input when not by the crystal's own name: its path as given, or its place in
    # a list (``list.json[3] name``); the graph in the cache keeps the crystal's name
    name: str | None = None


def input_name(item: BuildItem) -> str:
    """The name the user gave the input: ``item.name``, else the file's path (with its extension: ``x.cif``
    and ``x.vasp`` are told apart), else the crystal's name, else the input's position."""
    if item.name:
        return item.name
    src = item.source
    if isinstance(src, Path):
        return str(src)
    if isinstance(src, Crystal) and src.name:
        return src.name
    return f"input #{item.key}"


def _late_reject(item: BuildItem, crystal: Crystal, reason: str, message: str) -> Reject:
    """A reject found after parsing (coordinator, validation): named as the user gave the input, and its
    message too, where it starts with the crystal's short name (a file's stem)."""
    name = input_name(item)
    if crystal.name and name != crystal.name and message.startswith(f"{crystal.name}: "):
        message = f"{name}: {message[len(crystal.name) + 2:]}"
    return Reject(item.key, name, reason, message)


def _prepare(item: BuildItem, target_names: Sequence[str] = TARGETS) -> tuple[Crystal, np.ndarray, np.ndarray] | Reject:
    """Parse and validate one input; failures become a :class:`Reject` with a reason."""
    from cgnn_dgl.graph import target_arrays

    try:
        src = item.source
        if isinstance(src, StructureError):
            raise src
        crystal = read_structure_file(src) if isinstance(src, Path) else src
    except StructureError as exc:
        return Reject(item.key, input_name(item), exc.reason, str(exc))
    except Exception as exc:  # one bad structure never aborts a run
        return Reject(item.key, input_name(item), "error", f"{type(exc).__name__}: {exc}")
    try:
        crystal.validate()
        y, mask = target_arrays(item.targets, target_names)
        return crystal, y, mask
    except StructureError as exc:
        return _late_reject(item, crystal, exc.reason, str(exc))
    except Exception as exc:
        return _late_reject(item, crystal, "error", f"{type(exc).__name__}: {exc}")


def build_chunk(items: list[BuildItem], params, target_names: Sequence[str] = TARGETS) -> list[Built | Reject]:
    """Graphs for a chunk of items; the coordinator runs once, vectorised over the whole chunk."""
    from cgnn_dgl.coordinator import coordinate_many

    prepared = [_prepare(item, target_names) for item in items]
    ok = [k for k, p in enumerate(prepared) if not isinstance(p, Reject)]
    coords = coordinate_many([prepared[k][0] for k in ok], params, errors="return", ratios=True) if ok else []
    out: list[Built | Reject] = list(prepared)  # type: ignore[arg-type]
    for k, res in zip(ok, coords):
        item, (crystal, y, mask) = items[k], prepared[k]
        if isinstance(res, StructureError):
            out[k] = _late_reject(item, crystal, res.reason, str(res))
        elif isinstance(res, Exception):
            out[k] = _late_reject(item, crystal, "error", f"{type(res).__name__}: {res}")
        else:
            counts, nbr, ratio = res
            graph_name = crystal.name or (str(item.source) if isinstance(item.source, Path) else str(item.key))
            out[k] = Built(item.key, graph_name, crystal.numbers.astype(np.int64),
                           np.asarray(counts, np.int64), np.asarray(nbr, np.int64), y, mask, item.flags,
                           ratio=np.asarray(ratio, np.float32))
    return out


def _build_chunk(args) -> list[Built | Reject]:
    return build_chunk(*args)


def _chunks(items: Iterable[BuildItem], size: int) -> Iterator[list[BuildItem]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def build_many(items: Iterable[BuildItem], workers: int = 1, params=None, chunksize: int = 64,
               target_names: Sequence[str] = TARGETS) -> Iterator[Built | Reject]:
    """Coordinate and graph every item, in input order, with ``workers`` processes; labels are laid out
    in the order of ``target_names``."""
    from cgnn_dgl.coordinator import DEFAULT_PARAMS

    params = params or DEFAULT_PARAMS
    names = tuple(target_names)
    chunks = ((chunk, params, names) for chunk in _chunks(items, chunksize))
    if workers <= 1:
        for job in chunks:
            yield from _build_chunk(job)
        return
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool:
        for result in pool.imap(_build_chunk, chunks, chunksize=1):
            yield from result


def build_cache(items: Iterable[BuildItem], writer: CacheWriter, *, workers: int = 1, params=None,
                total: int | None = None, desc: str = "graphs") -> dict:
    """Build the items that no finished shard covers and stream them into the cache."""
    from cgnn_dgl.report import progress

    stream = ShardStream(writer)
    todo = (item for item in items if not writer.covered(item.key))
    t0 = time.perf_counter()
    bar = progress(total=total, desc=desc, unit="struct")
    done_before = sum(s["n_graphs"] + s["n_rejects"] for s in writer.shards)
    bar.update(done_before)
    for result in build_many(todo, workers=workers, params=params, target_names=writer.targets):
        stream.add(result)
        bar.update(1)
        if stream.counts["rejects"]:
            bar.set_postfix(rejects=stream.counts["rejects"], refresh=False)
    stream.flush()
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = {
        "built_now": stream.counts["graphs"],
        "rejected_now": stream.counts["rejects"],
        "rejects_by_reason": dict(Counter(stream.reasons)),
        "seconds": round(elapsed, 3),
        "workers": workers,
    }
    totals = writer.close(summary)
    return {**summary, **{f"total_{k}": v for k, v in totals.items()}}


# --------------------------------------------------------------------------------------------------
# `cgnn graphs`


def _items_from_inputs(inputs, opts=None) -> list[BuildItem]:
    """BuildItems from every input: labelled formats by :mod:`cgnn_dgl.readers`, plain files as before."""
    from cgnn_dgl.readers import read_inputs

    return read_inputs(inputs, opts)


def _cmd_graphs(args) -> int:
    from cgnn_dgl.cache import read_manifest
    from cgnn_dgl.errors import UsageError
    from cgnn_dgl.readers import ReadOptions, n_labelled, parse_names, parse_units, refuse_if_nothing_to_build
    from cgnn_dgl.report import print_table

    targets = parse_names(args.targets, "--targets")
    names = targets or TARGETS
    units = parse_units(args.units, names)
    opts = ReadOptions(targets=targets, structure_column=args.structure_column, id_column=args.id_column,
                       delimiter=args.delimiter)
    try:
        items = _items_from_inputs(args.inputs, opts)
    except (FileNotFoundError, StructureError) as exc:
        raise UsageError(str(exc)) from None
    if not items:
        raise UsageError("no structure files found in the inputs (CIF, POSCAR/CONTCAR, *.vasp, JSON, CSV/TSV, "
                         "extxyz, ASE .db or a folder with id_prop.csv)")
    refuse_if_nothing_to_build(items)
    params = coordinator_params(args)
    source = {"kind": "files", "inputs": [str(Path(p).resolve()) for p in args.inputs], "count": len(items)}
    read = {k: v for k, v in (("structure_column", args.structure_column), ("id_column", args.id_column),
                              ("delimiter", args.delimiter)) if v is not None}
    if read:  # how the inputs were read is part of what the cache holds
        source["read"] = read
    resuming = read_manifest(Path(args.out)) is not None and not args.overwrite
    writer = CacheWriter(args.out, source=source, params=params, shard_size=args.shard_size, overwrite=args.overwrite,
                         targets=names, units=units)
    if resuming:  # only once the cache is known to be of these inputs
        print(f"resuming the cache in {args.out}")
    for shard, reason in writer.invalid:
        print(f"rebuilding {shard['file']} (keys {shard['key_first']}..{shard['key_last']}): {reason}")
    summary = build_cache(items, writer, workers=args.workers, params=params, total=len(items))
    rows = [
        ("inputs", len(items)),
        ("graphs in cache", summary["total_graphs"]),
        ("rejected", summary["total_rejects"]),
        ("built in this run", summary["built_now"]),
        ("seconds", summary["seconds"]),
        ("structures/s", summary["built_now"] / summary["seconds"] if summary["seconds"] else float("nan")),
    ]
    rows += [(f"  rejected: {reason}", n) for reason, n in sorted(summary["rejects_by_reason"].items())]
    if targets is not None:  # a typo'd or empty label column shows here, before any training
        rows += [(f"inputs labelled {t}", n_labelled(items, t)) for t in names]
    print_table(f"graph cache {args.out}", rows)
    if summary["total_rejects"]:
        print(f"rejects listed in {Path(args.out) / 'rejects.csv'}")
    return 0


def add_table_args(g) -> None:
    """``--structure-column``, ``--id-column`` and ``--delimiter``: how tables (CSV/TSV, id_prop.csv) and
    keyed formats name their structures and ids (`cgnn graphs` and `cgnn predict`)."""
    g.add_argument("--structure-column", metavar="COLUMN",
                   help="CSV/TSV column of CIF or POSCAR text or structure-file paths (default: the first of "
                        "structure, cif, poscar, path, file)")
    g.add_argument("--id-column", metavar="COLUMN",
                   help="column (CSV/TSV, id_prop.csv with a header) or key (extxyz info, ASE db key-value pairs, "
                        "JSON records, pymatgen properties) holding each structure's id (default for a CSV: a "
                        "column named id, else <file>-<row>)")
    g.add_argument("--delimiter", help="field delimiter of CSV/TSV/id_prop.csv (default: tab for .tsv, else comma)")


def add_coordinator_args(p) -> None:
    from cgnn_dgl.coordinator import DEFAULT_PARAMS, PRUNINGS

    g = p.add_argument_group("coordinator (defaults are the reference CGNN's)")
    g.add_argument("--radius-factor", type=float, default=DEFAULT_PARAMS.radius_factor,
                   help="scale of the neighbour cutoff (r_i + r_j) * factor_vol (default: %(default)s)")
    g.add_argument("--cc-cutoff", type=float, default=DEFAULT_PARAMS.cc_cutoff,
                   help="2-means centre gap above which the far cluster is pruned (default: %(default)s)")
    g.add_argument("--max-rounds", type=int, default=DEFAULT_PARAMS.max_rounds,
                   help="rounds of 2-means pruning per atom (default: %(default)s)")
    add_overlap_arg(g)
    g.add_argument("--pruning", choices=PRUNINGS, default=DEFAULT_PARAMS.pruning,
                   help="exact: optimal 1-D 2-means (default, fast); kmeans: reproduce the reference's "
                        "scikit-learn KMeans choices bit for bit (about 10x slower)")


def add_overlap_arg(p) -> None:
    from cgnn_dgl.coordinator import OVERLAP_TOLERANCE

    p.add_argument("--overlap-tolerance", type=float, default=OVERLAP_TOLERANCE, metavar="ANGSTROM",
                   help="reject structures with two atoms closer than this, periodic minimum image "
                        "(reason overlapping_atoms; 0 turns the check off; default: %(default)s)")


def coordinator_params(args):
    """CoordinatorParams from the flags of :func:`add_coordinator_args`."""
    from cgnn_dgl.coordinator import CoordinatorParams

    return CoordinatorParams(radius_factor=args.radius_factor, cc_cutoff=args.cc_cutoff,
                             max_rounds=args.max_rounds, pruning=args.pruning,
                             overlap_tolerance=args.overlap_tolerance)


def register(sub) -> None:
    p = sub.add_parser("graphs", help="build a graph cache from CIF/POSCAR files, folders or JSON lists",
                       description="Build a CGNN graph cache. INPUT may be CIF or POSCAR files, folders of them, "
                                   "JSON lists of {name, lattice, numbers, frac[, targets]} or pymatgen Structure "
                                   "dicts, and labelled data: a folder with id_prop.csv, CSV/TSV, extxyz or an ASE "
                                   ".db (labels named by --targets). Bad inputs are skipped and "
                                   "listed in CACHE/rejects.csv; an interrupted build resumes when rerun.")
    from cgnn_dgl.errors import positive_int

    p.add_argument("inputs", nargs="+", metavar="INPUT", help="structure files, folders, or labelled inputs")
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder (a rerun resumes it)")
    p.add_argument("--workers", type=positive_int, default=max(1, (os.cpu_count() or 1)),
                   help="worker processes (default: one per CPU, %(default)s here)")
    p.add_argument("--shard-size", type=positive_int, default=8192,
                   help="crystals per shard file (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing cache at --out")
    g = p.add_argument_group("labelled inputs (see README, 'Your own data: input formats')")
    g.add_argument("--targets", metavar="NAME[,NAME...]",
                   help="label columns/keys to read, in this order (default: the OQMD four, read where present); "
                        "for an id_prop.csv without a header, its value columns in order")
    g.add_argument("--units", metavar="NAME=UNIT[,...]", help="units of the targets, recorded in the manifest (default: the OQMD units for OQMD names, "
                        "else none)")
    add_table_args(g)
    add_coordinator_args(p)
    p.set_defaults(func=_cmd_graphs)
