"""`cgnn train`: one CGNN trunk, one regression head per target, masked multitask losses.

The run folder (``--out``) is laid out as :mod:`cgnn_dgl.rundir` describes. Every file is written
atomically, so ``kill -9`` at any moment leaves a consistent run, and ``cgnn train --out RUN --resume``
continues exactly where it stopped: with the same seeds on CPU the weights equal those of an
uninterrupted run bit for bit.

Loss: for every used target k, the mean squared error (``loss: mse``, the reference; ``l1`` and ``huber``
are options, per target with ``target_loss``) over the crystals that have a label for k, in
standardised units ``(y - mean_k) / std_k`` (train-split statistics; mean 0 / std 1 with
``standardize: false``), weighted by ``task_weights[k]`` and divided by the sum of the weights of the
targets that have labels in the training split. With one target, no standardisation and weight 1 this is
the reference's ``MSELoss`` exactly. Selection score: the mean over used targets of the validation MAE
divided by ``std_k``, i.e. the plain validation MAE in single-target mode without standardisation.

Devices: the DGL graph of a batch always stays on the CPU (the PyPI DGL is CPU-only); only the
:class:`~cgnn_dgl.graph_ops.GraphIndex` tensors, atomic numbers and targets move to ``--device``. Where
the graph ops run on the torch backend (``--device cuda`` with the CPU-only DGL, or ``backend: torch``)
batches skip DGL altogether (``train.loader``, :mod:`cgnn_dgl.step`): index tensors straight from the
packed arrays, assembled by a background thread into pinned memory and copied without blocking while
the previous step runs. ``train.amp: bf16`` runs the forward pass under bf16 autocast (loss, weights and
optimizer state stay float32); ``train.compile`` wraps the model in ``torch.compile`` and falls back to
eager if that fails; ``train.deterministic`` turns on torch's deterministic algorithms.

DDP: launched by ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK set), each process trains on its own shard
of every epoch's permutation (DistributedSampler semantics: padded to equal length) with a per-process
batch of ``batch_size // world_size``; gradients are averaged by DDP, metrics all-reduced, and only rank 0
writes files. gloo on CPU, nccl on CUDA. BatchNorm statistics are per process (as in plain DDP).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cgnn_dgl import checkpoint as ckpt_mod
from cgnn_dgl.config import MODEL_PRESETS, RunConfig, TrainConfig, load_run_config
from cgnn_dgl.errors import CgnnError, UsageError
from cgnn_dgl.fileio import atomic_write_text
from cgnn_dgl.rundir import BEST, CONFIG, HISTORY, LAST, SPLIT, resolve_device
from cgnn_dgl.step import CompileFallback, autocast, maybe_compile, set_deterministic

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# distributed helpers


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def init(self, device: torch.device) -> None:
        if not self.enabled or torch.distributed.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def shard_indices(indices: np.ndarray, rank: int, world: int) -> np.ndarray:
    """DistributedSampler semantics: pad by wrapping to a multiple of ``world``, then take every world-th."""
    if world <= 1:
        return indices
    n = len(indices)
    total = int(math.ceil(n / world)) * world
    if total > n and n > 0:
        indices = np.concatenate([indices, indices[: total - n]])
    return indices[rank:total:world]


# --------------------------------------------------------------------------------------------------
# pieces shared with evaluate / predict


def drop_lone_last(idx: np.ndarray, batch_size: int) -> np.ndarray:
    """``idx`` without its last entry when that entry would form a batch of one crystal, which batch norm
    cannot normalise in training mode (a training split of 33 at batch 32, say). Training indices are
    shuffled, so each epoch leaves out another crystal."""
    return idx[:-1] if len(idx) > 1 and len(idx) % batch_size == 1 else idx


def target_columns(names, held) -> list[int]:
    """Indices of the target ``names`` among a cache's columns ``held`` (its manifest's targets); a one-line
    error naming what the cache holds when any is missing."""
    held = list(held)
    missing = [n for n in names if n not in held]
    if missing:
        raise UsageError(f"the cache has no target {', '.join(missing)}; it holds {', '.join(held) or 'none'}")
    return [held.index(n) for n in names]


def run_tasks(cfg: RunConfig, packed=None):
    """The :class:`~cgnn_dgl.tasks.TaskSet` of a run (units from the cache when given)."""
    from cgnn_dgl.tasks import TaskSet

    return TaskSet.from_configs(cfg.model, cfg.train, packed.units if packed is not None else None)


def batch_tensors(g, idx_cols: list[int], device: torch.device, backend: str):
    """(z, gi, y, mask) of a batch graph on ``device``; the DGL graph itself is never moved."""
    from cgnn_dgl.graph_ops import GraphIndex

    gi = GraphIndex.from_graph(g, device, backend=backend)
    z = g.nodes["atom"].data["Z"].to(device, non_blocking=True)
    cdata = g.nodes["crystal"].data
    y = cdata["y"][:, idx_cols].to(device=device, dtype=torch.float32, non_blocking=True)
    mask = cdata["y_mask"][:, idx_cols].to(device, non_blocking=True)
    return z, gi, y, mask


def use_flat_loader(t: TrainConfig, device: torch.device) -> bool:
    """Whether batches come from flat arrays (:mod:`cgnn_dgl.step`) rather than DGL batch graphs:
    ``train.loader: flat``, or ``auto`` where the graph ops run on the torch backend (CUDA with the
    CPU-only DGL wheel, or ``backend: torch``). The DGL heterographs stay the CPU default."""
    from cgnn_dgl.graph_ops import resolve_backend

    if t.loader == "dgl":
        return False
    torch_ops = t.backend == "torch" or (t.backend == "auto" and resolve_backend("auto", device) == "torch")
    if t.loader == "flat" and not torch_ops:
        if t.backend == "dgl":
            raise UsageError("train.loader: flat gives torch index tensors; it needs train.backend torch or auto")
        return True
    return torch_ops


def split_output(out):
    """Model output -> (regression (n, T), classification logits (n, 2) or None)."""
    if isinstance(out, dict):
        return out["regression"], out.get("logits")
    if isinstance(out, (tuple, list)):
        return out[0], (out[1] if len(out) > 1 else None)
    return out, None


def hurdle_loss(conditional, ys, maskf, labels, lmask, pairs) -> torch.Tensor:
    """Mean over the hurdle targets of the L1 loss of each conditional output (standardised) on the crystals
    its head labels positive (insulators for band_gap): the part of a two-part model above the hurdle."""
    total = conditional.new_zeros((), dtype=torch.float32)
    for j, (col, head) in enumerate(pairs):
        pos = (labels[:, head] > 0.5) & lmask[:, head] & (maskf[:, col] > 0)
        err = (conditional[:, j].float() - ys[:, col]).abs() * pos.float()
        total = total + err.sum() / pos.float().sum().clamp(min=1.0)
    return total / max(len(pairs), 1)


class HeadsModule(torch.nn.Module):
    """``forward`` = the model's ``forward_heads`` (regression + optional logits), so DDP can wrap it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, z, gi):
        return self.model.forward_heads(z, gi)


def target_stats(y: np.ndarray, mask: np.ndarray, standardize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean / std over labelled rows (mean 0, std 1 when not standardising or unlabelled)."""
    from cgnn_dgl.tasks import Task, TaskSet

    tasks = TaskSet(tuple(Task(f"t{k}", standardise=standardize) for k in range(y.shape[1])))
    return tasks.target_stats(y, mask)


def _oqmd_tasks(model_targets, train: TrainConfig):
    from cgnn_dgl.config import ModelConfig
    from cgnn_dgl.tasks import TaskSet

    return TaskSet.from_configs(ModelConfig(targets=tuple(model_targets), classification_heads=True), train)


def class_labels(y: torch.Tensor, mask: torch.Tensor, model_targets, train: TrainConfig):
    """Labels (insulator, magnetic) and their masks from the band-gap / magnetization columns of ``y``
    (the OQMD preset's heads; a run asks its own :class:`~cgnn_dgl.tasks.TaskSet`)."""
    return _oqmd_tasks(model_targets, train).binary_labels(y, mask)


def class_task_weights(y_train: np.ndarray, m_train: np.ndarray, model_targets, train: TrainConfig) -> torch.Tensor:
    """1 per OQMD classification head (insulator, magnetic), 0 for a task whose training labels are all one
    class (or absent); see :meth:`cgnn_dgl.tasks.TaskSet.head_weights`."""
    return _oqmd_tasks(model_targets, train).head_weights(y_train, m_train)


def build_optimizer(params, t: TrainConfig) -> torch.optim.Optimizer:
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, nesterov=True, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay, amsgrad=t.optimizer == "amsgrad")


def build_scheduler(opt, t: TrainConfig):
    """The per-epoch LR schedule; with ``warmup_epochs`` W > 0 a linear warm-up (lr/(W+1) -> lr) runs first
    and the schedule then starts from its own epoch 0 (cosine T_max and milestones count after warm-up)."""
    main = _main_scheduler(opt, t)
    if t.warmup_epochs <= 0:
        return main
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / (t.warmup_epochs + 1), end_factor=1.0,
                                             total_iters=t.warmup_epochs)
    if main is None:
        return warm
    return torch.optim.lr_scheduler.SequentialLR(opt, [warm, main], milestones=[t.warmup_epochs])


def _main_scheduler(opt, t: TrainConfig):
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.milestones[0], eta_min=t.gamma)
    if t.scheduler == "step" or (t.scheduler == "multistep" and t.milestones[0] < 0):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=abs(t.milestones[0]), gamma=t.gamma)
    if t.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(t.milestones), gamma=t.gamma)
    return None


# --------------------------------------------------------------------------------------------------
# the trainer


class Trainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, packed, split: dict[str, np.ndarray], dist: Dist | None = None,
                 resume_state: dict | None = None):
        from cgnn_dgl.model import CGNN

        self.cfg, self.t = cfg, cfg.train
        self.run_dir = Path(run_dir)
        self.packed, self.split = packed, split
        self.dist = dist or Dist()
        self.device = resolve_device(self.t.device, self.dist)
        self.tasks = run_tasks(cfg, packed)
        self.model_targets = list(self.tasks.names)
        # the batch's label columns: the regression targets, then any 0/1 label columns of binary tasks
        self.cols = self.tasks.columns(packed.targets, f"the cache {self.t.cache}")
        self.used = [self.model_targets.index(t) for t in self.tasks.used]

        set_deterministic(self.t.deterministic)
        torch.manual_seed(self.t.seed)
        random.seed(self.t.seed)
        self.np_rng = np.random.default_rng(self.t.seed)

        train_idx = split["train"]
        T = len(self.model_targets)
        y_tr = packed.y[train_idx][:, self.cols]
        m_tr = packed.y_mask[train_idx][:, self.cols]
        self.tasks.check_binary_labels(y_tr, m_tr)
        mean, std = self.tasks.target_stats(y_tr[:, :T], m_tr[:, :T])
        self.model = CGNN(cfg.model)
        self.model.set_target_stats(mean, std)
        # fine-tuning: the init's trunk and matching heads (a resumed run has them in its last.pt already)
        self.init_record = None
        if self.t.init and resume_state is None:
            from cgnn_dgl.finetune import apply_init, read_init

            self.init_record = apply_init(self.model, read_init(self.t.init, self.t.init_arch))
        self.model.to(self.device)
        # what the checkpoints record: the tasks with their standardisation, and the cache's coordinator
        # parameters and label provenance (so that predict builds graphs as the training cache did)
        self.record = {**ckpt_mod.cache_record(self.t.cache), "tasks": self.tasks.record(mean, std)} \
            if self.t.cache else {"tasks": self.tasks.record(mean, std)}
        # loss weights: used targets only; normalised by the weights of targets labelled in train
        self.loss_w = self.tasks.loss_weights(m_tr[:, :T].any(axis=0)).to(self.device)
        self.reg_loss = self.tasks.regression_loss(self.device)
        self.has_cls = bool(self.tasks.heads)
        self.cls_w = torch.ones(len(self.tasks.heads), device=self.device)
        self.cls_pos = None
        if self.has_cls:
            self.cls_w = self.tasks.head_weights(y_tr, m_tr).to(self.device)
            if self.t.classification_balance:
                self.cls_pos = self.tasks.positive_weights(y_tr, m_tr).to(self.device)
                log.info("classification_balance: positive-class weights %s",
                         dict(zip(self.tasks.class_names, [round(w, 2) for w in self.cls_pos.tolist()])))
        # which outputs learnt anything: predictions and screens flag the others (e.g. magnetization
        # and p_magnetic of a model trained on data without magnetic labels)
        self.record["tasks"]["training_labels"] = {n: int(m_tr[:, k].sum()) for k, n in enumerate(self.model_targets)}
        self.record["tasks"]["heads_trained"] = {c: bool(w > 0) for c, w in
                                                 zip(self.tasks.class_names, self.cls_w.tolist())} if self.has_cls else {}

        self.flat = use_flat_loader(self.t, self.device)
        self.heads = HeadsModule(self.model)
        self.net = self.heads
        if self.dist.enabled:
            # device_ids=None: single-device module; inputs are already on the device (no scatter)
            self.net = torch.nn.parallel.DistributedDataParallel(self.heads, device_ids=None)
        self.runner = CompileFallback(maybe_compile(self.net, self.t.compile), self.net)
        self.opt = build_optimizer(self.model.parameters(), self.t)
        from cgnn_dgl.finetune import trunk_modules, trunk_parameters

        self._trunk_params, self._trunk_modules = trunk_parameters(self.model), trunk_modules(self.model)
        self.sched = build_scheduler(self.opt, self.t)
        self.epoch = 0
        self.best_score = math.inf
        self.best_epoch = -1
        self.since_best = 0
        self.history: list[dict] = []
        if resume_state is not None:
            self._restore(resume_state)

    # -- state -------------------------------------------------------------------------------------
    def _restore(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        if self.sched is not None and st.get("scheduler") is not None:
            self.sched.load_state_dict(st["scheduler"])
        ckpt_mod.set_rng_state(st["rng"], self.np_rng)
        self.epoch = int(st["epoch"])
        self.best_score = float(st["best_score"])
        self.best_epoch = int(st["best_epoch"])
        self.since_best = int(st["epochs_since_best"])
        self.history = list(st.get("history", []))
        self.init_record = st.get("init")

    def state(self) -> dict:
        return ckpt_mod.make_checkpoint(
            self.model, self.cfg.model,
            train_config=self.t.to_dict(),
            optimizer=self.opt.state_dict(),
            scheduler=self.sched.state_dict() if self.sched is not None else None,
            rng=ckpt_mod.rng_state(self.np_rng),
            epoch=self.epoch,
            best_score=self.best_score,
            best_epoch=self.best_epoch,
            epochs_since_best=self.since_best,
            history=self.history,
            world_size=self.dist.world,
            **self.record,
            init=self.init_record,
        )

    def _freeze_trunk(self, frozen: bool) -> None:
        """During ``train.freeze_trunk_epochs`` the trunk runs in eval mode (batch-norm statistics stay) and,
        outside DDP (which needs a fixed set of gradients), computes no gradients at all."""
        for m in self._trunk_modules:
            m.train(not frozen)
        if not self.dist.enabled:
            for p in self._trunk_params:
                p.requires_grad_(not frozen)

    # -- one pass ----------------------------------------------------------------------------------
    def _batches(self, idx: np.ndarray, bs: int):
        """``(z, gi, y, mask)`` on the device for consecutive slices of ``idx``: from flat arrays with a
        prefetching, pinned-memory loader (torch graph backend) or from DGL batch graphs."""
        if self.flat:
            from cgnn_dgl.step import FlatLoader, index_batches

            for fb in FlatLoader(self.packed, index_batches(idx, bs), self.device, cols=self.cols):
                yield fb.tensors()
            return
        from cgnn_dgl.batching import iter_batches

        for _, g in iter_batches(self.packed, idx, bs, shuffle=False):
            yield batch_tensors(g, self.cols, self.device, self.t.backend)

    def _pass(self, indices: np.ndarray, train: bool, desc: str) -> dict:
        from cgnn_dgl.report import progress

        T = len(self.model_targets)
        # sums: [n_crystals, loss*n, sq_std(T), abs_phys(T), sq_phys(T), count(T)]
        acc = torch.zeros(2 + 4 * T, dtype=torch.float64, device=self.device)
        std = self.model.target_std.to(self.device).float()
        mean = self.model.target_mean.to(self.device).float()
        frozen = train and self.epoch < self.t.freeze_trunk_epochs
        if train:
            self.net.train()
            self._freeze_trunk(frozen)
            idx = shard_indices(indices[self.np_rng.permutation(len(indices))], self.dist.rank, self.dist.world)
            bs = max(1, self.t.batch_size // self.dist.world)
            idx = drop_lone_last(idx, bs)
            if self.t.record_seen and self.epoch == 0:
                (self.run_dir / f"seen_rank{self.dist.rank}.txt").write_text(
                    "\n".join(str(int(e)) for e in self.packed.entry_id[idx]) + "\n")
        else:
            self.model.eval()
            idx = indices[self.dist.rank::self.dist.world] if self.dist.enabled else indices
            bs = self.t.eval_batch_size or self.t.batch_size
        n_batches = (len(idx) + bs - 1) // bs
        bar = progress(total=n_batches, desc=desc, unit="batch",
                       disable=(not self.t.progress or not self.dist.main) or None)
        ctx = torch.enable_grad() if train else torch.no_grad()
        with ctx:
            for z, gi, y_all, mask_all in self._batches(idx, bs):
                # label columns: the T regression targets first, then 0/1 label columns of binary tasks
                y, mask = (y_all, mask_all) if y_all.shape[1] == T else (y_all[:, :T], mask_all[:, :T])
                ys = (y - mean) / std
                maskf = mask.float()
                cnt = maskf.sum(0)

                def attempt(net, z=z, gi=gi, y=y, y_all=y_all, mask_all=mask_all, ys=ys, maskf=maskf, cnt=cnt):
                    with autocast(self.device, self.t.amp):
                        out = net(z, gi)
                    reg, logits = split_output(out)
                    reg = reg.float().reshape(y.shape[0], -1)  # the loss is always taken in float32
                    loss, sq = self.reg_loss(reg, ys, maskf, cnt, self.loss_w)
                    if self.has_cls and logits is not None:
                        labels, lmask = self.tasks.binary_labels(y_all, mask_all)
                        loss = loss + self.tasks.binary_loss(logits, labels, lmask, self.cls_w, self.cls_pos)
                        if "conditional" in out:
                            loss = loss + hurdle_loss(out["conditional"], ys, maskf, labels, lmask,
                                                      self.model.hurdle)
                    if train:
                        self.opt.zero_grad(set_to_none=True)
                        loss.backward()
                    if "prediction" in out:  # hurdle targets: score what predict reports (the gated output)
                        reg = out["prediction"].float().reshape(y.shape[0], -1).detach()
                        sq = (reg - ys) ** 2 * maskf
                    return reg, sq, loss

                reg, sq, loss = self.runner(attempt) if train else attempt(self.heads)
                if frozen:  # no gradient, so the optimizer leaves the trunk alone (also under DDP)
                    for p in self._trunk_params:
                        p.grad = None
                if train:
                    if self.t.clip_value > 0:
                        torch.nn.utils.clip_grad_value_(self.model.parameters(), self.t.clip_value)
                    self.opt.step()
                with torch.no_grad():
                    err = (reg.detach() - ys) * std
                    n = y.shape[0]
                    acc[0] += n
                    acc[1] += loss.detach().double() * n
                    acc[2:2 + T] += sq.detach().sum(0).double()
                    acc[2 + T:2 + 2 * T] += (err.abs() * maskf).sum(0).double()
                    acc[2 + 2 * T:2 + 3 * T] += (err ** 2 * maskf).sum(0).double()
                    acc[2 + 3 * T:] += cnt.double()
                bar.update(1)
                if train and not bar.disable and bar.n % 10 == 1:
                    bar.set_postfix(loss=f"{float(loss):.4g}", refresh=False)
        bar.close()
        self.dist.all_reduce(acc)
        a = acc.cpu().numpy()
        cnt = a[2 + 3 * T:]
        with np.errstate(invalid="ignore", divide="ignore"):
            mae = np.where(cnt > 0, a[2 + T:2 + 2 * T] / cnt, np.nan)
            mse_std = np.where(cnt > 0, a[2:2 + T] / cnt, np.nan)
        std_np = self.model.target_std.cpu().double().numpy()
        used_mae = [mae[k] / std_np[k] for k in self.used if cnt[k] > 0]
        return {
            "loss": a[1] / a[0] if a[0] else float("nan"),
            "mae": mae,
            "mse_std": mse_std,
            "count": cnt,
            "score": float(np.mean(used_mae)) if used_mae else float("nan"),
        }

    def _precise_bn(self, indices: np.ndarray) -> None:
        """Replace every batch norm's running statistics by their average over ``indices`` (the training
        split), in batches of ``train.precise_bn_batch_size``, forward only. Trunk modules frozen this
        epoch keep theirs; under DDP each process averages over its own shard (as plain DDP does)."""
        frozen = self.epoch < self.t.freeze_trunk_epochs
        self.model.train()
        if frozen:
            for trunk in self._trunk_modules:
                trunk.eval()  # eval-mode batch norm neither uses nor updates batch statistics
        bns = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats and m.training]
        if not bns:
            return
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        idx = drop_lone_last(shard_indices(indices, self.dist.rank, self.dist.world), self.t.precise_bn_batch_size)
        with torch.no_grad():
            for z, gi, _, _ in self._batches(idx, self.t.precise_bn_batch_size):
                self.model(z, gi)
        for m, mom in zip(bns, momenta):
            m.momentum = mom

    # -- loop --------------------------------------------------------------------------------------
    def fit(self) -> dict:
        t = self.t
        train_idx, val_idx = self.split["train"], self.split["val"]
        if len(train_idx) == 0:
            raise CgnnError("the training split is empty")
        while self.epoch < t.epochs:
            if t.patience and self.since_best >= t.patience:
                break
            t0 = time.perf_counter()
            lr = self.opt.param_groups[0]["lr"]
            tr = self._pass(train_idx, True, f"epoch {self.epoch + 1}/{t.epochs} train")
            if t.precise_bn_batch_size:
                self._precise_bn(train_idx)
            va = self._pass(val_idx, False, "val") if len(val_idx) else None
            if self.sched is not None:
                self.sched.step()
            score = va["score"] if va is not None else tr["score"]
            improved = math.isfinite(score) and score < self.best_score - t.min_delta
            self.epoch += 1
            if improved:
                self.best_score, self.best_epoch, self.since_best = score, self.epoch, 0
            else:
                self.since_best += 1
            row = {"epoch": self.epoch, "lr": lr, "time_s": round(time.perf_counter() - t0, 3),
                   "train_loss": tr["loss"], "val_loss": va["loss"] if va else float("nan")}
            for k, name in enumerate(self.model_targets):
                row[f"train_mae_{name}"] = tr["mae"][k]
                row[f"val_mae_{name}"] = va["mae"][k] if va else float("nan")
            row["val_score"] = score
            self.history.append({k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})
            if self.dist.main:
                if improved:
                    ckpt_mod.atomic_save(self._best_state(), self.run_dir / BEST)
                ckpt_mod.atomic_save(self.state(), self.run_dir / LAST)
                write_history(self.run_dir / HISTORY, self.history)
                maes = " ".join(f"{n}={row[f'val_mae_{n}']:.4g}" for n in self.model_targets)
                log.info("epoch %d/%d lr %.2e train_loss %.4g val_loss %.4g val_mae %s score %.4g%s (%.1fs)",
                         self.epoch, t.epochs, lr, row["train_loss"], row["val_loss"], maes, score,
                         " *" if improved else "", row["time_s"])
            self.dist.barrier()
        if t.patience and self.since_best >= t.patience and self.dist.main:
            log.info("early stopping: no improvement for %d epochs (best epoch %d)", self.since_best, self.best_epoch)
        return {"epochs": self.epoch, "best_epoch": self.best_epoch, "best_score": self.best_score}

    def _best_state(self) -> dict:
        return ckpt_mod.make_checkpoint(self.model, self.cfg.model, train_config=self.t.to_dict(), epoch=self.epoch,
                                        best_score=self.best_score, best_epoch=self.best_epoch, **self.record,
                                        init=self.init_record)


def write_history(path: Path, history: list[dict]) -> None:
    if not history:
        return
    keys = list(history[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in history:
        w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


# --------------------------------------------------------------------------------------------------
# data + split


def load_cache(path: str | None):
    from cgnn_dgl.cache import load_packed

    if not path:
        raise UsageError("no graph cache given: pass --cache DIR or set train.cache")
    p = Path(path)
    if not (p / "manifest.json").is_file():
        raise UsageError(f"graph cache not found: {p} (no manifest.json); build one with `cgnn graphs`")
    return load_packed(p)


def split_method(t: TrainConfig) -> str:
    """formula | random | file (a split_file always means file)."""
    return "file" if t.split_file else t.split


def make_split(packed, t: TrainConfig) -> dict[str, np.ndarray]:
    from cgnn_dgl.split import formula_split, random_split, read_split_file

    method = split_method(t)
    if method == "file":
        return read_split_file(t.split_file, packed.entry_id, packed.names)
    if method == "random":
        return random_split(len(packed), seed=t.split_seed, val_fraction=t.val_fraction,
                            test_fraction=t.test_fraction)
    return formula_split(packed.formulas(), packed.n_elements(), seed=t.split_seed,
                         val_fraction=t.val_fraction, test_fraction=t.test_fraction)


def prepare_run(cfg: RunConfig, run_dir: Path, resume: bool, dist: Dist):
    """Load the cache, fix the split (reusing ``split.json``), and return (packed, split, resume_state)."""
    from cgnn_dgl.split import load_split, save_split

    packed = load_cache(cfg.train.cache)
    if cfg.model.geometry:
        from cgnn_dgl.cache import require_bond_ratios

        require_bond_ratios(packed, cfg.train.cache)
    split_path = run_dir / SPLIT
    state = None
    if resume and (run_dir / LAST).is_file():
        state = ckpt_mod.load(run_dir / LAST)
        if state.get("world_size", 1) != dist.world:
            log.warning("resuming a run trained with %s processes on %d", state.get("world_size"), dist.world)
    if split_path.is_file():
        split = load_split(split_path, packed.entry_id, packed.names)
    else:
        split = make_split(packed, cfg.train)
        if dist.main:
            save_split(split_path, split, packed.entry_id, packed.names, packed.positional_keys, method=split_method(cfg.train),
                       seed=cfg.train.split_seed, source=str(cfg.train.split_file or f"{split_method(cfg.train)}_split"))
    return packed, split, state


def check_trainable(cfg: RunConfig, packed, split: dict[str, np.ndarray]) -> None:
    """Refuse, before any epoch runs, a run that would learn nothing yet exit 0 (issue 8): no epochs, no
    labels for the chosen targets in the training split, or no validation crystals to select a model on.
    (``train.epochs: 0`` is refused by :func:`train_run` before the run folder is made.)"""
    t = cfg.train
    n_tr, n_va, n_te = (len(split[k]) for k in ("train", "val", "test"))
    sizes = f"{n_tr} train / {n_va} val / {n_te} test crystals"
    if n_tr == 0:
        raise CgnnError(f"the training split is empty ({sizes}); build the cache from more structures")
    tasks = run_tasks(cfg, packed)
    tasks.columns(packed.targets, f"the cache {t.cache}")  # every target of the config is in the cache
    used = list(tasks.used)
    if not packed.y_mask[split["train"]][:, target_columns(used, packed.targets)].any():
        raise CgnnError(f"no crystal of the training split ({n_tr}) has a label for {', '.join(used)}; build the "
                        "cache from labelled data (e.g. `cgnn ingest`) or pick labelled targets with "
                        "--set train.targets=[...]")
    if n_va == 0:
        if t.val_fraction > 0:
            raise CgnnError(f"the validation split is empty ({sizes}), so no model can be selected; use more "
                            "crystals, raise train.val_fraction, give train.split_file, or pass "
                            "--set train.val_fraction=0 to select the model on the training score")
        log.warning("no validation crystals (train.val_fraction=0): the best model is chosen on the training score")
    constant = constant_targets(packed, split["train"], used)
    if constant:
        log.warning("target(s) constant in the training split (%s): nothing to learn for them beyond that value; "
                    "drop them with --set train.targets=[...]", ", ".join(f"{t} = {v:.6g}" for t, v in constant.items()))


def constant_targets(packed, train_idx: np.ndarray, names) -> dict[str, float]:
    """The targets whose labels in the training split all share one value (issue 8), e.g. magnetization,
    0 for every Perov-5 crystal: {name: value}."""
    out = {}
    y, mask = packed.y[train_idx], packed.y_mask[train_idx].astype(bool)
    for name, col in zip(names, target_columns(names, packed.targets)):
        vals = y[mask[:, col], col]
        if vals.size >= 2 and float(vals.max()) == float(vals.min()):
            out[name] = float(vals[0])
    return out


def member_split(split: dict[str, np.ndarray], t: TrainConfig, packed=None) -> dict[str, np.ndarray]:
    """The split one model trains on: with ``train.bootstrap`` its training part is resampled from the
    seed (so a resumed run draws the same sample); with ``train.crossfit_fold`` (an ensemble member of a
    ``train.crossfit`` run) that fold of the training part, grouped by formula, is left out (``packed``
    gives the formulas); otherwise ``split`` itself."""
    if t.bootstrap:
        from cgnn_dgl.ensemble import bootstrap_indices

        return dict(split, train=bootstrap_indices(split["train"], t.seed))
    if t.crossfit_fold >= 0:
        from cgnn_dgl.ensemble import train_folds

        if packed is None:
            raise ValueError("member_split: a crossfit member needs the cache (its formulas)")
        train = np.asarray(split["train"], dtype=np.int64)
        keep = train_folds(packed, train, t.crossfit_folds, t.split_seed) != t.crossfit_fold
        return dict(split, train=train[keep])
    return split


def train_run(cfg: RunConfig, run_dir: str | Path, resume: bool = False) -> dict:
    """Train (or resume) a run in ``run_dir``; returns a summary. Used by the CLI and by tests."""
    run_dir = Path(run_dir)
    dist = Dist.from_env()
    device = resolve_device(cfg.train.device, dist)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    elif dist.enabled and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world))
    dist.init(device)
    try:
        if cfg.train.epochs == 0:
            raise UsageError("train.epochs is 0, so nothing would be trained; set train.epochs to 1 or more")
        if (run_dir / LAST).is_file() and not resume:  # checked by every rank, so none waits forever
            raise UsageError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        if cfg.train.init and not (run_dir / LAST).is_file():  # a resumed run's config.yaml has it already
            from cgnn_dgl.finetune import init_model_config, read_init

            cfg.model = init_model_config(cfg.model, read_init(cfg.train.init, cfg.train.init_arch))
        if dist.main:
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / CONFIG)
        dist.barrier()
        packed, split, state = prepare_run(cfg, run_dir, resume, dist)
        split = member_split(split, cfg.train, packed)
        dist.barrier()
        if dist.main:
            log.info("run %s: %d train / %d val / %d test crystals, targets %s, device %s%s", run_dir,
                     len(split["train"]), len(split["val"]), len(split["test"]), list(cfg.model.targets), device,
                     f", {dist.world} processes" if dist.enabled else "")
            if state is not None:
                log.info("resuming after epoch %d (best epoch %d)", state["epoch"], state["best_epoch"])
        check_trainable(cfg, packed, split)
        trainer = Trainer(cfg, run_dir, packed, split, dist, resume_state=state)
        if dist.main and trainer.record.get("synthetic"):  # the cache record the checkpoints keep
            log.warning("the cache's labels are SYNTHETIC (cgnn db synth): this model shows the pipeline "
                        "works, not physics")
        summary = trainer.fit()
        if summary["best_epoch"] < 0:
            raise CgnnError(f"no epoch of {run_dir} gave a finite score (NaN losses?), so no {BEST} was written; "
                            "try a lower train.lr or check the labels")
        summary.update(run_dir=str(run_dir), n_train=len(split["train"]), n_val=len(split["val"]),
                       n_test=len(split["test"]))
        return summary
    finally:
        dist.close()


# --------------------------------------------------------------------------------------------------
# CLI


def _cmd_train(args) -> int:
    overrides = list(args.set or [])
    if getattr(args, "targets", None):
        import json

        names = [n.strip() for n in args.targets.split(",") if n.strip()]
        if not names:
            raise UsageError(f"--targets {args.targets!r}: expected names separated by commas, e.g. heat_all,dir_gap")
        overrides.append("model.targets=" + json.dumps(names))  # JSON is YAML: names stay strings
    if args.init or args.arch:  # as overrides, so the config is checked with them (freeze_trunk_epochs needs init)
        import json

        overrides += [f"train.{key}={json.dumps(value)}" for key, value in
                      (("init", args.init), ("init_arch", args.arch)) if value]
    run_dir = Path(args.out) if args.out else None
    if args.resume:
        if run_dir is None:
            raise UsageError("--resume needs --out RUNDIR")
        saved = run_dir / CONFIG
        if not saved.is_file():
            if args.config is None:
                raise UsageError(f"nothing to resume in {run_dir} (no {CONFIG}) and no --config given")
            config_path = args.config
        else:
            config_path = saved
            if args.config is not None:
                log.info("--resume: using the run's own %s (the --config file is ignored)", saved)
    else:
        if args.config is None:
            raise UsageError("--config FILE is required (or --resume --out RUNDIR)")
        config_path = args.config
    check_files = not (args.resume and run_dir is not None and (run_dir / SPLIT).is_file())
    cfg = load_run_config(config_path, overrides, check_files=check_files)
    if args.cache:
        cfg.train.cache = args.cache
    if args.device:
        cfg.train.device = args.device
    if run_dir is None:
        run_dir = Path(cfg.train.out_dir)
    cfg.train.out_dir = str(run_dir)
    if args.workers is not None:
        cfg.train.workers = args.workers
    if args.init:
        cfg.train.init = args.init
    if args.arch:
        cfg.train.init_arch = args.arch
    if cfg.train.init_arch and not cfg.train.init:
        raise UsageError("--arch names the model of an --init state_dict (an official reference .pth); give --init")
    cfg.train.validate(cfg.model.targets, check_files=check_files)
    if cfg.train.ensemble > 1:
        from cgnn_dgl.ensemble import ENSEMBLE_JSON, train_ensemble

        summary = train_ensemble(cfg, run_dir, resume=args.resume)
        scales = ", ".join(f"{t} {s:.3g}" for t, s in summary["calibration"]["scale"].items())
        print(f"trained {summary['members']} members x {summary['epochs']} epochs; std scale on val: {scales}; "
              f"ensemble in {run_dir} ({ENSEMBLE_JSON}); predict with --model {run_dir}")
        return 0
    summary = train_run(cfg, run_dir, resume=args.resume)
    if Dist.from_env().main:
        print(f"trained {summary['epochs']} epochs; best epoch {summary['best_epoch']} "
              f"(val score {summary['best_score']:.5g}); model in {run_dir / BEST}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a CGNN (multitask, resumable, DDP via torchrun)",
        description="Train a CGNN on a graph cache. The run folder keeps config.yaml, split.json, last.pt, "
                    "best.pt and history.csv; rerun with --resume after an interruption. Multi-GPU / "
                    "multi-node: launch with `torchrun --nproc_per_node N -m cgnn_dgl.cli train ...`.")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON run config (sections model, train)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.lr=5e-4 --set model.n_conv=3 (repeatable)")
    p.add_argument("--cache", metavar="DIR", help="graph cache (overrides train.cache)")
    p.add_argument("--targets", metavar="A,B",
                   help="regression targets, any columns the cache holds, e.g. heat_all,dir_gap "
                        "(same as --set 'model.targets=[heat_all, dir_gap]')")
    p.add_argument("--out", metavar="RUNDIR", help="run folder (overrides train.out_dir)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="overrides train.device")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--init", metavar="CKPT",
                   help="fine-tune: start from the trunk of this model (RUN/best.pt, or an official reference "
                        "state_dict with --arch); heads of targets it lacks are fresh (sets train.init)")
    p.add_argument("--arch", choices=list(MODEL_PRESETS),
                   help="the preset of an --init reference state_dict (sets train.init_arch)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="ensembles (train.ensemble > 1): train N members at a time in separate processes "
                        "(overrides train.workers)")
    p.set_defaults(func=_cmd_train)
