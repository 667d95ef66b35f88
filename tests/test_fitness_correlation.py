"""scripts/fitness_correlation.py keeps every scored candidate in --work and resumes from it (no model built)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from scripts import fitness_correlation as fc


def _args(work: Path, **kw: object) -> argparse.Namespace:
    base = dict(model="zimage-fmnist", budget="50%", candidates=4, samples=32, seed=0, compensate=False, around=None)
    return argparse.Namespace(work=work, **{**base, **kw})


def test_rows_collected_in_order_and_other_settings_refused(tmp_path: Path) -> None:
    work = fc.work_dir(_args(tmp_path / "w"))
    for i in (2, 0):
        (work / f"cand-{i}.json").write_text(json.dumps({"index": i, "kind": "local"}))
    (work / "teacher.json").write_text(json.dumps({"class_acc": 0.99}))
    res = fc.collect(work)
    assert [r["index"] for r in res["rows"]] == [0, 2]
    assert res["teacher"] == {"class_acc": 0.99}
    assert fc.work_dir(_args(work)) == work  # same settings: resumed
    with pytest.raises(SystemExit, match="candidates"):
        fc.work_dir(_args(work, candidates=8))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"genome": {"levels": [1, 2]}}))
    with pytest.raises(SystemExit, match="around"):
        fc.work_dir(_args(work, around=plan))


def test_spearman_and_ranks() -> None:
    a = np.array([1.0, 2.0, 2.0, 5.0])
    assert fc.ranks(a).tolist() == [0.0, 1.5, 1.5, 3.0]
    assert fc.spearman(a, -a) == pytest.approx(-1.0)
    assert fc.spearman(np.arange(5.0), np.array([0.0, 2, 1, 3, 4])) == pytest.approx(0.9)
