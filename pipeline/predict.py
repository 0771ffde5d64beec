"""The networks every face goes through, shared by the batch stage and the endpoint:
chips → identity embedding, built-in attributes (age, gender, emotion) and a bundle's
trained heads; and the rule for which task fills which column.

A bundle task named like a built-in one replaces it (DESIGN.md): the user trained it
for their photos.  A bundle whose heads read the attribute networks' penultimate features
(``ModelBundle.feature_sets``) gets them from the same pass that makes the built-in
attributes, which then runs even with the built-in attributes off.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from pipeline.settings import Settings

Tasks = list[tuple[str, str]]


def table_tasks(attributes: bool, bundle_tasks: Sequence[tuple[str, str]] = ()) -> Tasks:
    """The task columns of a table: the built-in attributes (unless switched off or
    replaced by a bundle task of the same name), then the bundle's tasks."""
    from pipeline.contract import ATTRIBUTE_TASKS

    trained = {name for name, _ in bundle_tasks}
    builtin = [t for t in ATTRIBUTE_TASKS if t[0] not in trained] if attributes else []
    return builtin + list(bundle_tasks)


Predictions = dict[str, tuple[np.ndarray, np.ndarray]]
Features = dict[str, np.ndarray]


class FacePass(NamedTuple):
    """What one pass of the networks gives for a batch of chips, in face order."""
    embeddings: np.ndarray        # the identity network's (the table's ``embedding``)
    predictions: Predictions      # every task's (labels, scores)
    features: Features            # the attribute networks' penultimate features, by name
    head_embeddings: np.ndarray   # what the bundle's heads read (a fine-tuned backbone's), else ``embeddings``


class FaceModels:
    """Embedder + attribute networks (+ a bundle), one per actor or replica.

    ``attributes``: built-in attributes on (the default) or off (``--no-attributes``).
    ``features``: attribute features wanted whatever the bundle (training's embedding pass,
    the endpoint whose bundle may change); the networks are loaded when the built-in
    attributes are on, or features are wanted, or the bundle reads them.
    """

    def __init__(self, settings: Settings, model_uri: str | None = None, device_batch: int = 32,
                 flip_tta: bool = False, attributes: bool | None = None, features: bool = False) -> None:
        from pipeline.embed import Embedder

        self.embedder = Embedder(settings.weights, flip_tta=flip_tta, batch_size=device_batch,
                                 precision=settings.precision)
        self.precision = settings.precision   # a fine-tuned bundle's backbone runs at the same
        self.bundle = None
        if model_uri:
            from pipeline.heads import ModelBundle

            self.bundle = ModelBundle.load(model_uri)
        self.builtin_on = bool(settings.attributes if attributes is None else attributes)
        self.attributes = None
        if self.builtin_on or features or (self.bundle is not None and self.bundle.feature_sets):
            from pipeline.attributes import AttributeNets

            self.attributes = AttributeNets(self.embedder.device, batch_size=device_batch,
                                            precision=settings.precision, cache_dir=settings.cache_dir)

    @property
    def tasks(self) -> Tasks:
        return table_tasks(self.builtin_on, self.bundle.tasks if self.bundle else ())

    @property
    def model_version(self) -> str | None:
        return self.bundle.model_version if self.bundle else None

    def attribute_pass(self, chips: np.ndarray) -> tuple[Predictions, Features]:
        """Built-in attribute predictions (empty when switched off) and the networks'
        penultimate features (empty when the networks are not loaded), one pass."""
        if self.attributes is None:
            return {}, {}
        out = self.attributes.run(chips)
        return (out.predictions if self.builtin_on else {}), out.features

    def builtin(self, chips: np.ndarray) -> Predictions:
        """Built-in attribute predictions (empty when switched off)."""
        return self.attribute_pass(chips)[0]

    def run(self, chips: np.ndarray, photo_ids: np.ndarray) -> FacePass:
        """Every network's output for the chips (a fine-tuned backbone runs once: its
        embeddings come back for per-track decisions too)."""
        emb = self.embedder(chips)
        preds, feats = self.attribute_pass(chips)
        head = emb
        if self.bundle is not None:
            head = self.bundle.head_embeddings(chips, emb, self.precision)
            preds.update(self.bundle.predict(head, photo_ids, feats))
        return FacePass(emb, preds, feats, head)

    def __call__(self, chips: np.ndarray, photo_ids: np.ndarray) -> tuple[np.ndarray, Predictions]:
        """Embeddings and every task's (labels, scores), in face order."""
        out = self.run(chips, photo_ids)
        return out.embeddings, out.predictions

