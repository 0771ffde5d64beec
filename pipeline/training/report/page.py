"""The page: the run at a glance, the tasks' overview, then the sections in the order the
training computed them (strangers and open set, what shipped and why, each task's
validation, selection and test), written as one self-contained ``report.html``."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

from pipeline import storage
from pipeline.contract import CLASSIFICATION
from pipeline.training.report.choice import bundle_validation, choice_html, finetune_html
from pipeline.training.report.fit import validation_rows
from pipeline.training.report.open_set import budget_html, strangers_html
from pipeline.training.report.render import esc, face_key, fmt_num, html_table
from pipeline.training.report.tasks import HEADLINE, headline, headline_row, task_section, thumbnails

if TYPE_CHECKING:
    from pipeline.settings import Settings
    from pipeline.training.outcome import TrainOutcome


def _summary_rows(outcome: "TrainOutcome") -> dict[str, str]:
    """The run at a glance, every value formatted (no raw dicts, no long floats)."""
    m, meta = outcome.metrics, outcome.meta
    split = m.get("split", {})
    return {
        "model_version": meta["model_version"], "created_at": meta["created_at"],
        "data": f"{meta['data']['uri']} ({meta['data']['layout']})",
        "backbone": meta["backbone"]["id"], "photos": fmt_num(outcome.photos), "faces found": fmt_num(outcome.faces),
        "photos without a face (not used)": fmt_num(outcome.no_face),
        "photos with errors": ", ".join(f"{k} {v}" for k, v in outcome.errors.items()) or "none",
        "split train / val / test": " / ".join(fmt_num(split.get(k, 0)) for k in ("train", "val", "test")),
        "fit": f"{m.get('epochs_run')} epochs on {m.get('workers')} worker(s), {outcome.fit_seconds:.1f} s",
        "heads chosen": ", ".join(f"{k}: {v}" for k, v in m.get("heads", {}).items())}


STYLE = """body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 8px}
img{max-width:100%;display:block;margin:6px 0}
table{border-collapse:collapse;margin:6px 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;font-size:13px;vertical-align:top}
table.num td{font-variant-numeric:tabular-nums}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.row img{max-width:100%}
.thumbs{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;font-size:12px;width:150px}figcaption{line-height:1.3}figcaption small{word-break:break-all}
.note{color:#555;font-size:13px}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"""


def write_report(output_uri: str, outcome: "TrainOutcome", settings: "Settings",
                 log: Callable[[str], None] = print) -> str:
    """Render report.html into the bundle; returns its URI."""
    ev = outcome.evaluation
    m = outcome.metrics
    # thumbnails for the most confident mistakes only (a handful of photos re-cropped)
    want = []
    for s in ev.specs:
        if s.kind == CLASSIFICATION:
            d = ev.test[s.name]
            wrong = np.flatnonzero(d.pred != d.true)
            wrong = wrong[np.argsort(-d.prob[wrong, d.pred[wrong]])][:8]
            want += [face_key(d, i) for i in wrong]
    try:
        thumbs = thumbnails(want, settings)
    except Exception as exc:  # the report must not lose a trained model
        log(f"report: thumbnails skipped ({type(exc).__name__}: {exc})")
        thumbs = {}
    selection = m.get("selection", {})
    overview, sections, heads = [], [], {}
    for s in ev.specs:
        d = ev.test[s.name]
        rows = validation_rows(s, ev.history, selection.get(s.name))
        h = heads[s.name] = headline(s, d, ev.train_counts[s.name], bundle_validation(m, s, rows))
        overview.append(headline_row(s, h))
        sections.append(task_section(s, ev, d, rows, h if len(ev.specs) > 1 else None, thumbs))
    summary = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in _summary_rows(outcome).items())
    tasks = html_table(HEADLINE, overview, "num")
    title = f"faceray model {esc(outcome.meta['model_version'])}"
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>{STYLE}</style></head><body>
<h1>faceray model report</h1><table>{summary}</table>
<h2>tasks at a glance</h2>{tasks}<p class=note>Intervals: 95 %, Wilson score for accuracies and shares,
percentile bootstrap (2,000 resamples, seed 0) for MAE. Baselines ignore the face: uniform guessing, always the most
frequent training class, or the training mean.</p>{strangers_html(m)}{budget_html(m)}{choice_html(outcome)}{finetune_html(outcome, heads)}
{''.join(sections)}
</body></html>"""
    fs, path = storage.resolve(output_uri)
    with fs.open_output_stream(f"{path}/report.html") as f:
        f.write(page.encode())
    return f"{output_uri.rstrip('/')}/report.html"
