"""The bundle's ``report.html``: one self-contained page (PNG plots embedded as base64, so
it can be copied or served from S3 as one object), its sections beside the training steps
that compute them:

* ``stats`` — per-class figures, confusion counts, intervals (Wilson for accuracies, a
  seeded bootstrap for MAE), baselines, the open-set ROC sweep;
* ``render`` — HTML/PNG helpers every section shares;
* ``fit`` — the head fit (``ddp``, ``calibration.select_heads``): every candidate's
  validation figures, why the chosen head, learning curves;
* ``open_set`` — the open-set rule (``calibration``): distances of known faces vs
  strangers with the threshold, ROC, counts; strangers measured at the job level;
* ``choice`` — what shipped and why (``versus``): trained vs built-in, frozen vs tuned;
* ``tasks`` — each task's test figures (``evaluation``): confusion matrix, per-class
  precision/recall/F1, distribution, the most confident mistakes as thumbnails, or
  predicted vs true for regression;
* ``page`` — the run at a glance and the page, in that order.
"""
from pipeline.training.report.page import write_report

__all__ = ["write_report"]
