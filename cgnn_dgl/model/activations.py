"""Activation functions of the reference (``get_activation``): softplus, ssp, elu/elu(α), relu, selu,
celu/celu(α); names are case-insensitive and α must be written with a decimal point (``ELU(0.5)``)."""
from __future__ import annotations

import math
import re

import torch
from torch import nn
from torch.nn import functional as F

from cgnn_dgl.errors import UsageError

_RE = re.compile(r"^(softplus|ssp|relu|selu|elu|celu)(?:\((\d+\.\d+)\))?$")

LN2 = math.log(2.0)


class SSP(nn.Module):
    """Shifted softplus: ``softplus(x) - ln 2`` (β=1, threshold 20), zero at zero."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softplus(x) - LN2


def get_activation(name: str | None, allow_none: bool = False) -> nn.Module | None:
    """The activation module for a reference name; ``None``/"None" gives None where allowed."""
    if name is None or (isinstance(name, str) and name.strip().lower() == "none"):
        if allow_none:
            return None
        raise UsageError("an activation is required here (None is not allowed)")
    m = _RE.match(name.strip().lower())
    if m is None:
        raise UsageError(f"unsupported activation {name!r}")
    kind, alpha = m.group(1), m.group(2)
    if alpha is not None and kind not in ("elu", "celu"):
        raise UsageError(f"activation {name!r}: only elu and celu take a parameter")
    a = 1.0 if alpha is None else float(alpha)
    if kind == "softplus":
        return nn.Softplus()
    if kind == "ssp":
        return SSP()
    if kind == "elu":
        return nn.ELU(a)
    if kind == "relu":
        return nn.ReLU()
    if kind == "selu":
        return nn.SELU()
    return nn.CELU(a)
