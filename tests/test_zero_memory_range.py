"""The DeepSpeed versions the ZeRO-3 fp32 memory saving was checked on are exactly the ones pyproject.toml lets
an install resolve, and a run on any other version is told on the console (not only in the log file) that it
keeps DeepSpeed's separate fp32 master."""

from __future__ import annotations

import pytest
import tomllib
from packaging.requirements import Requirement

from tests.conftest import REPO
from vitpose.train import zero_memory


def zero3_fp32() -> dict:
    return {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}


def test_pyproject_allows_exactly_the_checked_deepspeed_versions():
    import deepspeed

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [Requirement(d).specifier for d in deps if Requirement(d).name == "deepspeed"]
    assert all(spec.contains(v) for v in zero_memory.CHECKED_DEEPSPEED), spec
    newest = max(tuple(int(x) for x in v.split(".")) for v in zero_memory.CHECKED_DEEPSPEED)
    major, minor, patch = newest
    for later in (f"{major}.{minor}.{patch + 1}", f"{major}.{minor + 1}.0", f"{major + 1}.0.0"):
        assert not spec.contains(later), f"pyproject allows DeepSpeed {later}, unchecked ({spec})"
    assert deepspeed.__version__ in zero_memory.CHECKED_DEEPSPEED  # this environment runs the checked one


def test_an_unchecked_deepspeed_is_told_on_the_console_once(tmp_path, monkeypatch, capsys):
    import deepspeed

    from vitpose.run.console import captured

    monkeypatch.setattr(deepspeed, "__version__", "0.99.0")
    monkeypatch.setattr(zero_memory, "_told", False)
    with pytest.warns(RuntimeWarning), captured(tmp_path / "run.log"):
        for _ in range(2):  # one optimizer per build: said once
            with zero_memory.shared_fp32_master(zero3_fp32()) as sharing:
                assert not sharing.applied
    terminal = capsys.readouterr()
    lines = [line for line in (terminal.out + terminal.err).splitlines() if "DeepSpeed 0.99.0" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: DeepSpeed 0.99.0 is not one it was checked on"), lines
    assert "separate fp32 master" in lines[0]
