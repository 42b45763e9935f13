"""``report.html``: self-contained (no network, images inlined), and a real rendered page in a
headless Chromium (skipped where Chromium is not installed).

The page is built from a made-up run (real Fashion-MNIST garments where Debian's package is
installed, drawn shapes otherwise) through the same function a finished run calls, so no
training is needed.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from mixnn_fast.app.report import write_issue_report
from mixnn_fast.audit.run_folder import RecordArrays

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or \
    next((p for p in ("/usr/bin/chromium",) if Path(p).exists()), None)
WIDTH, HEIGHT = 1280, 2400
CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(N, 28, 28, 1) uint8 images and their (N,) true labels."""
    try:
        from fixtures import fashion_mnist_samples

        images, labels = fashion_mnist_samples(n, seed=1)
    except (FileNotFoundError, ImportError):
        labels = rng.integers(0, 10, n)
        yy, xx = np.mgrid[:28, :28]
        images = np.stack([(((yy - 14) ** 2 + (xx - 14) ** 2) < (3 + c) ** 2) * (120 + 12 * c) for c in labels])
    return images.astype(np.uint8)[..., None], labels.astype(np.int64)


def _made_up_run(out: Path, rng: np.random.Generator, n: int = 600, noise: float = 0.4) -> dict:
    """A MixNN-like run's record (the model mostly right, the wrong labels mostly doubted) and
    its report written to ``out``."""
    images, true = _images(n, rng)
    flip = rng.random(n) < noise
    given = np.where(flip, (true + rng.integers(1, 10, n)) % 10, true)
    logits = rng.normal(0, 1, (n, 10))
    logits[np.arange(n), true] += 3.0
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    predicted = probs.argmax(1)
    record = RecordArrays(method="mixnn", classes=CLASSES, given=given, true=true, corrected=predicted,
                          clean_prob=np.clip(probs[np.arange(n), predicted] + rng.normal(0, 0.1, n), 0, 1),
                          clean_prob_given=np.clip(probs[np.arange(n), given] * 1.5, 0, 1),
                          prob_given=probs[np.arange(n), given], predicted=predicted, confidence=probs.max(1),
                          target_given=np.clip(probs[np.arange(n), given] + 0.05, 0, 1))
    out.mkdir(parents=True, exist_ok=True)
    record.save(out / "label_record.npz")
    rows = [{"epoch": e, "test_accuracy": 0.5 + 0.3 * (1 - np.exp(-e / 8))} for e in range(0, 40, 2)]
    summary = {"method": "mixnn", "epochs": 40, "final_test_accuracy": rows[-1]["test_accuracy"],
               "best_test_accuracy": rows[-1]["test_accuracy"], "noise_rate_realised": float(flip.mean())}
    return write_issue_report(out, record, summary, rows=rows, images=images)


def test_report_is_self_contained(tmp_path, rng):
    summary = _made_up_run(tmp_path / "run", rng)
    page = Path(summary["files"]["report"]).read_text()
    sources = re.findall(r"""(?:src|href)=['"]([^'"]*)['"]""", page)
    # every image inlined: the 3 plots (accuracy, histograms, confusion) and the gallery's 24 thumbnails
    assert len(sources) == 3 + 24 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?://|<script|@import|url\(", page)
    for text in ("Top 24 suspected label errors", "given:", "score", "true:", "Finding the wrong labels"):
        assert text in page, text


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, rng):
    summary = _made_up_run(tmp_path / "run", rng)
    page = Path(summary["files"]["report"])
    shot = tmp_path / "report.png"
    # --user-data-dir: a fresh profile, so a Chromium the user has open does not take the job
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
                           f"--window-size={WIDTH},{HEIGHT}", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]

    from PIL import Image

    with Image.open(shot) as im:
        im.load()  # decodes the whole PNG: a truncated file fails here
        assert im.size == (WIDTH, HEIGHT)
        pixels = np.asarray(im.convert("RGB"), dtype=np.int16)
    white = (pixels > 245).all(2)
    # a real page: mostly a white background, but far from blank
    assert 0.05 < 1 - white.mean() < 0.8, 1 - white.mean()
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 500  # text, plots, photos: many colours
    # the gallery's garments on black tiles in the page's upper half (each tile 112 x 112 pixels)
    upper = pixels[: HEIGHT // 2]
    dark_rows = ((upper < 30).all(2).sum(1) >= 112)
    assert dark_rows.sum() >= 112, dark_rows.sum()
    # the content is laid out across the width, not squeezed into a column or overflowing it
    used = np.flatnonzero(~white.all(0))
    assert used.min() < 0.1 * WIDTH and used.max() > 0.75 * WIDTH
