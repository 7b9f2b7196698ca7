"""The GPU data path: mini-batches assembled from flat arrays straight into index tensors, no DGL.

DGL stays the graph and cache layer; this module needs only torch and numpy, so the model can train
where DGL cannot be installed (a CUDA machine with a newer Python, say). A batch is a :class:`FlatBatch`
of plain tensors (atomic numbers, global bond indices, atom -> crystal, labels) cut out of the packed
arrays of a cache (:class:`cgnn_dgl.batching.PackedGraphs` or anything with the same fields) with a few
numpy gathers; it becomes a torch-backend :class:`~cgnn_dgl.graph_ops.GraphIndex` on the device without
a device->host synchronisation (atom counts come from the host).

:class:`FlatLoader` keeps a GPU fed: a background thread assembles batch k+1 (numpy, then pinned
memory on CUDA) while step k runs, and its host->device copy is queued on a side stream with
``non_blocking=True``, so the copy overlaps the current step's kernels. Batches come out in exactly the
order, and with exactly the contents, of the DGL path (``PackedGraphs.batch``); ``tests/test_step.py``
checks that.

:func:`train_step` is one optimisation step (forward under optional bf16 autocast, backward, optional
gradient clipping, optimizer step); :func:`masked_mse` the reference's loss over labelled entries.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from cgnn_dgl.graph_ops import GraphIndex

log = logging.getLogger(__name__)


class FlatArrays(Protocol):
    """What :func:`assemble` needs: the packed layout of :class:`cgnn_dgl.batching.PackedGraphs`."""

    numbers: np.ndarray  # (A,) atomic numbers
    node_ptr: np.ndarray  # (K+1,) offsets into numbers
    bond_src: np.ndarray  # (B,) neighbour atom, local to its crystal
    bond_dst: np.ndarray  # (B,) centre atom, local to its crystal
    edge_ptr: np.ndarray  # (K+1,) offsets into the bonds
    y: np.ndarray  # (K, T)
    y_mask: np.ndarray  # (K, T) bool
    bond_ratio: np.ndarray | None  # (B,) float32 distance / cutoff per bond, or None


def ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for every (s, n), without a Python loop."""
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    run_start = np.repeat(ends - lengths, lengths)  # where each element's own range starts in the output
    return np.repeat(starts, lengths) + (np.arange(total, dtype=np.int64) - run_start)


@dataclass
class FlatBatch:
    """One mini-batch as plain tensors: ``z`` (atoms), ``bond_src``/``bond_dst`` (global atom ids,
    messages flow src -> dst), ``atom_crystal``, ``atom_count`` (float32 per crystal), ``y`` (float32)
    and ``y_mask`` (bool) with the chosen target columns, ``idx`` the crystals' rows in the packed set,
    ``bond_ratio`` the per-bond distance / cutoff where the graphs have it (``model.geometry``)."""

    z: Tensor
    bond_src: Tensor
    bond_dst: Tensor
    atom_crystal: Tensor
    atom_count: Tensor
    y: Tensor
    y_mask: Tensor
    idx: np.ndarray
    bond_ratio: Tensor | None = None

    @property
    def n_atoms(self) -> int:
        return int(self.z.shape[0])

    @property
    def n_crystals(self) -> int:
        return int(self.y.shape[0])

    def _tensors(self) -> tuple[str, ...]:
        names = ("z", "bond_src", "bond_dst", "atom_crystal", "atom_count", "y", "y_mask")
        return names + (("bond_ratio",) if self.bond_ratio is not None else ())

    def _map(self, fn: Callable[[Tensor], Tensor]) -> FlatBatch:
        return FlatBatch(**{k: fn(getattr(self, k)) for k in self._tensors()}, idx=self.idx)

    def pin_memory(self) -> FlatBatch:
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> FlatBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def record_stream(self, stream) -> None:
        """Tell the CUDA caching allocator these tensors are used on ``stream`` (copied on another)."""
        for k in self._tensors():
            getattr(self, k).record_stream(stream)

    def graph_index(self) -> GraphIndex:
        """A torch-backend :class:`GraphIndex` on the batch's device (no host synchronisation)."""
        return GraphIndex(bond_src=self.bond_src, bond_dst=self.bond_dst, atom_crystal=self.atom_crystal,
                          atom_count=self.atom_count, n_atoms=self.n_atoms, n_crystals=self.n_crystals,
                          backend="torch", bond_ratio=self.bond_ratio)

    def tensors(self) -> tuple[Tensor, GraphIndex, Tensor, Tensor]:
        """``(z, gi, y, mask)``, as :func:`cgnn_dgl.train.batch_tensors` gives them on the DGL path."""
        return self.z, self.graph_index(), self.y, self.y_mask

    @classmethod
    def from_arrays(cls, z, bond_src, bond_dst, atom_crystal, y, y_mask, n_crystals: int | None = None,
                    idx: np.ndarray | None = None, bond_ratio=None) -> FlatBatch:
        """From already-batched arrays (global atom ids), e.g. the ``.npz`` batches of ``bench/gpu.py``."""
        atom_crystal = np.asarray(atom_crystal, dtype=np.int64)
        y = np.asarray(y)
        n = int(n_crystals if n_crystals is not None else y.shape[0])
        return cls(
            z=torch.from_numpy(np.asarray(z, dtype=np.int64)),
            bond_src=torch.from_numpy(np.asarray(bond_src, dtype=np.int64)),
            bond_dst=torch.from_numpy(np.asarray(bond_dst, dtype=np.int64)),
            atom_crystal=torch.from_numpy(atom_crystal),
            atom_count=torch.from_numpy(np.bincount(atom_crystal, minlength=n).astype(np.float32)),
            y=torch.from_numpy(np.asarray(y, dtype=np.float32).reshape(n, -1)),
            y_mask=torch.from_numpy(np.asarray(y_mask, dtype=bool).reshape(n, -1)),
            idx=np.arange(n) if idx is None else np.asarray(idx, dtype=np.int64),
            bond_ratio=None if bond_ratio is None else torch.from_numpy(np.asarray(bond_ratio, dtype=np.float32)),
        )


def assemble(arrays: FlatArrays, idx, cols: Sequence[int] | None = None) -> FlatBatch:
    """The crystals ``idx`` of a packed set as one :class:`FlatBatch` on the CPU (``cols``: the target
    columns of ``y``, all by default). Atom and bond order are those of ``PackedGraphs.batch``."""
    idx = np.asarray(idx, dtype=np.int64)
    na = arrays.node_ptr[idx + 1] - arrays.node_ptr[idx]
    nb = arrays.edge_ptr[idx + 1] - arrays.edge_ptr[idx]
    atoms = ranges(arrays.node_ptr[idx], na)
    bonds = ranges(arrays.edge_ptr[idx], nb)
    offset = np.zeros(len(idx), dtype=np.int64)
    np.cumsum(na[:-1], out=offset[1:])
    shift = np.repeat(offset, nb)
    y = arrays.y[idx]
    mask = arrays.y_mask[idx]
    if cols is not None:
        cols = list(cols)
        y, mask = y[:, cols], mask[:, cols]
    ratio = getattr(arrays, "bond_ratio", None)
    return FlatBatch(
        z=torch.from_numpy(arrays.numbers[atoms].astype(np.int64)),
        bond_src=torch.from_numpy(arrays.bond_src[bonds].astype(np.int64) + shift),
        bond_dst=torch.from_numpy(arrays.bond_dst[bonds].astype(np.int64) + shift),
        atom_crystal=torch.from_numpy(np.repeat(np.arange(len(idx), dtype=np.int64), na)),
        atom_count=torch.from_numpy(na.astype(np.float32)),
        y=torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32)),
        y_mask=torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)),
        idx=idx,
        bond_ratio=None if ratio is None else torch.from_numpy(np.ascontiguousarray(ratio[bonds], dtype=np.float32)),
    )


def index_batches(indices, batch_size: int, drop_last: bool = False) -> list[np.ndarray]:
    """Consecutive slices of ``indices`` of ``batch_size`` (the last one shorter unless ``drop_last``)."""
    indices = np.asarray(indices, dtype=np.int64)
    stop = len(indices) - (len(indices) % batch_size if drop_last else 0)
    return [indices[s:s + batch_size] for s in range(0, stop, batch_size)]


_DONE = object()


class FlatLoader:
    """Iterate :class:`FlatBatch` es on ``device`` over ``batches`` (lists of packed-set rows).

    With ``prefetch > 0`` a background thread assembles the next batches (pinned on CUDA) while the
    caller's step runs; on CUDA each batch is copied with ``non_blocking=True`` on a side stream one
    batch ahead, and the compute stream waits for that copy only when the batch is handed out.
    ``wait_s`` sums the time the caller spent waiting for batches (data starvation).
    """

    def __init__(self, arrays: FlatArrays, batches: Sequence[np.ndarray], device: torch.device | str = "cpu",
                 cols: Sequence[int] | None = None, prefetch: int = 2, pin_memory: bool | None = None):
        self.arrays, self.batches, self.cols = arrays, list(batches), cols
        self.device = torch.device(device)
        self.prefetch = int(prefetch)
        cuda = self.device.type == "cuda"
        self.pin = cuda if pin_memory is None else bool(pin_memory and torch.cuda.is_available())
        self.wait_s = 0.0

    def __len__(self) -> int:
        return len(self.batches)

    def _host_batches(self) -> Iterator[FlatBatch]:
        """CPU batches in order, produced by a worker thread ``prefetch`` batches ahead."""
        def make(b: np.ndarray) -> FlatBatch:
            fb = assemble(self.arrays, b, self.cols)
            return fb.pin_memory() if self.pin else fb

        if self.prefetch <= 0:
            for b in self.batches:
                yield make(b)
            return
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work() -> None:
            try:
                for b in self.batches:
                    if stop.is_set():
                        return
                    q.put(make(b))
                q.put(_DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                q.put(exc)

        worker = threading.Thread(target=work, name="cgnn-flat-loader", daemon=True)
        worker.start()
        try:
            while True:
                t0 = time.perf_counter()
                item = q.get()
                self.wait_s += time.perf_counter() - t0
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            with contextlib.suppress(queue.Empty):  # unblock a worker waiting on a full queue
                while True:
                    q.get_nowait()
            worker.join(timeout=5)

    def __iter__(self) -> Iterator[FlatBatch]:
        host = self._host_batches()
        if self.device.type != "cuda":
            for fb in host:
                yield fb.to(self.device) if self.device.type != "cpu" else fb
            return
        copy_stream = torch.cuda.Stream(device=self.device)
        compute = torch.cuda.current_stream(self.device)

        def upload(fb: FlatBatch) -> FlatBatch:
            with torch.cuda.stream(copy_stream):
                return fb.to(self.device, non_blocking=True)

        pending = None
        for fb in host:
            nxt = upload(fb)  # queued on the copy stream; runs while the caller's last step computes
            if pending is not None:
                yield self._handover(pending, compute, copy_stream)
            pending = nxt
        if pending is not None:
            yield self._handover(pending, compute, copy_stream)

    @staticmethod
    def _handover(fb: FlatBatch, compute, copy_stream) -> FlatBatch:
        compute.wait_stream(copy_stream)
        fb.record_stream(compute)
        return fb


# --------------------------------------------------------------------------------------------------
# numerics: autocast, compile, determinism


def autocast(device: torch.device | str, amp: str = "none"):
    """``torch.autocast`` for ``amp="bf16"`` (CPU or CUDA), a no-op context for ``"none"``."""
    if amp == "none":
        return contextlib.nullcontext()
    if amp != "bf16":
        raise ValueError(f"unknown amp mode {amp!r}; expected 'none' or 'bf16'")
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms (``torch.use_deterministic_algorithms``), cuDNN autotuning off, and the
    cuBLAS workspace setting CUDA needs for reproducible matrix products. Cost: ``bench/gpu.py``."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.deterministic = enabled
    if enabled:
        torch.backends.cudnn.benchmark = False


def maybe_compile(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """``torch.compile(module, dynamic=True)`` when asked for and available, else ``module``. Errors
    that only show at the first call are handled by :class:`CompileFallback`."""
    if not enabled:
        return module
    if not hasattr(torch, "compile"):
        log.warning("train.compile: this torch has no torch.compile; running eagerly")
        return module
    try:
        return torch.compile(module, dynamic=True)
    except Exception as exc:  # e.g. an unsupported Python version
        log.warning("train.compile: torch.compile failed (%s); running eagerly", _first_line(exc))
        return module


class CompileFallback:
    """Runs ``fn(net)`` with the compiled module until it fails once, then for good with the eager one."""

    def __init__(self, compiled: torch.nn.Module, eager: torch.nn.Module):
        self.net, self.eager = compiled, eager
        self.failed = compiled is eager

    def __call__(self, fn: Callable[[torch.nn.Module], Any]) -> Any:
        if self.failed:
            return fn(self.eager)
        try:
            return fn(self.net)
        except Exception as exc:
            log.warning("train.compile: the compiled model failed (%s); falling back to eager", _first_line(exc))
            self.failed, self.net = True, self.eager
            return fn(self.eager)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


# --------------------------------------------------------------------------------------------------
# one optimisation step


def masked_mse(reg: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    """Mean over targets of the squared error over the crystals labelled for each target (standardised
    units are the caller's business): the reference's ``MSELoss`` with one fully labelled target."""
    maskf = mask.to(reg.dtype)
    per_target = ((reg - y.to(reg.dtype)) ** 2 * maskf).sum(0) / maskf.sum(0).clamp(min=1.0)
    return per_target.mean()


def train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: FlatBatch,
               loss_fn: Callable[[Tensor, FlatBatch], Tensor] | None = None, amp: str = "none",
               clip_value: float = 0.0) -> Tensor:
    """One step on a device-resident batch: forward (under bf16 autocast with ``amp="bf16"``; the loss
    is taken in float32), backward, optional ``clip_grad_value_``, optimizer step. Returns the detached
    loss (no host synchronisation)."""
    z, gi, _, _ = batch.tensors()
    with autocast(batch.z.device, amp):
        out = net(z, gi)
    reg = out["regression"] if isinstance(out, dict) else out
    reg = reg.float().reshape(batch.n_crystals, -1)
    loss = loss_fn(reg, batch) if loss_fn is not None else masked_mse(reg, batch.y, batch.y_mask)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip_value > 0:
        torch.nn.utils.clip_grad_value_([p for g in opt.param_groups for p in g["params"]], clip_value)
    opt.step()
    return loss.detach()


__all__ = [
    "CompileFallback",
    "FlatArrays",
    "FlatBatch",
    "FlatLoader",
    "assemble",
    "autocast",
    "index_batches",
    "masked_mse",
    "maybe_compile",
    "ranges",
    "set_deterministic",
    "train_step",
]
