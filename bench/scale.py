"""One refresh's bookkeeping at the data sets' real sizes: peak memory and time per stage.

"Bookkeeping" is everything the refresh does after the forward pass: the GMM over the pool's
losses, the neighbour search over its features, the mixing weights and PartnerTable, and the
EMA of the soft targets over the pool. Inputs are synthetic, made in the measuring process:

- targets: the soft-target store of all N samples, ``soft_targets(labels, C)`` with the
  storage "auto" picks (float32 at Clothing1M's 1M x 14, float16 at WebVision's N x 1000);
- features: the pool's (P, D) float16 features, shaped like penultimate-layer features
  (``penultimate_half``: C clusters in a 32-d latent space, mapped to D dims, plus 10% noise);
- losses (P,) float32 from a two-mode mixture; predictions for the EMA made a chunk of 8,192
  rows at a time (softmax of N(0, 3^2) logits, +8 on the sample's label), as the streaming
  refresh will hand them over (their making is not timed).

Memory: every configuration runs in a fresh process. ``held`` = the bytes the refresh must
hold: the store (targets + given labels, ``store.nbytes``) plus the features (P x D x 2).
``peak / held`` = (peak RSS during the refresh - the process's RSS after the imports, before
any input exists) / held: the inputs themselves count 1.0, the rest is the refresh's own
overhead. The peak is restarted once the inputs exist (``/proc/self/clear_refs``), so that the
temporaries of making the synthetic inputs do not count.

    python -m bench.scale                    # (a) Clothing1M pool, (b) WebVision series + extrapolation
    python -m bench.scale --sweep            # neighbour settings on the Clothing1M pool: time, recall@1
    python -m bench.scale --quick            # smoke run, small sizes

(a) N = 1M samples, P = 128k pool, D = 2048, C = 14. (b) N = P, D = 1536, C = 1000, at
doubling sizes up to the largest whose predicted peak fits in 70% of this machine's memory
(capped at WebVision's 2.4M), then extrapolated to 2.4M: linear in N for the GMM, weights
and EMA, and the measured power law for the neighbour search (and N log N for comparison).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/refresh_gmm.py

THREADS = 2
TARGET = {"seconds": 5.0, "peak_over_held": 1.5}
WEBVISION = 2_400_000
STAGES = ("gmm", "neighbours", "weights", "targets")


def current_rss() -> int:
    """Resident bytes of this process now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident bytes of this process (VmHWM) since the last :func:`reset_peak_rss`, else
    since it started (ru_maxrss, in KiB on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Restart the peak at the current RSS (Linux >= 4.0: ``echo 5 > /proc/self/clear_refs``), so
    that making the inputs, whose temporaries are no part of the refresh, does not set it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def penultimate_half(n: int, d: int, *, clusters: int, latent: int = 32, noise: float = 0.1, seed: int = 0,
                     chunk: int = 1024):
    """(float16 ndarray (n, d), labels (n,) int64): ``clusters`` Gaussian clusters (centres
    N(0, 3^2 I), unit spread) in a ``latent``-d space, mapped to d dims by a random linear map,
    plus isotropic noise of ``noise`` x the mapped features' per-coordinate RMS spread. Made a
    chunk of rows at a time, so the float64 temporaries stay small."""
    import numpy as np

    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (clusters, latent))
    mapping = rng.normal(0.0, 1.0 / np.sqrt(latent), (latent, d))
    labels = rng.integers(0, clusters, n)
    # the mapped spread, from the model: per latent coordinate, centre variance 9 + unit spread
    scale = math.sqrt(10.0 * float(np.square(mapping).sum(axis=0).mean()))
    out = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        z = centres[labels[s:e]] + rng.normal(size=(e - s, latent))
        out[s:e] = z @ mapping + rng.normal(0.0, noise * scale, (e - s, d))
    return out, labels


# ----------------------------------------------------------------------------- the measured process
def child(job: dict) -> dict:
    """Run one configuration in this (fresh) process and return its measurements."""
    import torch

    from mixnn_fast.refresh.gmm import clean_probability
    from mixnn_fast.refresh.neighbours import NeighbourIndex, recall_at_k
    from mixnn_fast.refresh.partners import PartnerTable
    from mixnn_fast.refresh.targets import soft_targets
    from mixnn_fast.refresh.weights import mixing_weights

    torch.set_num_threads(THREADS)
    n, p, d, c = job["N"], job["P"], job["D"], job["C"]
    # A tiny refresh first: libraries allocate on first use (LAPACK, OpenMP pools, hnswlib), which
    # belongs with the imports, not with the refresh's overhead.
    tiny = torch.from_numpy(penultimate_half(600, 64, clusters=4, seed=1)[0])
    NeighbourIndex(tiny, num_threads=THREADS, pca_dim=8).query_all(1)
    clean_probability(torch.rand(600))
    soft_targets(torch.zeros(600, dtype=torch.int64), c, start_epoch=0).update(
        torch.arange(600), torch.full((600, c), 1.0 / c), 0)
    del tiny
    before = current_rss()
    gen = torch.Generator().manual_seed(0)
    features, cluster = penultimate_half(p, d, clusters=c, seed=job.get("seed", 0))
    features = torch.from_numpy(features)
    labels = torch.randint(0, c, (n,), generator=gen)
    pool = torch.randperm(n, generator=gen)[:p].sort().values
    labels[pool] = torch.from_numpy(cluster)  # the pool's labels follow its feature clusters
    store = soft_targets(labels, c, storage=job.get("storage", "auto"), start_epoch=0)
    noisy = torch.rand(p, generator=gen) < 0.3
    losses = torch.where(noisy, 2.5 + 0.8 * torch.randn(p, generator=gen),
                         0.3 + 0.2 * torch.randn(p, generator=gen)).abs_()
    held = store.nbytes + features.numel() * features.element_size()
    after_inputs = current_rss()
    peak_was_reset = reset_peak_rss()
    seconds, cpu = {}, {}

    def timed(name, fn):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - start_cpu
        return out

    clean = timed("gmm", lambda: clean_probability(losses))
    options = dict(job.get("neighbours", {}))
    sorted_insertion = options.pop("sorted_insertion", False)
    if sorted_insertion:
        _sort_insertion()
    profile = {}

    def search():
        index = NeighbourIndex(features, num_threads=THREADS, **options)
        found = index.query_all(1)
        profile.update(index.seconds)
        return found  # the index (graph, projected vectors) goes here, as the refresh lets it go

    partners = timed("neighbours", search)
    table = timed("weights", lambda: PartnerTable.build(pool, pool[partners], mixing_weights(clean, partners), n))
    chunk = 8192
    for s in range(0, p, chunk):
        ids = pool[s:s + chunk]
        logits = 3.0 * torch.randn(len(ids), c, generator=gen)
        logits[torch.arange(len(ids)), labels[ids]] += 8.0
        probabilities = torch.softmax(logits, dim=1)
        timed("targets", lambda: store.update(ids, probabilities, 0))
    peak = peak_rss()
    result = {"N": n, "P": p, "D": d, "C": c, "storage": store.storage, "held_bytes": held,
              "inputs_bytes_rss": after_inputs - before, "peak_over_before_bytes": peak - before,
              "peak_from": "refresh only (VmHWM reset after the inputs)" if peak_was_reset else "process (ru_maxrss)",
              "peak_over_held": (peak - before) / held, "seconds": seconds, "cpu_seconds": cpu,
              "total_s": sum(seconds.values()), "total_cpu_s": sum(cpu.values()), "neighbour_profile": profile,
              "table_rows": len(table)}
    if job.get("recall_sample"):
        result["recall@1"] = recall_at_k(partners, features, sample=job["recall_sample"], seed=1)
    return result


def _sort_insertion() -> None:
    """For the sweep: hnswlib gets the graph vectors in the order of their first coordinate (the
    top principal axis), which puts neighbours near each other in its memory (labels stay ids)."""
    import numpy as np
    import torch

    from mixnn_fast.refresh.neighbours import hnsw

    def sorted_init(self, vectors, n, *, M, ef_construction, ef, num_threads, seed):
        import hnswlib

        whole = torch.cat([block for _, block in vectors]).numpy()
        order = np.argsort(whole[:, 0], kind="stable")
        self.ef, self.num_threads = ef, num_threads
        self.index = hnswlib.Index(space="l2", dim=whole.shape[1])
        self.index.init_index(max_elements=n, M=M, ef_construction=ef_construction, random_seed=seed)
        self.index.add_items(np.ascontiguousarray(whole[order]), order, num_threads=num_threads)

    hnsw.HnswSearcher.__init__ = sorted_init


def run_child(job: dict) -> dict:
    """``job`` in a fresh interpreter (clean peak RSS); its JSON result."""
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--child", json.dumps(job)], capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise RuntimeError(f"child {job} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the parent
SWEEP = [
    ("defaults", {}),
    ("pca_dim=32", {"pca_dim": 32}),
    ("pca_sample=4096", {"pca_sample": 4096}),
    ("efC=32, 8 cand.", {"ef_construction": 32, "candidates": 8}),
    ("M=12, efC=48, ef=24, 8 cand.", {"M": 12, "ef_construction": 48, "ef": 24, "candidates": 8}),
    ("sorted insertion", {"sorted_insertion": True}),
    ("sorted insertion, ef=24", {"sorted_insertion": True, "ef": 24}),
]


def row_of(label: str, result: dict) -> dict:
    row = {"case": label, "N": result["N"], "P": result["P"], "D": result["D"], "C": result["C"],
           "storage": result["storage"], "held_MiB": result["held_bytes"] / 2**20,
           "peak_MiB": result["peak_over_before_bytes"] / 2**20, "peak/held": result["peak_over_held"]}
    for stage in STAGES:
        row[f"{stage}_s"] = result["seconds"].get(stage, float("nan"))
    row["total_s"], row["total_cpu_s"] = result["total_s"], result["total_cpu_s"]
    for stage in ("pca_fit", "pca_project", "build", "search", "rerank"):
        row[f"nn_{stage}_s"] = result["neighbour_profile"].get(stage, float("nan"))
    if "recall@1" in result:
        row["recall@1"] = result["recall@1"]
    return row


def fit_power(sizes, values) -> tuple[float, float]:
    """Least-squares ``value = a * size**b`` on logs: (a, b)."""
    xs, ys = [math.log(s) for s in sizes], [math.log(max(v, 1e-9)) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(1e-12, sum((x - mx) ** 2 for x in xs))
    return math.exp(my - b * mx), b


def extrapolate(rows: list[dict], target_n: int) -> dict:
    """Per stage, the prediction at ``target_n`` from the measured (N, seconds) series: linear
    (from the largest size) for gmm, weights and targets; for the neighbours, the fitted power law
    and N log N from the largest size; the spread of the consecutive-size exponents as the range."""
    sizes = [r["N"] for r in rows]
    big = rows[-1]
    out = {"N": target_n, "from_sizes": sizes}
    for stage in STAGES:
        values = [r[f"{stage}_s"] for r in rows]
        a, b = fit_power(sizes, values)
        steps = [math.log(v2 / v1) / math.log(n2 / n1) for (n1, v1), (n2, v2) in
                 zip(zip(sizes, values), zip(sizes[1:], values[1:])) if v1 > 0 and v2 > 0]
        linear = big[f"{stage}_s"] * target_n / big["N"]
        entry = {"exponent": b, "exponent_range": [min(steps, default=b), max(steps, default=b)],
                 "linear_s": linear, "power_s": a * target_n ** b,
                 "power_range_s": [big[f"{stage}_s"] * (target_n / big["N"]) ** e
                                   for e in (min(steps, default=b), max(steps, default=b))]}
        if stage == "neighbours":
            entry["nlogn_s"] = big[f"{stage}_s"] * target_n * math.log(target_n) / (big["N"] * math.log(big["N"]))
        out[stage] = entry
    ratio = [r["peak/held"] for r in rows]
    out["peak/held"] = {"measured": ratio, "predicted": ratio[-1]}
    return out


def webvision_sizes(quick: bool) -> list[int]:
    """Doubling sizes up to the largest whose peak (5 KiB per sample held, x1.3 overhead, plus
    1 GiB for the interpreter and libraries) fits in 70% of this machine's memory, capped at 2.4M."""
    if quick:
        return [4_000, 8_000]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_sample = 1.3 * (1000 * 2 + 1536 * 2 + 8)
    largest = min(WEBVISION, int((0.7 * total - 2 ** 30) / per_sample))
    sizes = [s for s in (250_000, 500_000, 1_000_000) if s < largest]
    return sizes + [largest]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="smoke run at small sizes")
    parser.add_argument("--sweep", action="store_true", help="neighbour settings on the Clothing1M pool")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each configuration (fresh processes)")
    parser.add_argument("--skip-webvision", action="store_true")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from bench.common import report, rotated

    load_before = os.getloadavg()
    clothing = dict(N=20_000, P=4_096, D=256, C=14) if args.quick else dict(N=1_000_000, P=128_000, D=2048, C=14)
    rows, extra = [], {"threads": THREADS, "target": TARGET, "load_before": load_before}
    if args.sweep:
        configs = SWEEP if not args.quick else SWEEP[:2]
        results = {label: [] for label, _ in configs}
        for round_index in range(args.rounds):
            for label, options in rotated(configs, round_index):
                result = run_child({**clothing, "neighbours": options, "recall_sample": 2000})
                results[label].append(result)
                print(f"round {round_index} {label}: neighbours {result['seconds']['neighbours']:.2f} s "
                      f"(CPU {result['cpu_seconds']['neighbours']:.2f}), recall@1 {result['recall@1']:.4f}, "
                      f"peak/held {result['peak_over_held']:.3f}, load {os.getloadavg()[0]:.1f}", flush=True)
        for label, _ in configs:
            for i, result in enumerate(results[label]):
                rows.append({**row_of(label, result), "round": i,
                             "neighbours_cpu_s": result["cpu_seconds"]["neighbours"]})
        columns = ["case", "round", "neighbours_s", "neighbours_cpu_s", "nn_pca_fit_s", "nn_pca_project_s",
                   "nn_build_s", "nn_search_s", "nn_rerank_s", "recall@1", "peak/held"]
        extra["load_after"] = os.getloadavg()
        report("scale_sweep" + ("_quick" if args.quick else ""), rows, columns, extra=extra)
        return

    for round_index in range(args.rounds):
        result = run_child({**clothing, "recall_sample": 1000 if not args.quick else 200})
        rows.append({**row_of("(a) Clothing1M pool", result), "round": round_index})
        print(f"(a) round {round_index}: total {result['total_s']:.2f} s, peak/held {result['peak_over_held']:.3f}, "
              f"load {os.getloadavg()[0]:.1f}", flush=True)
    webvision = []
    if not args.skip_webvision:
        for n in webvision_sizes(args.quick):
            size = dict(N=n, P=n, D=1536 if not args.quick else 128, C=1000 if not args.quick else 300)
            result = run_child({**size, "recall_sample": 300})
            webvision.append({**row_of("(b) WebVision", result), "round": 0})
            print(f"(b) N = {n:,}: total {result['total_s']:.1f} s, peak/held {result['peak_over_held']:.3f}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        rows += webvision
    columns = ["case", "round", "N", "P", "D", "C", "storage", "held_MiB", "peak_MiB", "peak/held", "gmm_s",
               "neighbours_s", "weights_s", "targets_s", "total_s", "total_cpu_s", "nn_pca_fit_s", "nn_pca_project_s",
               "nn_build_s", "nn_search_s", "nn_rerank_s", "recall@1"]
    if len(webvision) >= 2:
        fitted = webvision[:-1] if webvision[-1]["N"] == WEBVISION and len(webvision) >= 3 else webvision
        extra["extrapolation_to_2.4M"] = extrapolate(fitted, WEBVISION)
        print("\nextrapolation to 2.4M from N =", [r["N"] for r in fitted])
        print(json.dumps(extra["extrapolation_to_2.4M"], indent=1))
    extra["load_after"] = os.getloadavg()
    report("scale" + ("_quick" if args.quick else ""), rows, columns, extra=extra)


if __name__ == "__main__":
    main()
