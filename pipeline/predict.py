"""The networks every face goes through, shared by the batch stage and the endpoint:
chips → identity embedding, built-in attributes (age, gender, emotion) and a bundle's
trained heads; and the rule for which task fills which column.

A bundle task named like a built-in one replaces it (DESIGN.md): the user trained it
for their photos.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from pipeline.settings import Settings

Tasks = list[tuple[str, str]]


def table_tasks(attributes: bool, bundle_tasks: Sequence[tuple[str, str]] = ()) -> Tasks:
    """The task columns of a table: the built-in attributes (unless switched off or
    replaced by a bundle task of the same name), then the bundle's tasks."""
    from pipeline.attributes import ATTRIBUTE_TASKS

    trained = {name for name, _ in bundle_tasks}
    builtin = [t for t in ATTRIBUTE_TASKS if t[0] not in trained] if attributes else []
    return builtin + list(bundle_tasks)


class FaceModels:
    """Embedder + attribute networks (+ a bundle), one per actor or replica.

    ``attributes``: built-in attributes on (the default) or off (``--no-attributes``).
    """

    def __init__(self, settings: Settings, model_uri: str | None = None, device_batch: int = 32,
                 flip_tta: bool = False, attributes: bool | None = None) -> None:
        from pipeline.embed import Embedder

        self.embedder = Embedder(settings.weights, flip_tta=flip_tta, batch_size=device_batch,
                                 precision=settings.precision)
        self.attributes = None
        if settings.attributes if attributes is None else attributes:
            from pipeline.attributes import AttributeNets

            self.attributes = AttributeNets(self.embedder.device, batch_size=device_batch,
                                            precision=settings.precision)
        self.bundle = None
        if model_uri:
            from pipeline.heads import ModelBundle

            self.bundle = ModelBundle.load(model_uri)

    @property
    def tasks(self) -> Tasks:
        return table_tasks(self.attributes is not None, self.bundle.tasks if self.bundle else ())

    @property
    def model_version(self) -> str | None:
        return self.bundle.model_version if self.bundle else None

    def builtin(self, chips: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Built-in attribute predictions (empty when switched off)."""
        return self.attributes(chips) if self.attributes is not None else {}

    def __call__(self, chips: np.ndarray, photo_ids: np.ndarray
                 ) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
        """Embeddings and every task's (labels, scores), in face order."""
        emb = self.embedder(chips)
        preds = self.builtin(chips)
        if self.bundle is not None:
            preds.update(self.bundle.predict(emb, photo_ids))
        return emb, preds

