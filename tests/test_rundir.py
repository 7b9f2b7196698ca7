"""Run-folder layout and device resolution, shared by train, evaluate, predict, ensemble and screen."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgnn_dgl import rundir
from cgnn_dgl.errors import UsageError
from cgnn_dgl.rundir import BEST, CONFIG, HISTORY, LAST, SPLIT, best_model, resolve_device

PACKAGE = Path(__file__).resolve().parents[1] / "cgnn_dgl"


class _Launch:
    def __init__(self, world: int, local_rank: int):
        self.enabled, self.local_rank = world > 1, local_rank


def test_layout_names():
    assert (LAST, BEST, CONFIG, SPLIT, HISTORY) == ("last.pt", "best.pt", "config.yaml", "split.json", "history.csv")
    for name in (LAST, BEST, CONFIG, SPLIT, HISTORY):
        assert name in rundir.__doc__, name  # the documented layout lists every file


def test_cpu_and_unknown_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("cpu", _Launch(4, 2)) == torch.device("cpu")
    with pytest.raises(UsageError, match="unknown device 'gpu'; expected cpu or cuda"):
        resolve_device("gpu")


def test_cuda_without_cuda_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"device 'cuda:1' requested but CUDA is not available") as err:
        resolve_device("cuda:1")
    assert "\n" not in str(err.value)


def test_cuda_under_torchrun_is_the_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("cuda", _Launch(4, 3)) == torch.device("cuda", 3)
    assert resolve_device("cuda", _Launch(1, 0)) == torch.device("cuda")
    assert resolve_device("cuda:1", _Launch(4, 3)) == torch.device("cuda", 1)  # an explicit index wins


def test_best_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert best_model(run) == run  # unfinished: left for the caller's error
    (run / BEST).write_bytes(b"x")
    assert best_model(run) == run / BEST
    assert best_model(str(run)) == run / BEST
    assert best_model(run / BEST) == run / BEST
    assert best_model(tmp_path / "model.pt") == tmp_path / "model.pt"


@pytest.mark.parametrize("module", ["evaluate", "predict", "ensemble", "screen", "train"])
def test_run_folder_names_come_from_rundir(module):
    """No stage defines the run-folder file names itself, and none takes the device helper from train."""
    src = (PACKAGE / f"{module}.py").read_text()
    assert not re.search(r"^\s*(LAST|BEST|CONFIG|SPLIT|HISTORY)\b[^=\n]*=", src, re.M)
    assert not re.search(r"^def resolve_device\b", src, re.M)
    assert not re.search(r"from cgnn_dgl\.train import [^\n]*\b(resolve_device|LAST|BEST|CONFIG|SPLIT|HISTORY)\b", src)


def test_rundir_does_not_import_the_training_loop():
    code = "import sys, cgnn_dgl.rundir; print('cgnn_dgl.train' in sys.modules, 'dgl' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=PACKAGE.parent)
    assert out.stdout.split() == ["False", "False"]
