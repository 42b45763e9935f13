"""The demo (the README's first command) trains CE and MixNN on the real Fashion-MNIST at the
results table's settings, prints the table, and a second run reports the finished runs again."""
from __future__ import annotations

import pytest

from mixnn_fast.data import fashion_mnist
from mixnn_fast.app.demo import DEMO_EPOCHS, DEMO_METHODS, DEMO_SUBSET, demo_cells, run_demo
from mixnn_fast.app.experiments import table_cells


def _fashion_mnist_installed() -> bool:
    try:
        fashion_mnist(split="test")
    except (FileNotFoundError, ValueError):
        return False
    return True


def test_demo_runs_the_tables_sym40_cells(tmp_path):
    demo = {m: c.config for m, c in demo_cells(epochs=DEMO_EPOCHS, subset=DEMO_SUBSET, out_dir=str(tmp_path),
                                               progress=False).items()}
    table = {c.method: c.config for c in table_cells(out_dir=tmp_path, seeds=(0,), methods=DEMO_METHODS,
                                                     plan_pair=False, ablations=False) if c.noise == "sym-40"}
    assert set(demo) == set(DEMO_METHODS) == {"ce", "mixnn", "mixnn_plus"}
    for method in DEMO_METHODS:
        a, b = demo[method].to_dict(), table[method].to_dict()
        assert {k for k in a if a[k] != b[k]} <= {"out_dir", "progress"}


@pytest.mark.skipif(not _fashion_mnist_installed(), reason="Debian's dataset-fashion-mnist is not installed")
def test_quick_demo_trains_once_and_reports_twice(tmp_path, capsys, monkeypatch):
    results = run_demo(epochs=3, subset=300, out_dir=str(tmp_path), progress=False)
    assert set(results) == {"ce", "mixnn", "mixnn_plus"}
    assert all(0 <= r["final_test_accuracy"] <= 1 for r in results.values())
    first = capsys.readouterr().out
    assert "| mixnn |" in first and (tmp_path / "accuracy_by_method.png").stat().st_size > 0
    # one page with both runs' label audits side by side, images inlined
    page = (tmp_path / "report.html").read_text()
    assert "ours (ce)" in page and "ours (mixnn)" in page and "ours (mixnn_plus)" in page and page.count("data:image/png;base64,") >= 5
    assert f"open {tmp_path / 'report.html'}" in first

    class NoTraining:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the demo trained a finished run again")

    monkeypatch.setattr("mixnn_fast.train.trainer.Trainer", NoTraining)
    again = run_demo(epochs=3, subset=300, out_dir=str(tmp_path), progress=False)
    assert {m: r["final_test_accuracy"] for m, r in again.items()} == \
        {m: r["final_test_accuracy"] for m, r in results.items()}
