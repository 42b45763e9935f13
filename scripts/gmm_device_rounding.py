#!/usr/bin/env python3
"""How far GMM1D's float32 fits on a device stray from scikit-learn, as a fraction of the rounding
tolerance that tests/test_gmm.py allows, for the two ways of summing the M-step's statistics (one
float32 matmul per chunk, or the products summed in float64); each op's own rounding in eps; and
the time of both ways.  Without CUDA it compares the two ways on the CPU.

    python3 scripts/gmm_device_rounding.py OUT.json [TRIALS]      (TRIALS: default 6, 6 fits each)

It produced the figures in docs/testing.md ("On a GPU"); it imports the tests' reference helpers.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import test_gmm as reference  # noqa: E402  (the tests' tolerance model and scikit-learn helpers)
from mixnn_fast.refresh import gmm_numerics  # noqa: E402
from mixnn_fast.refresh.gmm import GMM1D  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def use_float64_sums(flag: bool) -> None:
    """Make every following fit sum its statistics one way, whatever its device."""
    gmm_numerics.float64_sums_for = lambda device: flag


def fit_errors(rng: np.random.Generator, trials: int, modes: list[tuple[str, str, bool]]) -> list[dict]:
    """Per random problem: max |posterior - scikit-learn's| / the test's tolerance, per mode."""
    rows = []
    for _ in range(trials):
        for shape in ("unimodal", "bimodal"):
            for n in (1001, 12295, 30011):
                x = (reference.bimodal if shape == "bimodal" else reference.unimodal)(rng, n)
                init = reference.random_init(rng, x)
                theirs = reference.sklearn_gmm(x, init).predict_proba(x[:, None])
                tol = reference.rounding_tolerances(x, *reference.against_sklearn(torch.float32), **init).posterior
                row = {"shape": shape, "n": n, "tol": tol}
                for name, device, float64_sums in modes:
                    use_float64_sums(float64_sums)
                    ours = GMM1D(dtype=torch.float32, **init).fit_predict_proba(torch.from_numpy(x).to(device))
                    row[name] = float(np.abs(ours.double().cpu().numpy() - theirs).max() / tol)
                rows.append(row)
    return rows


def op_errors(rng: np.random.Generator, device: str) -> dict:
    """Each float32 op of an EM step against float64 on the same inputs, in eps32 of the terms' size."""
    ops = {"allow_tf32": torch.backends.cuda.matmul.allow_tf32,
           "matmul_precision": torch.get_float32_matmul_precision()}
    x = torch.from_numpy(reference.unimodal(rng, 30011))
    for float64_sums in (False, True):
        data = gmm_numerics.Standardised(x.to(device), torch.float32, float(x.min()), float(x.max()),
                                         float64_sums=float64_sums)
        resp = torch.rand_like(data.resp)
        ours = torch.tensor(data.moments(resp), dtype=torch.float64)
        products = resp.double().cpu().unsqueeze(2) * data.design.double().cpu().unsqueeze(1)
        error = (ours - products.sum((0, 3))).abs() / products.abs().sum((0, 3))
        ops[f"moments float64_sums={float64_sums}"] = float(error.max() / EPS32)
    coefficients = torch.randn(2, 3)
    chunks = data.design.shape[0]
    log_odds = torch.bmm(coefficients.to(device).expand(chunks, 2, 3), data.design).double().cpu()
    design = data.design.double().cpu()
    exact = torch.bmm(coefficients.double().expand(chunks, 2, 3), design)
    size = torch.bmm(coefficients.double().abs().expand(chunks, 2, 3), design.abs()).clamp_min(1e-30)
    ops["e_step log-odds"] = float(((log_odds - exact).abs() / size).max() / EPS32)
    z = torch.randn(10**6) * 8
    exact_sigmoid = torch.sigmoid(z.double())
    ops["sigmoid (relative)"] = float(((torch.sigmoid(z.to(device)).double().cpu() - exact_sigmoid).abs()
                                       / exact_sigmoid).max() / EPS32)
    return ops


def timings(device: str) -> dict:
    """Median milliseconds of one moments() pass and one whole fit, both ways, at two sizes."""
    def synchronise():
        if device == "cuda":
            torch.cuda.synchronize()

    result = {}
    for n in (10**6, 2_400_000):
        x = torch.rand(n, device=device)
        for float64_sums in (False, True):
            use_float64_sums(float64_sums)
            data = gmm_numerics.Standardised(x, torch.float32, 0.0, 1.0)
            resp = torch.rand_like(data.resp)
            for what, call in (("moments", lambda: data.moments(resp)),
                               ("fit", lambda: GMM1D(dtype=torch.float32, seed=0).fit_predict_proba(x))):
                seconds = []
                for _ in range(7):
                    synchronise()
                    start = time.perf_counter()
                    call()
                    synchronise()
                    seconds.append(time.perf_counter() - start)
                result[f"{what} n={n} float64_sums={float64_sums}"] = statistics.median(seconds[2:]) * 1e3
    return result


def main() -> None:
    out = Path(sys.argv[1])
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = [("cpu_matmul", "cpu", False)]
    modes += ([("cuda_matmul", "cuda", False), ("cuda_float64", "cuda", True)] if device == "cuda"
              else [("cpu_float64", "cpu", True)])
    rng = np.random.default_rng(20261130)
    rows = fit_errors(rng, trials, modes)
    summary = {name: {"max": max(r[name] for r in rows), "median": statistics.median(r[name] for r in rows),
                      "over_1": sum(r[name] > 1 for r in rows)} for name, _, _ in modes}
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "fits": len(rows),
              "summary": summary, "ops_eps": op_errors(rng, device), "timing_ms": timings(device), "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
