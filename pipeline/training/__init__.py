"""Training the heads (and, later, the backbone), one concern per module:

* ``embeddings`` — the embedding pass: the labelled manifest goes through the scoring
  job's own stages with ``main_only`` (each photo contributes its main face, decided in
  the crop stage), cached as Parquet keyed by data URI + backbone weights + detector
  settings, so a retrain embeds only what is new.
* ``split`` — seeded stratified split and target encoding.
* ``ddp`` — the Ray Train DDP loop: one head per task (linear and MLP side by side with
  ``head="auto"``), class-weighted cross-entropy / Huber + Laplace scale, early stopping,
  a checkpoint per epoch and ``FailureConfig`` resume.
* ``calibration`` — the head kept per task on validation, centroids and open-set
  thresholds: the bundle in memory.
* ``evaluation`` — test metrics and the typed ``Evaluation`` the report draws.
* ``run`` — the job: read → embed → split → fit → calibrate → evaluate → write.
"""
