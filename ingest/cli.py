"""``cgnn ingest`` and ``cgnn db init|synth``.

The database URL comes from ``--db`` or ``$CGNN_DB_URL`` (no silent default); a bare path means an
SQLite file; ``$CGNN_DB_PASSWORD`` supplies the password of a URL that names a user without one.
The password is never printed: every message shows the URL with ``***``.
"""
from __future__ import annotations

import argparse
import os
from contextlib import contextmanager

from cgnn_dgl.errors import CgnnError, UsageError
from cgnn_dgl.errors import positive_int as _positive

DB_HELP = ("database URL, e.g. mysql+pymysql://reader@127.0.0.1:3306/qmdb or sqlite:///demo/oqmd.sqlite "
           "(a bare path is an SQLite file); default $CGNN_DB_URL. Put the password in $CGNN_DB_PASSWORD "
           "rather than in the URL")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1]")
    return v


def _cmd_ingest(args) -> int:
    from cgnn_dgl.pipeline import coordinator_params
    from cgnn_dgl.report import print_table
    from ingest.db import resolve_url, safe_url
    from ingest.run import parse_elements, parse_shard, run_ingest

    url = resolve_url(args.db)
    shard = parse_shard(args.shard)
    elements = parse_elements(args.elements)
    if args.min_id is not None and args.max_id is not None and args.min_id > args.max_id:
        raise UsageError("--min-id is larger than --max-id")
    params = coordinator_params(args)
    print(f"ingest {safe_url(url)} -> {args.out}  (selection {args.selection}, shard {shard[0]}/{shard[1]}, "
          f"{args.workers} worker{'s' if args.workers != 1 else ''})", flush=True)
    summary = run_ingest(url, args.out, selection=args.selection, workers=args.workers, shard_size=args.shard_size,
                         shard=shard, elements=elements, min_id=args.min_id, max_id=args.max_id,
                         batch_size=args.batch_size, limit=args.limit, params=params,
                         progress=False if args.no_progress else None, overwrite=args.overwrite)
    print_table(f"ingest summary: {args.out}", summary.rows())
    if summary.total_rejects:
        print(f"rejects (entry id, reason, message): {os.path.join(args.out, 'rejects.csv')}")
    print(f"per-entry provenance and volume_deviation: {os.path.join(args.out, 'ingest_flags.csv')}")
    return 0


@contextmanager
def _database(db_arg):
    """(engine, url) for a ``db`` command; any driver error becomes one CgnnError line (password hidden)."""
    from ingest.db import describe_error, make_engine, resolve_url

    url = resolve_url(db_arg)
    engine = make_engine(url, must_exist=False)
    try:
        yield engine, url
    except CgnnError:
        raise
    except Exception as exc:
        raise CgnnError(describe_error(exc, url)) from None
    finally:
        engine.dispose()


def _cmd_db_init(args) -> int:
    from ingest.db import create_schema, safe_url

    with _database(args.db) as (engine, url):
        info = create_schema(engine)
    print(f"{safe_url(url)}: OQMD schema ready ({info['tables']} tables, {info['elements_seeded']} elements seeded)")
    return 0


def _cmd_db_synth(args) -> int:
    from cgnn_dgl.report import print_table, progress
    from ingest.db import safe_url
    from ingest.synth import synthesize

    bar = progress(total=args.entries, desc="synthetic entries", unit="entry")
    last = [0]

    def tick(done):
        bar.update(done - last[0])
        last[0] = done

    try:
        with _database(args.db) as (engine, url):
            st = synthesize(engine, args.entries, seed=args.seed, bad_fraction=args.bad_fraction, progress=tick)
    finally:
        bar.close()
    rows = [("SYNTHETIC entries (not OQMD data)", st.entries),
            ("entry ids", f"{st.first_entry_id}..{st.last_entry_id}"),
            ("duplicates", st.duplicates), ("structures", st.structures), ("atoms", st.atoms),
            ("mean atoms per structure", round(st.mean_atoms, 2)), ("calculations", st.calculations),
            ("formation energies", st.formation_energies), ("seconds", round(st.seconds, 2)),
            ("entries/s", round(st.entries / st.seconds, 1) if st.seconds else "-")]
    rows += [(f"  bad rows: {k}", v) for k, v in st.bad.items()]
    print_table(f"synthetic OQMD-shaped data in {safe_url(url)} (seed {args.seed}; "
                f"entries.path '/synthetic/{args.seed}/<id>')", rows)
    return 0


def register(sub) -> None:
    from cgnn_dgl.cache import DEFAULT_SHARD_SIZE
    from cgnn_dgl.pipeline import add_coordinator_args

    p = sub.add_parser(
        "ingest", help="read OQMD from MySQL/MariaDB/SQLite into a graph cache",
        description="Read the OQMD database with SQLAlchemy and build the CGNN graph cache. Resumable: run the "
                    "same command again after an interruption. Bad rows are skipped and listed in "
                    "CACHE/rejects.csv. Selection 'reference' (default) reproduces the reference CGNN extraction "
                    "(duplicate groups pooled, static before standard, converged, lowest delta_e, any fit, a group "
                    "needs some delta_e < 5, NULL band gap/magmom -> 0); 'canonical' uses fit='standard' on "
                    "canonical entries only (NULL band gap -> missing label).")
    p.add_argument("--db", metavar="URL", help=DB_HELP)
    p.add_argument("--out", required=True, metavar="CACHE", help="cache folder (created, or resumed)")
    p.add_argument("--workers", type=_positive, default=max(1, os.cpu_count() or 1),
                   help="graph-building processes (default: all cores)")
    p.add_argument("--selection", choices=("reference", "canonical"), default="reference",
                   help="which calculation represents an entry: the reference CGNN's rule or the standard-fit "
                        "query of the OQMD docs (default: reference)")
    p.add_argument("--shard", metavar="i/N", help="take only entries with id %% N == i (for N machines; join the "
                                                   "caches with `cgnn cache merge`)")
    p.add_argument("--elements", metavar="Fe,O", help="only materials made of these elements (all atoms in the list)")
    p.add_argument("--min-id", type=int, help="smallest (canonical) entry id")
    p.add_argument("--max-id", type=int, help="largest (canonical) entry id")
    p.add_argument("--batch-size", type=_positive, default=1000, help="entries per database page (default 1000)")
    p.add_argument("--shard-size", type=_positive, default=DEFAULT_SHARD_SIZE,
                   help=f"entries per cache shard (default {DEFAULT_SHARD_SIZE}; a resumed cache keeps its own)")
    p.add_argument("--limit", type=_positive, help="stop when the cache holds this many entries (graphs + rejects)")
    p.add_argument("--overwrite", action="store_true", help="discard an existing cache at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_coordinator_args(p)
    p.set_defaults(func=_cmd_ingest)

    db = sub.add_parser("db", help="create an OQMD-schema database or fill it with synthetic data",
                        description="Database helpers: `init` creates the OQMD tables (sql/schema.sql on MySQL, "
                                    "the same tables on SQLite) and the elements rows; `synth` adds SYNTHETIC "
                                    "OQMD-shaped entries for demos and benchmarks.")
    dsub = db.add_subparsers(dest="db_command", metavar="ACTION", parser_class=type(p))
    dsub.required = True
    pi = dsub.add_parser("init", help="create the OQMD tables and the elements seed (idempotent)")
    pi.add_argument("--db", metavar="URL", help=DB_HELP)
    pi.set_defaults(func=_cmd_db_init)
    ps = dsub.add_parser("synth", help="append SYNTHETIC OQMD-shaped entries (creates the tables if needed)")
    ps.add_argument("--db", metavar="URL", help=DB_HELP)
    ps.add_argument("--entries", type=_positive, required=True, help="number of entries to add")
    ps.add_argument("--seed", type=int, default=0, help="random seed (same seed and database state -> same rows)")
    ps.add_argument("--bad-fraction", type=_fraction, default=0.02,
                    help="fraction of entries given a bad row (no atoms, unknown element, zero volume, NULL "
                         "formation energy, element without radius); default 0.02")
    ps.set_defaults(func=_cmd_db_synth)
