"""Clean probability on 10^6 losses: our torch EM (GMM1D) against scikit-learn's GaussianMixture.

Same run, same data, same settings (max_iter=10, tol=1e-2, reg_covar=5e-4, the
DivideMix/MixNN reference), 2 threads for torch and for scikit-learn's BLAS/OpenMP.

Rows:
- "same init": both start from identical means / variances / weights (ours from
  GMM1D's k-means, handed to scikit-learn as means_init / precisions_init /
  weights_init). This isolates the EM; the posterior difference is the honest one.
  scikit-learn is given init_params="random_from_data" there because with all three
  *_init set its k-means result is thrown away (it would still be computed).
- "recipe": the whole per-epoch step as DivideMix/MixNN run it, k-means init
  included: min-max normalise, fit, posterior of the lower-mean component.
  The k-means++ draws differ (numpy vs torch generator), so the difference also
  contains the two k-means stopping points.

    python -m bench.refresh_gmm [--n 1000000] [--repeats 5] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import warnings

# Before torch loads its OpenMP runtime: idle workers sleep instead of spinning. On a
# machine shared with other busy processes (ours: 2 cores, several agents), spinning
# workers lose their core and every parallel op then waits a scheduler tick for them;
# measured here, 2-thread EM went from ~1.0 s to ~0.2 s under load. The same setting
# applies to scikit-learn's OpenMP. Override by setting the variable yourself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from bench.common import report, time_call
from mixnn_fast.refresh.gmm import GMM1D, clean_probability

SETTINGS = {"max_iter": 10, "tol": 1e-2, "reg_covar": 5e-4}
THREADS = 2


def bimodal_losses(n: int, seed: int = 0) -> np.ndarray:
    """Per-sample losses shaped like a noisy-label epoch: 60% clean (low, tight), 40% noisy (high, wide)."""
    rng = np.random.default_rng(seed)
    n_clean = int(0.6 * n)
    clean = rng.gamma(2.0, 0.15, n_clean)
    noisy = np.abs(rng.normal(2.5, 0.8, n - n_clean))
    return rng.permutation(np.concatenate([clean, noisy]))


def sklearn_recipe(losses: np.ndarray) -> np.ndarray:
    x = ((losses - losses.min()) / (losses.max() - losses.min()))[:, None]
    gmm = GaussianMixture(n_components=2, random_state=0, **SETTINGS).fit(x)
    return gmm.predict_proba(x)[:, gmm.means_.argmin()]


def sklearn_same_init(x: np.ndarray, init: dict) -> np.ndarray:
    gmm = GaussianMixture(n_components=2, init_params="random_from_data",
                          means_init=np.asarray(init["means_init"])[:, None],
                          precisions_init=1.0 / np.asarray(init["variances_init"])[:, None, None],
                          weights_init=np.asarray(init["weights_init"]), **SETTINGS).fit(x[:, None])
    return gmm.predict_proba(x[:, None])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="100,000 losses, 3 repeats (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.n, args.repeats = 100_000, 3
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # max_iter=10 is the recipe
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    losses = bimodal_losses(args.n)
    normalised = (losses - losses.min()) / (losses.max() - losses.min())
    losses_t = torch.from_numpy(losses).float().to(device)  # the losses a training loop holds
    normalised_t = torch.from_numpy(normalised).to(device)
    # the shared initial parameters: GMM1D's k-means estimates (max_iter=0 keeps them)
    start = GMM1D(max_iter=0, dtype=torch.float64).fit(normalised_t)
    init = {"means_init": start.means_.tolist(), "variances_init": start.variances_.tolist(),
            "weights_init": start.weights_.tolist()}

    rows = []
    with threadpool_limits(limits=THREADS):
        expected = sklearn_same_init(normalised, init)
        sk_time = time_call(lambda: sklearn_same_init(normalised, init), repeats=args.repeats, warmup=1)
        rows.append({"step": "same init", "implementation": "scikit-learn GaussianMixture", "dtype": "float64",
                     "median_s": sk_time["median"], "min_s": sk_time["min"], "speedup": 1.0,
                     "max_abs_posterior_diff": 0.0})
        for dtype in (torch.float32, torch.float64):
            model = GMM1D(dtype=dtype, **SETTINGS, **init)
            ours = model.fit_predict_proba(normalised_t).double().cpu().numpy()
            t = time_call(lambda: model.fit_predict_proba(normalised_t), repeats=args.repeats, warmup=1, sync=sync)
            rows.append({"step": "same init", "implementation": f"mixnn_fast GMM1D ({device.type})",
                         "dtype": str(dtype).replace("torch.", ""), "median_s": t["median"], "min_s": t["min"],
                         "speedup": sk_time["median"] / t["median"],
                         "max_abs_posterior_diff": float(np.abs(ours - expected).max())})

        expected = sklearn_recipe(losses)
        sk_time = time_call(lambda: sklearn_recipe(losses), repeats=args.repeats, warmup=1)
        rows.append({"step": "recipe (k-means init)", "implementation": "scikit-learn GaussianMixture",
                     "dtype": "float64", "median_s": sk_time["median"], "min_s": sk_time["min"], "speedup": 1.0,
                     "max_abs_posterior_diff": 0.0})
        for dtype in (torch.float32, torch.float64):
            ours = clean_probability(losses_t, dtype=dtype).double().cpu().numpy()
            t = time_call(lambda: clean_probability(losses_t, dtype=dtype), repeats=args.repeats, warmup=1,
                          sync=sync)
            rows.append({"step": "recipe (k-means init)", "implementation": f"mixnn_fast clean_probability "
                         f"({device.type})", "dtype": str(dtype).replace("torch.", ""), "median_s": t["median"],
                         "min_s": t["min"], "speedup": sk_time["median"] / t["median"],
                         "max_abs_posterior_diff": float(np.abs(ours - expected).max())})

    report("refresh_gmm", rows, ["step", "implementation", "dtype", "median_s", "min_s", "speedup",
                                 "max_abs_posterior_diff"],
           extra={"n": args.n, "threads": THREADS, "settings": SETTINGS, "repeats": args.repeats,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")})


if __name__ == "__main__":
    main()
