"""Fine-tuning: start a run from the trunk of a trained model (``cgnn train --init CKPT [--arch A]``).

The commonest real case is a few hundred of a user's own DFT results on top of a model trained on OQMD,
so the expensive part (embedding, convolutions, pooling, fully connected layers: the *trunk*) is taken
from the init model and only the output heads are new:

* the run's model gets the init's architecture; its targets and classification heads come from the run
  config (:func:`init_model_config`);
* a regression head whose target the init model also predicts (matched by name) is kept, rescaled to the
  new run's standardisation so that it starts out predicting what the init model predicted; every other
  target gets a fresh head (:func:`apply_init`);
* ``train.freeze_trunk_epochs: N`` trains only the heads for the first N epochs (trunk weights, and
  batch-norm statistics, unchanged), then everything.

The init may be a cgnn-dgl checkpoint (``RUN/best.pt``) or an official reference ``state_dict`` with its
preset named by ``arch`` (it predicts formation energy). What was loaded is recorded in every checkpoint
of the run as ``init`` (path, sha256, arch, kept and fresh heads).
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cgnn_dgl.errors import CgnnError

log = logging.getLogger(__name__)

HEADS = ("regression", "classification", "conditional")  # child modules of CGNN that are output heads
STATS = ("target_mean", "target_std")  # standardisation buffers: set from the new run's training split
# fields of ModelConfig that describe the heads, not the trunk: the run config decides them
HEAD_FIELDS = ("targets", "classification_heads", "classification_hidden", "classification_detach", "binary_targets",
               "hurdle_targets")
FIXED = ("valence",)  # buffer-only modules rebuilt by every model (the valence table), never loaded from the init


def is_trunk_key(key: str) -> bool:
    """Whether a state-dict key belongs to the trunk (everything but the heads and the target statistics)."""
    return key not in STATS and key.split(".", 1)[0] not in HEADS + FIXED


@dataclass
class InitModel:
    """A model to fine-tune from, as read from disk."""

    path: str
    sha256: str
    arch: str | None
    config: object  # ModelConfig
    state: dict[str, torch.Tensor]

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self.config.targets)

    def record(self, kept: list[str], fresh: list[str]) -> dict:
        return {"path": self.path, "sha256": self.sha256, "arch": self.arch, "targets": list(self.targets),
                "kept_heads": kept, "fresh_heads": fresh}


def read_init(path: str | Path, arch: str | None = None) -> InitModel:
    """Read a cgnn-dgl checkpoint or (with ``arch``) a reference state_dict, with one-line errors."""
    from cgnn_dgl import checkpoint as ckpt_mod
    from cgnn_dgl.fileio import sha256_file

    path = Path(path)
    ckpt = ckpt_mod.load(path)
    if ckpt_mod.is_cgnn_checkpoint(ckpt) and arch is not None:
        log.info("--arch %s ignored: %s is a cgnn-dgl checkpoint and records its own model", arch, path)
        arch = None
    model, config = ckpt_mod.model_from_checkpoint(ckpt, arch, str(path))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return InitModel(str(path), sha256_file(path), arch, config, state)


def init_model_config(run_model, init: InitModel):
    """The run's ModelConfig: the init's trunk architecture, the run's targets and heads."""
    heads = {f: getattr(run_model, f) for f in HEAD_FIELDS}
    if init.config.valence_features == "classification" and not (heads["classification_heads"] or heads["binary_targets"]):
        heads["valence_features"] = "none"  # the flags fed only the classification heads that this run drops
    adopted = dataclasses.replace(init.config, **heads)
    changed = [f"{f.name} {getattr(run_model, f.name)!r} -> {getattr(adopted, f.name)!r}"
               for f in dataclasses.fields(adopted)
               if f.name not in HEAD_FIELDS and getattr(run_model, f.name) != getattr(adopted, f.name)]
    if changed:
        log.info("model settings taken from the init model %s: %s", init.path, "; ".join(changed))
    return adopted


def apply_init(model, init: InitModel) -> dict:
    """Load the init's trunk into ``model`` (a CGNN whose target statistics are already set) and keep the
    regression heads of targets both models know; returns the ``init`` record for the checkpoints."""
    own = model.state_dict()
    trunk = {k: v for k, v in init.state.items() if is_trunk_key(k)}
    wanted = {k for k in own if is_trunk_key(k)}
    problems = sorted(f"missing {k}" for k in wanted - set(trunk)) + sorted(f"unexpected {k}" for k in set(trunk) - wanted)
    problems += [f"shape of {k}: init {tuple(v.shape)}, model {tuple(own[k].shape)}"
                 for k, v in trunk.items() if k in own and v.shape != own[k].shape]
    if problems:
        raise CgnnError(f"{init.path}: its trunk does not fit this model: {'; '.join(problems[:4])}"
                        + (f"; ... ({len(problems)} in all)" if len(problems) > 4 else ""))
    merged = dict(own)
    merged.update({k: v.to(own[k].dtype) for k, v in trunk.items()})

    w_key, b_key = "regression.linear.weight", "regression.linear.bias"
    weight, bias = merged[w_key].clone(), merged[b_key].clone()
    mean1, std1 = own["target_mean"].double(), own["target_std"].double()
    mean0, std0 = init.state["target_mean"].double(), init.state["target_std"].double()
    kept, fresh = [], []
    for j, name in enumerate(model.config.targets):
        if name not in init.targets:
            fresh.append(name)
            continue
        i = init.targets.index(name)
        # physical = std * out + mean: scale the head so that the new statistics give the init's predictions
        # (with use_extension the output is multiplied by the atom count, so the mean offset cannot carry)
        r = std0[i] / std1[j]
        weight[j] = (init.state[w_key][i].double() * r).to(weight.dtype)
        shift = 0.0 if model.config.use_extension else (mean0[i] - mean1[j]) / std1[j]
        bias[j] = (init.state[b_key][i].double() * r + shift).to(bias.dtype)
        kept.append(name)
    merged[w_key], merged[b_key] = weight, bias
    if getattr(model, "classification", None) is not None:
        cls_keys = [k for k in own if k.startswith("classification.")]
        if all(k in init.state and init.state[k].shape == own[k].shape for k in cls_keys):
            merged.update({k: init.state[k] for k in cls_keys})
            kept.append("classification")
        else:
            fresh.append("classification")
    if getattr(model, "conditional", None) is not None:  # in the init's standardised units: always fresh
        fresh.append("conditional")
    model.load_state_dict(merged, strict=True)
    log.info("init from %s: trunk loaded (%d tensors); heads kept: %s; fresh: %s", init.path, len(trunk),
             ", ".join(kept) or "none", ", ".join(fresh) or "none")
    return init.record(kept, fresh)


def trunk_parameters(model) -> list[torch.nn.Parameter]:
    return [p for k, p in model.named_parameters() if is_trunk_key(k)]


def trunk_modules(model) -> list[torch.nn.Module]:
    return [m for name, m in model.named_children() if name not in HEADS]
