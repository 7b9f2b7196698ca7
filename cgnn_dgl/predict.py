"""`cgnn predict`: a trained model (or an official reference state_dict) on your own structures.

Inputs: CIF / POSCAR / CONTCAR / *.vasp files, folders of them (recursively), JSON lists shaped like
``coordinator_dev.json`` ({name, lattice, numbers, frac}), and with ``--db URL`` the entries of an OQMD-style
database (through ``ingest.reader`` when the ingest package provides it). The model is loaded once
(``torch.load(..., weights_only=True)``), graphs are built in parallel and predicted in batches. A bad
input (unreadable file, unknown element, no graph) is listed with its reason on stderr and in
``<out>.rejects.csv``; it never stops the run.

Graphs are built with the coordinator parameters recorded in the checkpoint (those of its training
cache; ``--pruning`` overrides the pruning), never guessed.

Output CSV (LF line endings): ``name``, one column per target of the model named as in training, in its
physical unit, then ``p_<class>`` per classification head (``p_insulator`` / ``p_magnetic`` for the OQMD
preset). Beside it ``<out>.json`` (``p.csv`` -> ``p.json``) records each column's unit, the model file(s)
with sha256, the coordinator parameters, the code version and whether the model learnt synthetic labels. With an
ensemble run folder as ``--model`` (:mod:`cgnn_dgl.ensemble`) each target column is the members' mean
and is followed by ``<target>_std``, the calibrated ensemble standard deviation in the same unit
(mean ± 1.96 std is the 95% interval, calibrated on the validation split).
"""
from __future__ import annotations

import csv
import json
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from cgnn_dgl import checkpoint as ckpt_mod
from cgnn_dgl.errors import UsageError

log = logging.getLogger(__name__)


def supported_mask(packed) -> np.ndarray:
    """Per crystal: True when every atom is one of the model's 89 species."""
    from cgnn_dgl.model.species import SPECIES_Z

    ok_atom = np.isin(packed.numbers.astype(np.int64), np.asarray(SPECIES_Z))
    bad_per_crystal = np.add.reduceat((~ok_atom).astype(np.int64), packed.node_ptr[:-1]) if len(ok_atom) else \
        np.zeros(len(packed), np.int64)
    # reduceat misreads empty crystals; atoms-free crystals are rejected upstream anyway
    bad_per_crystal = np.where(packed.n_atoms > 0, bad_per_crystal, 1)
    return bad_per_crystal == 0


def predict_packed(model, packed, indices=None, batch_size: int = 512, device: str | torch.device = "cpu",
                   backend: str = "auto", progress: bool = False):
    """Physical-unit predictions (n, n_targets) and classification probabilities (n, 2) or None."""
    pred, prob, _ = predict_packed_features(model, packed, indices, batch_size, device, backend, progress, False)
    return pred, prob


@torch.no_grad()
def predict_packed_features(model, packed, indices=None, batch_size: int = 512, device: str | torch.device = "cpu",
                            backend: str = "auto", progress: bool = False, features: bool = True):
    """:func:`predict_packed` plus, with ``features``, the graph features (n, n_graph_feat) float32 of the
    same forward pass (for the latent-distance uncertainty), else None."""
    from cgnn_dgl.batching import iter_batches
    from cgnn_dgl.graph_ops import GraphIndex
    from cgnn_dgl.report import progress as bar
    from cgnn_dgl.train import split_output

    device = torch.device(device)
    indices = np.arange(len(packed)) if indices is None else np.asarray(indices, dtype=np.int64)
    model.eval()
    preds, probs, feats = [], [], []
    pbar = bar(total=len(indices), desc="predict", unit="struct", disable=not progress or None)
    for idx, g in iter_batches(packed, indices, batch_size, shuffle=False):
        gi = GraphIndex.from_graph(g, device, backend=backend)
        z = g.nodes["atom"].data["Z"].to(device)
        out = model.forward_heads(z, gi, features=True) if features else model.forward_heads(z, gi)
        reg, logits = split_output(out)
        if isinstance(out, dict) and "prediction" in out:  # hurdle targets gated by their heads
            reg = out["prediction"]
        reg = reg.reshape(len(idx), -1)
        preds.append(model.to_physical(reg).double().cpu().numpy())
        if logits is not None:
            probs.append(torch.sigmoid(logits).double().cpu().numpy())
        if features:
            feats.append(out["features"].float().cpu().numpy())
        pbar.update(len(idx))
    pbar.close()
    n_t = len(model.config.targets) if hasattr(model, "config") else 1
    pred = np.concatenate(preds) if preds else np.zeros((0, n_t))
    prob = np.concatenate(probs) if probs else None
    feat = (np.concatenate(feats) if feats else np.zeros((0, model.config.n_graph_feat), np.float32)) if features else None
    return pred, prob, feat


def _gather_items(inputs, db: str | None, db_limit: int | None, read_options=None):
    """BuildItems for every input plus early rejects (missing paths, bad JSON rows). ``read_options``
    (:class:`cgnn_dgl.readers.ReadOptions`): how tables name their structure and id columns."""
    from cgnn_dgl.cache import Reject
    from cgnn_dgl.pipeline import BuildItem
    from cgnn_dgl.structures import StructureError, crystals_from_json, expand_inputs

    items, rejects = [], []
    key = 0
    for inp in inputs:
        from cgnn_dgl.readers import READERS, ReadOptions, input_kind, read_inputs

        if Path(inp).exists() and input_kind(Path(inp)) in READERS and Path(inp).suffix.lower() != ".json":
            opts = replace(read_options, labels=False) if read_options else ReadOptions(labels=False)
            for item in read_inputs([inp], opts):  # id_prop folders, CSV/TSV, extxyz, ASE db: named by their ids
                item.key = key
                items.append(item)
                key += 1
            continue
        try:
            paths = expand_inputs([inp])
        except FileNotFoundError as exc:
            rejects.append(Reject(key, str(inp), "not_found", str(exc)))
            key += 1
            continue
        if Path(inp).is_dir() and not paths:
            rejects.append(Reject(key, str(inp), "no_structures", f"{inp}: no CIF/POSCAR/JSON files inside"))
            key += 1
            continue
        for path in paths:
            if path.suffix.lower() == ".json":
                try:
                    for k, obj in enumerate(crystals_from_json(path)):  # rejects name the file and row
                        row = f"{path}[{k}]" + (f" {obj.name}" if getattr(obj, "name", "") else "")
                        items.append(BuildItem(key, obj, name=row))
                        key += 1
                except (StructureError, ValueError, OSError) as exc:
                    rejects.append(Reject(key, str(path), "parse_error", f"{path}: {exc}"))
                    key += 1
            else:
                from cgnn_dgl.readers import cif_block_records

                for rec in cif_block_records(path) or [None]:  # a multi-block CIF: every block
                    items.append(BuildItem(key, path) if rec is None else BuildItem(key, rec.source, name=rec.label))
                    key += 1
    if db:
        try:
            from ingest.db import make_engine, resolve_url
            from ingest.reader import OqmdReader
        except ImportError:
            raise UsageError("--db needs the ingest package (ingest.reader), which is not installed") from None
        engine = make_engine(resolve_url(db))
        try:
            for n, rec in enumerate(OqmdReader(engine)):
                if db_limit and n >= db_limit:
                    break
                if rec.ok:
                    if not rec.crystal.name:
                        rec.crystal.name = rec.name
                    items.append(BuildItem(key, rec.crystal))
                else:
                    rejects.append(Reject(key, rec.name, rec.reason, rec.message))
                key += 1
        finally:
            engine.dispose()
    return items, rejects


def build_inputs(inputs, workers: int = 1, db: str | None = None, db_limit: int | None = None, params=None,
                 read_options=None):
    """(PackedGraphs of the good inputs, list of Reject) for prediction inputs (graphs built with ``params``;
    tables read with ``read_options``)."""
    from cgnn_dgl.batching import PackedGraphs
    from cgnn_dgl.cache import Built, Reject
    from cgnn_dgl.pipeline import build_many, input_name

    items, rejects = _gather_items(inputs, db, db_limit, read_options)
    given = {it.key: input_name(it) for it in items}  # rejects found after the build name the input too
    built = []
    for res in build_many(items, workers=workers, params=params):
        if isinstance(res, Built):
            built.append(res)
        else:
            rejects.append(res)
    packed = PackedGraphs.from_built(built)
    if len(packed):
        ok = supported_mask(packed)
        if not ok.all():
            from cgnn_dgl.model.species import SPECIES_Z

            for i in np.flatnonzero(~ok):
                z = packed.numbers[packed.node_ptr[i]:packed.node_ptr[i + 1]].astype(int)
                bad = sorted(set(z.tolist()) - set(SPECIES_Z))
                key = int(packed.entry_id[i])
                rejects.append(Reject(key, given.get(key, packed.names[i]), "unsupported_element",
                                      f"element(s) Z={bad} outside the model's 89 species"))
            packed = packed.subset(np.flatnonzero(ok))
    rejects.sort(key=lambda r: r.key)
    return packed, rejects


def load_model(path: str | os.PathLike, arch: str | None = None, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, ModelConfig) from a cgnn-dgl checkpoint or a reference state_dict."""
    obj = ckpt_mod.load(path)
    model, config = ckpt_mod.model_from_checkpoint(obj, arch=arch, path=str(path))
    model.to(torch.device(device)).eval()
    model.record = ckpt_mod.record_of(obj)  # tasks, coordinator parameters, synthetic flag (checkpoint.py)
    return model, config


def coordinator_params_for(ckpt: dict):
    """The coordinator settings a checkpoint's graphs were built with (its ``coordinator`` record when it has
    one; the reference KMeans pruning for plain reference state_dicts; the defaults otherwise)."""
    import dataclasses

    from cgnn_dgl.coordinator import DEFAULT_PARAMS, CoordinatorParams

    rec = ckpt.get("coordinator") if isinstance(ckpt, dict) else None
    if isinstance(rec, dict):
        known = {f.name for f in dataclasses.fields(CoordinatorParams)}
        return CoordinatorParams(**{k: v for k, v in rec.items() if k in known})
    if isinstance(ckpt, dict) and ckpt and not ckpt_mod.is_cgnn_checkpoint(ckpt):
        return CoordinatorParams(pruning="kmeans")
    return DEFAULT_PARAMS


def write_predictions(path: Path, names, pred: np.ndarray, targets, prob: np.ndarray | None,
                      std: np.ndarray | None = None, classes=("insulator", "magnetic")) -> None:
    """The predictions CSV (LF line endings): ``name``, a column per target (with ``std`` a ``<target>_std``
    column after each), then ``p_<class>`` per classification head (``classes``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        cols = [c for t in targets for c in ((t, f"{t}_std") if std is not None else (t,))]
        header = ["name"] + cols + ([f"p_{c}" for c in classes] if prob is not None else [])
        w.writerow(header)
        for i, name in enumerate(names):
            if std is None:
                row = [name] + [f"{v:.9g}" for v in pred[i]]
            else:
                row = [name] + [f"{x:.9g}" for v, s in zip(pred[i], std[i]) for x in (v, s)]
            if prob is not None:
                row += [f"{v:.6g}" for v in prob[i]]
            w.writerow(row)


def sidecar_path(out: Path) -> Path:
    """``p.csv`` -> ``p.json``: what explains a predictions CSV."""
    return out.with_suffix(".json") if out.suffix.lower() != ".json" else out.with_name(out.name + ".json")


def gated_columns(model_cfg) -> dict[str, str]:
    """What each ``model.hurdle_targets`` column of the predictions holds (a two-part prediction)."""
    from cgnn_dgl.tasks import OQMD_CLASSES

    head = {c[2]: c[0] for c in OQMD_CLASSES}
    return {t: f"where p_{head[t]} > 0.5, an output trained on {head[t]} crystals only; elsewhere the plain "
               f"regression output (about 0 for the other crystals)" for t in getattr(model_cfg, "hurdle_targets", ())}


def write_sidecar(out: Path, model_path, ens, ckpt: dict, params, n_predicted: int, n_rejected: int) -> Path:
    """``<out>.json`` beside the predictions: its columns with units, the model file(s) with sha256, the
    coordinator parameters the graphs were built with, the code version, and whether the model learnt
    synthetic labels."""
    import time

    from cgnn_dgl import __version__
    from cgnn_dgl.ensemble import first_checkpoint, is_ensemble_dir, read_ensemble_json, std_note
    from cgnn_dgl.fileio import atomic_write_json, sha256_file
    from cgnn_dgl.tasks import UNTRAINED_NOTE, TaskSet, untrained_columns

    rec = ckpt_mod.record_of(ckpt) if ckpt_mod.is_cgnn_checkpoint(ckpt) else {}
    units = dict((rec.get("tasks") or {}).get("units") or {})
    tasks = TaskSet.from_configs(ens.config, units=units)
    model_path = Path(model_path)
    info = read_ensemble_json(model_path) if is_ensemble_dir(model_path) else None
    files = [model_path / m for m in info["members"]] if info else [first_checkpoint(model_path)]
    synthetic = rec.get("synthetic")
    untrained = untrained_columns(rec.get("tasks"))
    doc = {
        "what": "cgnn predict: properties predicted by a CGNN model for the structures named in 'predictions'",
        "predictions": out.name,
        "columns": [{"name": "name", "unit": "", "about": "structure id (file stem, id column or row id)"}]
        + [{"name": c, "unit": u} for c, u in tasks.prediction_columns(std=ens.is_ensemble)],
        "units": dict(tasks.prediction_columns(std=ens.is_ensemble)),
        "targets": list(tasks.names), "classes": list(tasks.class_names),
        "std": std_note(info) if info else None,
        "model": str(model_path), "model_files": [{"path": str(f), "sha256": sha256_file(f)} for f in files],
        "model_sha256": sha256_file(files[0]) if len(files) == 1 else None,
        "coordinator": params.as_dict(),
        "coordinator_from": "checkpoint record" if isinstance(ckpt.get("coordinator"), dict) else
        ("reference KMeans pruning (official state_dict)" if not ckpt_mod.is_cgnn_checkpoint(ckpt) else
         "defaults (checkpoint older than the record)"),
        "code_version": __version__,
        "synthetic": synthetic,
        "labels_note": "the model was trained on SYNTHETIC labels: predictions show the pipeline works, not physics"
        if synthetic else "",
        "gated_columns": gated_columns(ens.config),
        "untrained_columns": untrained,
        "untrained_note": UNTRAINED_NOTE if untrained else "",
        "n_predicted": int(n_predicted), "n_rejected": int(n_rejected),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = sidecar_path(out)
    atomic_write_json(path, doc)
    return path


def write_rejects(path: Path, rejects) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["name", "reason", "message"])
        for r in rejects:
            w.writerow([r.name, r.reason, r.message])


def _cmd_predict(args) -> int:
    from cgnn_dgl.rundir import resolve_device

    if not args.inputs and not args.db:
        raise UsageError("give structure files, folders or JSON lists (or --db URL)")
    from cgnn_dgl.coordinator import CoordinatorParams
    from cgnn_dgl.ensemble import Ensemble, first_checkpoint
    from cgnn_dgl.fileio import output_file

    out = output_file(args.out, "predictions.csv")  # before any model or structure work
    device = resolve_device(args.device)
    ens = Ensemble.load(args.model, device, args.arch)  # once, before any structure work
    config = ens.config
    # graphs are built as the model's training cache built them (its checkpoint's record); official
    # reference weights were trained on graphs pruned by scikit-learn's KMeans: rebuild those
    first = first_checkpoint(args.model)
    raw = ckpt_mod.load(first)
    params = coordinator_params_for(raw)
    if args.pruning != "auto":
        params = CoordinatorParams(**{**params.as_dict(), "pruning": args.pruning})
    params = CoordinatorParams(**{**params.as_dict(), "overlap_tolerance": args.overlap_tolerance})
    from cgnn_dgl.readers import ReadOptions

    table = ReadOptions(structure_column=args.structure_column, id_column=args.id_column, delimiter=args.delimiter)
    packed, rejects = build_inputs(args.inputs, workers=args.workers, db=args.db, db_limit=args.limit, params=params,
                                   read_options=table)
    if len(packed):
        res = ens.predict(packed, batch_size=args.batch_size, device=device, backend=args.backend, progress=True)
        pred, prob, std = res.mean, res.prob, res.std
    else:
        n_t = len(config.targets)
        pred, prob = np.zeros((0, n_t)), None
        std = np.zeros((0, n_t)) if ens.is_ensemble else None
    from cgnn_dgl.tasks import class_names

    write_predictions(out, packed.names, pred, config.targets, prob, std, class_names(config))
    sidecar = write_sidecar(out, args.model, ens, raw, params, n_predicted=len(packed), n_rejected=len(rejects))
    if rejects:
        rej_path = out.with_name(out.stem + ".rejects.csv")
        write_rejects(rej_path, rejects)
        print(f"{len(rejects)} input(s) rejected (listed in {rej_path}):", file=sys.stderr)
        for r in rejects[:20]:
            print(f"  {r.name}: {r.reason}: {r.message}", file=sys.stderr)
        if len(rejects) > 20:
            print(f"  ... and {len(rejects) - 20} more", file=sys.stderr)
    print(f"predicted {len(packed)} structure(s) -> {out} (units, model and settings in {sidecar})"
          + (f"; {len(rejects)} rejected" if rejects else ""))
    doc = json.loads(Path(sidecar).read_text())
    if doc.get("synthetic"):
        print("note: the model was trained on SYNTHETIC labels: predictions show the pipeline works, not physics",
              file=sys.stderr)
    if doc.get("untrained_columns"):
        print(f"note: {', '.join(doc['untrained_columns'])}: {doc['untrained_note']}", file=sys.stderr)
    return 0 if len(packed) else 1


def register(sub) -> None:
    p = sub.add_parser(
        "predict", help="predict properties of CIF/POSCAR files, folders, JSON lists or database entries",
        description="Predict with a trained cgnn-dgl checkpoint (RUN/best.pt) or an official reference "
                    "state_dict (give --arch). Bad inputs are listed with reasons and skipped.")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="CIF/POSCAR files, folders, JSON lists")
    p.add_argument("--model", required=True, metavar="CKPT",
                   help="best.pt of a run (or the run folder), an ensemble run folder (train.ensemble > 1: "
                        "writes <target>_std columns), or a reference model.pth")
    p.add_argument("--out", required=True, metavar="CSV",
                   help="predictions CSV, or an existing folder to write predictions.csv in (rejects go "
                        "next to it as <name>.rejects.csv)")
    p.add_argument("--arch", choices=["benchmark", "no_edgenet", "complete"],
                   help="preset of a plain reference state_dict (official CGNN checkpoints)")
    p.add_argument("--db", metavar="URL", help="also predict the entries of this database (needs ingest.reader)")
    from cgnn_dgl.errors import positive_int

    p.add_argument("--limit", type=positive_int, default=None, help="at most this many database entries")
    p.add_argument("--batch-size", type=positive_int, default=512, help="structures per forward pass (default 512)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")
    p.add_argument("--backend", default="auto", choices=["auto", "dgl", "torch"],
                   help="graph-ops backend (default auto: DGL's kernels where the installed DGL supports the device, else plain torch)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes building graphs (default 1)")
    p.add_argument("--pruning", default="auto", choices=["auto", "exact", "kmeans"],
                   help="neighbour pruning of the graphs (default auto): auto = kmeans (the reference's KMeans choices) with "
                        "--arch reference weights, else exact (use the pruning the model's cache was built with)")
    from cgnn_dgl.pipeline import add_table_args

    add_table_args(p.add_argument_group("table inputs (CSV/TSV, extxyz, ASE db; as for `cgnn graphs`)"))
    from cgnn_dgl.pipeline import add_overlap_arg

    add_overlap_arg(p)
    p.set_defaults(func=_cmd_predict)
