"""``report.html``: one self-contained page per run (and one comparing the demo's runs) that a
person opens instead of reading CSV files — the headline numbers, test accuracy per epoch, the
histograms of the label scores split by right/wrong given labels, the confusion of suggested vs
true labels, and a gallery of the samples most likely mislabelled, each with its image, given
label, suggested label and score.

Everything is inlined (PNG as base64 data URIs, CSS in a <style> element, no script, no web
fonts), so the file opens offline, can be mailed, and never reaches the network.
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

GALLERY_SIZE = 24
THUMBNAIL = 112  # pixels per side: 28x28 Fashion-MNIST scaled by 4 with square pixels

_CSS = """
body { font-family: "DejaVu Sans", Arial, Helvetica, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #1d1d1f; background: #fff; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 24px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 28px 0 8px;
     border-bottom: 2px solid #e5e5e5; padding-bottom: 4px; } h3 { font-size: 15px; margin: 18px 0 6px; }
p.sub { color: #555; margin: 0 0 16px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 8px 0 4px; }
.card { background: #f5f6f8; border-radius: 8px; padding: 10px 14px; min-width: 150px; }
.card .v { font-size: 22px; font-weight: bold; } .card .k { font-size: 12px; color: #555; }
table.t { border-collapse: collapse; font-size: 14px; margin: 6px 0; }
table.t th, table.t td { border: 1px solid #ddd; padding: 5px 10px; text-align: right; }
table.t th:first-child, table.t td:first-child, table.t td.from, table.t th.from { text-align: left; }
table.t td.from { font-size: 12px; color: #444; max-width: 360px; }
table.t th { background: #f0f1f3; } td.best { font-weight: bold; }
img.fig { width: 100%; height: auto; border: 1px solid #eee; }
.figs { display: grid; grid-template-columns: 1fr 1fr; gap: 14px; align-items: start; }
.figs figure { margin: 0; } .figs figure.wide { grid-column: 1 / -1; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(132px, 1fr)); gap: 10px; }
.cols { display: grid; gap: 18px; align-items: start; } .cols > div > h3 { margin-top: 6px; }
.cols figure { margin: 0; }
.item { border: 1px solid #ddd; border-radius: 8px; padding: 7px 4px; text-align: center; font-size: 12px;
        background: #fff; }
.item img { width: 112px; height: 112px; image-rendering: pixelated; display: block; margin: 0 auto 6px;
            border-radius: 4px; background: #000; }
.item .given { color: #b3261e; }
.item .sugg { color: #0b6b2f; font-weight: bold; }
.item .score { color: #333; } .item .id { font-size: 10px; color: #777; } .item .truth { font-size: 12px; color: #666; margin-top: 3px; }
.tag { display: inline-block; font-size: 11px; border-radius: 10px; padding: 1px 7px; margin-top: 4px; }
.tag.hit { background: #dff3e4; color: #0b6b2f; } .tag.miss { background: #fde7e4; color: #8c1d18; }
.note { font-size: 13px; color: #555; }
"""


def data_uri(png: bytes) -> str:
    """A PNG's bytes as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def file_uri(path: str | Path) -> str:
    """A PNG file inlined as a data URI."""
    return data_uri(Path(path).read_bytes())


def thumbnail_png(image, size: int = THUMBNAIL) -> bytes:
    """A square PNG of ``size`` pixels from an image: an (H, W) or (H, W, C) uint8 array (C = 1
    or 3) or the path of an encoded file.  Small images are enlarged with square pixels
    (nearest neighbour), so a 28x28 image stays sharp; larger ones are reduced smoothly."""
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            picture = im.convert("RGB")
    else:
        a = np.asarray(image)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        picture = Image.fromarray(np.ascontiguousarray(a.astype(np.uint8)))
    picture.thumbnail((size, size), Image.LANCZOS) if max(picture.size) > size else None
    if max(picture.size) < size:
        scale = size / max(picture.size)
        picture = picture.resize((max(1, round(picture.size[0] * scale)), max(1, round(picture.size[1] * scale))),
                                 Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@dataclass
class GalleryItem:
    """One suspected label error: its image (data URI), given and suggested class names, the
    suggestion's confidence, the score, and the true class name where known."""

    sample_id: int
    image: str
    given: str
    suggested: str
    confidence: float
    score: float
    flagged: bool
    true: str | None = None


def gallery_items(issues, classes: Sequence[str], image_of: Callable[[int], object], *, k: int = GALLERY_SIZE,
                  true_labels: np.ndarray | None = None) -> list[GalleryItem]:
    """The ``k`` flagged samples most likely mislabelled (``issues``: a LabelIssues), with their
    images from ``image_of(sample index)`` (an array or a file path)."""
    picked = [int(i) for i in issues.order if issues.is_label_issue[i]][:k]
    items = []
    for i in picked:
        try:
            image = data_uri(thumbnail_png(image_of(i)))
        except OSError:
            image = ""  # an unreadable file: the card says so instead of failing the report
        items.append(GalleryItem(sample_id=i, image=image, given=classes[int(issues.given_label[i])],
                                 suggested=classes[int(issues.suggested_label[i])],
                                 confidence=float(issues.suggested_confidence[i]), score=float(issues.score[i]),
                                 flagged=bool(issues.is_label_issue[i]),
                                 true=None if true_labels is None else classes[int(true_labels[i])]))
    return items


@dataclass
class RunPage:
    """What one run's section shows.  name: a heading (e.g. the method); cards: headline
    numbers (label -> text); audit: rows of the audit table (name -> metrics dict from
    ``evaluate_issues``, plus ``seconds`` and ``inputs``) or None; figures: caption -> PNG path,
    two per row except the ``wide`` ones; gallery: the suspected errors; notes: sentences shown
    under the heading."""

    name: str
    cards: dict[str, str] = field(default_factory=dict)
    audit: dict[str, dict] | None = None
    figures: dict[str, Path] = field(default_factory=dict)
    gallery: list[GalleryItem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wide: tuple[str, ...] = ()  # captions of figures that take the page's whole width
    # caption -> percent of the row a figure's image takes (a 2-panel histogram is drawn at 2/3 of
    # the width of a 3-panel one, so both show their panels at one size)
    widths: dict[str, float] = field(default_factory=dict)


def _e(text) -> str:
    return html.escape(str(text))


def _seconds(value) -> str:
    if value is None or value != value:
        return "–"
    return "< 0.1" if value < 0.05 else f"{value:.1f}"  # a pass over saved arrays is not "0 seconds"


def audit_table(rows: dict[str, dict]) -> str:
    """The audit table (ours vs cleanlab): precision, recall, F1, AUROC, flagged, seconds; the
    better value of each quality column in bold."""
    keys = (("precision", "precision"), ("recall", "recall"), ("f1", "F1"), ("auroc", "AUROC"))
    scored = {n: m for n, m in rows.items() if "f1" in m}
    best = {k: max((m[k] for m in scored.values() if m[k] == m[k]), default=None) for k, _ in keys}
    out = ["<table class='t'><tr><th>audit</th>" + "".join(f"<th>{t}</th>" for _, t in keys) +
           "<th>flagged</th><th>wrong labels</th><th>seconds</th><th class='from'>from</th></tr>"]
    for name, m in rows.items():
        cells = []
        for k, _ in keys:
            v = m.get(k)
            if v is None or v != v:
                cells.append("<td>–</td>")
            else:
                cells.append(f"<td class='{'best' if len(scored) > 1 and v == best[k] else ''}'>{v:.3f}</td>")
        out.append(f"<tr><td>{_e(name)}</td>{''.join(cells)}<td>{m.get('flagged', '–')}</td>"
                   f"<td>{m.get('wrong', '–')}</td><td>{_seconds(m.get('seconds'))}</td>"
                   f"<td class='from'>{_e(m.get('inputs', ''))}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def gallery_html(items: Sequence[GalleryItem]) -> str:
    if not items:
        return "<p class='note'>No sample is flagged.</p>"
    cards = []
    for it in items:
        picture = f"<img src='{it.image}' alt='sample {it.sample_id}'>" if it.image else "<p>(image unreadable)</p>"
        truth = ""
        if it.true is not None:
            hit = it.true != it.given
            tag = ("<span class='tag hit'>label was wrong</span>" if hit
                   else "<span class='tag miss'>label was right</span>")
            truth = f"<div class='truth'>true: {_e(it.true)}</div>{tag}"
        cards.append(f"<div class='item'>{picture}<div class='given'>given: <span>{_e(it.given)}</span></div>"
                     f"<div class='sugg'>→ {_e(it.suggested)} ({it.confidence:.2f})</div>"
                     f"<div class='score'>score {it.score:.3f} <span class='id'>#{it.sample_id}</span></div>"
                     f"{truth}</div>")
    return "<div class='gallery'>" + "\n".join(cards) + "</div>"


def section_html(page: RunPage, *, heading: bool = True) -> str:
    parts = [f"<h2>{_e(page.name)}</h2>"] if heading else []
    parts += [f"<p class='note'>{_e(n)}</p>" for n in page.notes]
    if page.cards:
        parts.append("<div class='cards'>" + "".join(
            f"<div class='card'><div class='v'>{_e(v)}</div><div class='k'>{_e(k)}</div></div>"
            for k, v in page.cards.items()) + "</div>")
    if page.audit:
        parts += ["<h3>Finding the wrong labels</h3>", audit_table(page.audit)]
    if page.gallery:
        parts += [f"<h3>Top {len(page.gallery)} suspected label errors</h3>",
                  "<p class='note'>Most likely wrong first. Red: the given label; green: the suggested label "
                  "and the model's probability for it; score: how likely the given label is wrong (0.5: it gets "
                  "the average probability of labels of its class, 1: none).</p>",
                  gallery_html(page.gallery)]
    if page.figures:
        parts += ["<h3>Training and scores</h3>", "<div class='figs'>" + "".join(
            figure_html(c, p, wide=c in page.wide, width=page.widths.get(c)) for c, p in page.figures.items())
                  + "</div>"]
    return "\n".join(parts)


def figure_html(caption: str, path: str | Path, *, wide: bool = False, width: float | None = None) -> str:
    """A PNG file inlined with its caption (nothing when the file is missing: a run without
    true labels has no confusion plot); ``width``: percent of the row the image takes (default all)."""
    if not path or not Path(path).exists():
        return ""
    style = "" if width is None else f" style='width: {width:.0f}%'"
    return (f"<figure class='{'wide' if wide else ''}'><img class='fig' src='{file_uri(path)}'{style} alt='{_e(caption)}'>"
            f"<figcaption class='note'>{_e(caption)}</figcaption></figure>")


def columns_html(columns: Sequence[tuple[str, str]]) -> str:
    """Side by side: one column per (heading, inner HTML), equal widths, at most 3 to a row (a
    gallery narrower than a third of the page shows too few images a row)."""
    per_row = min(max(1, len(columns)), 3)
    return (f"<div class='cols' style='grid-template-columns: repeat({per_row}, minmax(0, 1fr))'>"
            + "".join(f"<div><h3>{_e(h)}</h3>{inner}</div>" for h, inner in columns) + "</div>")


def runs_table(rows: dict[str, dict[str, str]]) -> str:
    """A plain table: one row per run (name -> column -> text), the columns of the first row."""
    if not rows:
        return ""
    keys = list(next(iter(rows.values())))
    out = ["<table class='t'><tr><th>run</th>" + "".join(f"<th>{_e(k)}</th>" for k in keys) + "</tr>"]
    for name, cells in rows.items():
        out.append(f"<tr><td>{_e(name)}</td>" + "".join(f"<td>{_e(cells.get(k, '–'))}</td>" for k in keys) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def page_html(title: str, subtitle: str, sections: Sequence[str]) -> str:
    """A whole self-contained HTML document."""
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{_e(title)}</h1><p class='sub'>{_e(subtitle)}</p>\n" + "\n".join(sections) + "\n</body></html>\n")


def write_html(path: str | Path, title: str, subtitle: str, sections: Sequence[str]) -> Path:
    from mixnn_fast.train.atomic import write_atomic

    write_atomic(path, page_html(title, subtitle, sections).encode("utf-8"))
    return Path(path)
