"""People (cluster_faces) accuracy, search and scale, with peers' rules side by side.

    python benchmarks/people.py [--quick] [--tables DIR DIR] [--scale 100000 1000000] [--rule fixed]
    python benchmarks/people.py --tables T/identities_table T/unknown_table --skip-accuracy --scale 1000000

1. Accuracy on ../shared/data/identities + unknown (scored by score_directory.py unless
   --tables are given), no labels used to cluster: BCubed precision/recall/F over each
   photo's main face (the centred one LFW labels), people found vs true people, for
   faceray's rule, Chinese Whispers at dlib's 0.6 rule, and an immich-like DBSCAN rule.
2. Search: precision@5 of held-out photos of known people against the faiss index.
3. Scale: 10^5 / 10^6 synthetic faces drawn to match the measured same/different cosine
   distributions, written as a Parquet table and clustered by jobs/cluster_faces.py in its
   own process (its own local Ray, 2 CPUs): wall, peak RSS of the driver, of the largest
   single process and of all, BCubed P/R/F; and search latency.
4. Look-alikes (``--lookalikes N``): the real faces hidden among N synthetic faces of
   people drawn near each real person (centre cosine 0.90–0.97, so their faces meet the
   real person's at cos ≈ 0.86–0.92, up to the 100:1 threshold), clustered by
   jobs/cluster_faces.py with each ``--edge-rule``: BCubed P and R on the real people and
   on everyone, side by side.
5. Forget (``--forget N``, after ``--scale N``): ``label_table.py --forget`` on that people
   output, its driver's and processes' memory beside the table read whole in one process.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
for _k, _v in {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}.items():
    os.environ.setdefault(_k, _v)

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import knn, people, store_pages  # noqa: E402
from pipeline.people.graph import RULES  # noqa: E402

DLIB_RAW_NORM = 1.433                                   # measured mean norm of raw descriptors
DLIB_COS = round(1 - 0.6 ** 2 / (2 * DLIB_RAW_NORM ** 2), 3)  # dlib's 0.6 Euclidean ⇔ cos 0.912


def bcubed(truth: np.ndarray, pred: np.ndarray) -> tuple[float, float, float]:
    df = pd.DataFrame({"t": truth, "p": pred})
    both = df.groupby(["t", "p"]).size().rename("n").reset_index()
    prec = (both.n ** 2 / both.p.map(df.groupby("p").size())).sum() / len(df)
    rec = (both.n ** 2 / both.t.map(df.groupby("t").size())).sum() / len(df)
    return prec, rec, 2 * prec * rec / (prec + rec)


def edges_at(x: np.ndarray, th: float, k: int = people.K):
    s, i, _ = knn.knn_graph(x, k + 1)
    return people.graph_edges(s, i, th)


def chinese_whispers(n: int, a, b, w, rounds: int = 50, seed: int = 0) -> np.ndarray:
    """dlib's chinese_whispers: each face takes the label of largest summed edge weight
    among its neighbours; vectorised, a random half of the faces updates per round."""
    r, c, ww = np.r_[a, b], np.r_[b, a], np.r_[w, w].astype(np.float64)
    lab, rng = np.arange(n), np.random.default_rng(seed)
    for _ in range(rounds):
        key = r * n + lab[c]
        u, inv = np.unique(key, return_inverse=True)
        tot = np.bincount(inv, weights=ww)
        ur, ul = u // n, u % n
        o = np.lexsort((-tot, ur))
        first = np.r_[True, ur[o][1:] != ur[o][:-1]]
        best = np.full(n, -1)
        best[ur[o][first]] = ul[o][first]
        upd = (best >= 0) & (rng.random(n) < 0.5)
        lab = np.where(upd, best, lab)
    return np.unique(lab, return_inverse=True)[1]


def dbscan_like(n: int, a, b, w, min_faces: int = 3) -> np.ndarray:
    """immich-like: a core face has ≥ min_faces neighbours within the threshold; cores
    linked by an edge are one person; other faces join their most similar core
    neighbour, else stay alone."""
    deg = np.bincount(np.r_[a, b], minlength=n)
    core = deg >= min_faces
    cc = core[a] & core[b]
    lab = people.components(n, a[cc], b[cc])
    r, c, ww = np.r_[a, b], np.r_[b, a], np.r_[w, w]
    m = ~core[r] & core[c]
    o = np.lexsort((-ww[m], r[m]))
    rr, cc2 = r[m][o], c[m][o]
    first = np.r_[True, rr[1:] != rr[:-1]] if len(rr) else np.zeros(0, bool)
    lab = lab.copy()
    lab[rr[first]] = lab[cc2[first]]
    return np.unique(lab, return_inverse=True)[1]


def score_tables(work: Path) -> list[str]:
    out = []
    for name in ("identities", "unknown"):
        dst = work / f"{name}_table"
        if not dst.exists():
            subprocess.run([sys.executable, str(ROOT / "jobs/score_directory.py"), "--input",
                            str(ROOT.parent / "shared/data" / name), "--output", str(dst), "--num-cpus", "2"],
                           check=True, stdout=subprocess.DEVNULL)
        out.append(str(dst))
    return out


def load(tables: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    frames = []
    for t in tables:
        df = pd.read_parquet(t, columns=["image_uri", "status", "face_index", "bbox", "width", "height", "embedding"])
        frames.append(df[df.status == "ok"])
    df = pd.concat(frames, ignore_index=True)
    b = pd.DataFrame(df.bbox.tolist(), index=df.index)
    df["d"] = np.hypot(b.x + b.w / 2 - df.width / 2, b.y + b.h / 2 - df.height / 2)
    main = df.sort_values("d").groupby("image_uri").head(1).index
    df["truth"] = None
    df.loc[main, "truth"] = df.loc[main, "image_uri"].str.split("/").str[-2]
    return np.stack(df.embedding.to_numpy()).astype(np.float32), df


def accuracy(x: np.ndarray, df: pd.DataFrame) -> None:
    m = df.truth.notna().to_numpy()
    truth = df.truth.to_numpy()[m]
    print(f"\n## accuracy: {len(x)} faces, {m.sum()} labelled main faces of {len(set(truth))} true people "
          f"(42 identities + 40 unknown)")
    print(f"{'rule':<58}{'precision':>10}{'recall':>8}{'F':>8}{'people':>8}{'s':>6}")
    rows = [(f"faceray: kNN k=30, cos ≥ {people.THRESHOLD:.3f} (100:1), {rule} edges, Infomap",
             lambda rule=rule: people.cluster(x, rule=rule)) for rule in RULES]
    for th, why in ((DLIB_COS, "dlib 0.6 rule"), (people.THRESHOLD, "faceray threshold")):
        rows.append((f"Chinese Whispers, cos ≥ {th} ({why})", lambda th=th: chinese_whispers(len(x), *edges_at(x, th))))
        rows.append((f"immich-like DBSCAN, ≥3 neighbours, cos ≥ {th} ({why})",
                     lambda th=th: dbscan_like(len(x), *edges_at(x, th))))
    for name, fn in rows:
        t0 = time.monotonic()
        lab = fn()
        p, r, f = bcubed(truth, lab[m])
        print(f"{name:<58}{p:>10.4f}{r:>8.4f}{f:>8.4f}{len(set(lab[m])):>8}{time.monotonic() - t0:>6.1f}")


def search(x: np.ndarray, df: pd.DataFrame) -> None:
    """Hold out 20 % of each identity's photos; their main faces query the rest."""
    ident = df.truth.notna() & ~df.image_uri.str.contains("/unknown/")
    rng = np.random.default_rng(0)
    held = ident & (rng.random(len(df)) < 0.2)
    photos_held = set(df.image_uri[held])
    base = ~df.image_uri.isin(photos_held).to_numpy()
    index = knn.build_index(x[base])
    s, i = index.search(x[held.to_numpy()], 5)
    base_truth = df.truth.to_numpy()[base]
    hit = base_truth[i] == df.truth.to_numpy()[held.to_numpy()][:, None]
    print(f"\n## search: {held.sum()} held-out photos of known people vs {base.sum()} faces: "
          f"precision@5 {hit.mean():.4f}, top-1 {hit[:, 0].mean():.4f}")


class Synthetic:
    """Unit faces of synthetic people: centres from the real embeddings' distribution, faces =
    centre + noise, both scales fitted so that same-person and different-person cosines
    match the measured LFW means (0.949 / 0.833)."""

    def __init__(self, x_real: np.ndarray, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.mu = x_real.mean(0)
        self.cov_l = np.linalg.cholesky(np.cov(x_real.T) + 1e-6 * np.eye(128)).astype(np.float32)

        def bisect(fn, target, lo=-8.0, hi=4.0):   # fn(log scale) decreases with the scale
            for _ in range(18):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if fn(mid) > target else (lo, mid)
            return np.exp((lo + hi) / 2)

        def sb_for(sw):
            return bisect(lambda lb: self.pair_stats(np.exp(lb), sw)[1].mean(), people.DIFF_COS[0])

        self.sw = bisect(lambda lw: self.pair_stats(sb_for(np.exp(lw)), np.exp(lw))[0].mean(), people.SAME_COS[0])
        self.sb = sb_for(self.sw)

    def _noise(self, m: int) -> np.ndarray:
        return self.rng.standard_normal((m, 128)).astype(np.float32) @ self.cov_l.T

    def centres(self, m: int, sb: float | None = None) -> np.ndarray:
        return self.mu + (self.sb if sb is None else sb) * self._noise(m)

    def faces(self, centres: np.ndarray, lab: np.ndarray, sw: float | None = None) -> np.ndarray:
        f = centres[lab] + (self.sw if sw is None else sw) * self._noise(len(lab))
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)

    def pair_stats(self, sb: float, sw: float, m: int = 600) -> tuple[np.ndarray, np.ndarray]:
        """Same-person and different-person cosines of m pairs at these scales."""
        f = self.faces(self.centres(m, sb), np.repeat(np.arange(m), 2), sw)
        return (f[0::2] * f[1::2]).sum(1), (f[0::2] * np.roll(f[1::2], 1, 0)).sum(1)

    def sizes(self, n: int) -> np.ndarray:
        """People sizes (Zipf 1.8, ≤ 5000; the rest single faces) summing to n."""
        sizes = np.minimum(self.rng.zipf(1.8, size=n), 5000)
        sizes = sizes[np.cumsum(sizes) <= n]
        return np.r_[sizes, np.ones(n - sizes.sum(), int)]

    def describe(self, n: int, people_n: int, same: np.ndarray, diff: np.ndarray) -> str:
        return (f"synthetic: {n} faces, {people_n} people (sizes Zipf 1.8, ≤ 5000); cos same {same.mean():.3f} ± "
                f"{same.std():.3f}, different {diff.mean():.3f} ± {diff.std():.3f} (LFW pairs: {people.SAME_COS}, "
                f"{people.DIFF_COS}); P(different ≥ {people.THRESHOLD}) = {(diff >= people.THRESHOLD).mean():.4f}")


def synthesise(x_real: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n unit faces of Zipf-sized people (``Synthetic``) and their true person."""
    syn = Synthetic(x_real, seed)
    same, diff = syn.pair_stats(syn.sb, syn.sw, 4000)
    sizes = syn.sizes(n)
    lab = np.repeat(np.arange(len(sizes)), sizes)
    f = syn.faces(syn.centres(len(sizes)), lab)
    print(syn.describe(n, len(sizes), same, diff))
    return f, lab


class PeakRss:
    """Peak RSS of a process tree, sampled every 0.5 s from /proc: the whole tree, its root (the
    driver) and the largest single process (Ray workers count the object store pages they
    touch)."""

    def __init__(self, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.peak = self.driver = self.single = self.private = 0   # private: the largest RSS less shared pages
        self.by_title: dict[str, tuple[int, int]] = {}   # process title → peak (RSS, RSS less shared pages)
        self.cpu: dict[int, float] = {}   # CPU seconds (user + sys) last seen per process of the tree
        self.stop = False

    @property
    def cpu_seconds(self) -> float:
        """CPU time the job used, whatever else loads the machine (wall time on a shared
        2-core machine says more about the neighbours)."""
        return sum(self.cpu.values())

    @staticmethod
    def _tree(root: int) -> dict[int, tuple[int, float]]:
        """(RSS bytes, CPU seconds) of ``root`` and every descendant, from /proc (no psutil here)."""
        parent, rss = {}, {}
        tick = os.sysconf("SC_CLK_TCK")
        page = os.sysconf("SC_PAGE_SIZE")
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(d)] = int(fields[1])
                rss[int(d)] = (int(fields[21]) * page, (int(fields[11]) + int(fields[12])) / tick)
            except (OSError, IndexError, ValueError):
                continue
        tree, todo = {}, [root]
        children: dict[int, list[int]] = {}
        for c, p in parent.items():
            children.setdefault(p, []).append(c)
        while todo:
            p = todo.pop()
            if p in rss:
                tree[p] = rss[p]
            todo.extend(children.get(p, []))
        return tree

    def _sample(self) -> None:
        tree = self._tree(self.pid)
        mem = {p: v[0] for p, v in tree.items()}
        self.peak = max(self.peak, sum(mem.values()))
        self.single = max([self.single, *mem.values()])
        self.driver = max(self.driver, mem.get(self.pid, 0))
        for p, (_, cpu) in tree.items():
            self.cpu[p] = max(self.cpu.get(p, 0.0), cpu)
        for p, rss in mem.items():
            try:
                title = open(f"/proc/{p}/cmdline", "rb").read().split(b"\0")[0].decode(errors="replace")
                shared = int(open(f"/proc/{p}/statm").read().split()[2]) * os.sysconf("SC_PAGE_SIZE")
            except (OSError, IndexError, ValueError):
                continue
            self.private = max(self.private, rss - shared)
            if title.startswith("ray::"):      # a worker: its title is the task it runs now
                was = self.by_title.get(title, (0, 0))
                self.by_title[title] = (max(was[0], rss), max(was[1], rss - shared))

    def largest(self, n: int = 3) -> str:
        """The ``n`` worker titles (tasks) with the largest peak RSS, with their private part."""
        top = sorted(self.by_title.items(), key=lambda kv: -kv[1][0])[:n]
        return ", ".join(f"{t[5:]} {r / 2**30:.2f} GiB ({u / 2**30:.2f} not shared)" for t, (r, u) in top)

    def __enter__(self):
        def run():
            while not self.stop:
                try:
                    self._sample()
                except Exception:
                    pass
                time.sleep(0.5)
        self.t = threading.Thread(target=run, daemon=True)
        self.t.start()
        return self

    def __exit__(self, *exc):
        self.stop = True
        self.t.join()


def write_table(x: np.ndarray, folder: Path, rows_per_file: int = 50_000) -> None:
    """A prediction-table-shaped folder (image_uri, status, face_index, embedding)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    for i, lo in enumerate(range(0, len(x), rows_per_file)):
        hi = min(len(x), lo + rows_per_file)
        pq.write_table(pa.table({
            "image_uri": pa.array([f"s/{j:09d}.jpg" for j in range(lo, hi)]),
            "status": pa.array(["ok"] * (hi - lo)),
            "face_index": pa.array(np.zeros(hi - lo, np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[lo:hi].ravel()), 128)}),
            folder / f"part-{i:05d}.parquet")


def measured(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, PeakRss, str]:
    """A command in its own process (``env``: variables added to ours), its wall time and
    its process tree's memory and CPU sampled from outside."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})
    with PeakRss(proc.pid) as mem:
        log, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"{Path(cmd[1]).name} failed ({proc.returncode}):\n{log[-3000:]}")
    return time.monotonic() - t0, mem, log


def run_job(table: Path, out: Path, rule: str, env: dict[str, str] | None = None) -> tuple[float, PeakRss, str]:
    """jobs/cluster_faces.py as a user runs it (its own local Ray, 2 CPUs), measured from outside."""
    return measured([sys.executable, str(ROOT / "jobs/cluster_faces.py"), "--table", str(table), "--output",
                     str(out), "--num-cpus", "2", "--sheet-people", "2", "--edge-rule", rule], env)


def forget(n: int, rule: str, work: Path) -> None:
    """``label_table.py --forget`` on (a copy of) the people output of the n-face scale run:
    one face of its largest person is named, then that name forgotten (the person's every
    face leaves the people table and its search index).  Beside it, what the previous
    ``--forget`` did first: the people table read whole into one process."""
    import shutil

    from pipeline import labels

    src = work / f"people_{n}_{rule}"
    if not src.exists():
        raise SystemExit(f"--forget {n}: no {src} (run --scale {n} first)")
    out, log = work / f"forget_{n}", work / f"forget_{n}_labels"
    for d in (out, log):
        shutil.rmtree(d, ignore_errors=True)
    shutil.copytree(src, out)
    head = pd.read_parquet(out, columns=["image_uri", "face_index", "person", "person_size"],
                           filters=[("person", "==", "p000001")])
    labels.append(str(log), labels.decisions("name", "Bench Person", [(head.image_uri.iloc[0], 0)]))
    print(f"\n## forget: label_table.py --forget on a copy of {src.name} (person p000001, {len(head)} faces)")
    whole = [sys.executable, "-c", "import resource, sys, pyarrow.dataset as d; t = d.dataset(sys.argv[1]).to_table(); "
             "print(t.num_rows, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)", str(src)]
    wall, _, text = measured(whole)
    rows, kib = text.split()[:2]
    print(f"the people table read whole in one process (the previous --forget's first step): {wall:.1f} s, "
          f"peak RSS {int(kib) / 2**20:.2f} GiB ({rows} rows)")
    wall, mem, text = measured([sys.executable, str(ROOT / "jobs/label_table.py"), "--forget", "Bench Person",
                                "--labels", str(log), "--people", str(out), "--num-cpus", "2"])
    print(f"label_table.py --forget: wall {wall:.1f} s, CPU {mem.cpu_seconds:.0f} s, peak RSS: driver "
          f"{mem.driver / 2**30:.2f} GiB, largest process {mem.single / 2**30:.2f} GiB "
          f"({mem.private / 2**30:.2f} GiB less shared pages), all {mem.peak / 2**30:.2f} GiB")
    print(f"    largest workers by the task they ran: {mem.largest()}")
    for line in text.splitlines():
        if line.startswith(("forgotten:", "rewritten:")):
            print("   ", line.strip())


def scale(x_real: np.ndarray, sizes: list[int], rule: str, work: Path, keep_pages: bool = False) -> None:
    """``keep_pages``: each size also run first with the workers keeping the object-store
    pages they read (``pipeline/store_pages.py`` off), the two side by side."""
    print(f"\n## scale: jobs/cluster_faces.py on synthetic tables (its own local Ray, 2 CPUs), edge rule {rule}")
    variants = [("store pages kept", {store_pages.KEEP_ENV: "1"})] if keep_pages else []
    variants.append(("store pages released", {}))
    for n in sizes:
        x, lab = synthesise(x_real, n)
        table, out = work / f"synthetic_{n}", work / f"people_{n}_{rule}"
        if not table.exists():
            write_table(x, table)
        del x
        for variant, env in variants:
            load = os.getloadavg()[0]
            wall, mem, log = run_job(table, out, rule, env)
            steps = [line for line in log.splitlines() if line.startswith(("[kNN]", "[components]", "seconds:"))]
            pred = pd.read_parquet(out, columns=["image_uri", "person"])
            row = pred.image_uri.str.slice(2, 11).astype(np.int64).to_numpy()
            sub = np.random.default_rng(1).choice(n, size=min(n, 200_000), replace=False)
            truth = np.empty(n, np.int64)
            truth[row] = np.arange(n)
            person = pred.person.to_numpy()[truth[sub]]
            p, r, f = bcubed(lab[sub], person)
            print(f"N={n} ({variant}): wall {wall:.1f} s (load average {load:.1f} at start, "
                  f"{os.getloadavg()[0]:.1f} at end), "
                  f"CPU {mem.cpu_seconds:.0f} s (≈ {mem.cpu_seconds / 2:.0f} s wall on 2 idle cores), "
                  f"peak RSS: driver {mem.driver / 2**30:.2f} GiB, largest process {mem.single / 2**30:.2f} GiB "
                  f"({mem.private / 2**30:.2f} GiB less the object store's shared pages), "
                  f"all {mem.peak / 2**30:.2f} GiB; people {pred.person.nunique()} vs {lab.max() + 1} true; "
                  f"BCubed P {p:.4f} R {r:.4f} F {f:.4f}")
            print(f"    largest workers by the task they ran: {mem.largest()}")
            for line in steps:
                print("   ", line.strip())


def lookalike_faces(x: np.ndarray, df: pd.DataFrame, n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """n synthetic faces of look-alikes of the real labelled people: each real person gets
    people whose unit centre is ``a·u + √(1−a²)·v`` (u: the real person's mean face, v: a
    synthetic centre's direction made orthogonal to u, a ~ U[0.90, 0.97]), Zipf-sized,
    faces drawn as ``Synthetic.faces`` draws them.  Returns (faces, look-alike person id)."""
    syn = Synthetic(x, seed)
    rng = np.random.default_rng(seed)
    truth = df.truth.to_numpy()
    names = sorted({t for t in truth if t is not None})
    u = np.stack([x[truth == name].mean(0) for name in names])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sizes = np.minimum(syn.sizes(n), 200)
    sizes = np.r_[sizes, np.ones(n - sizes.sum(), int)]
    near = rng.integers(0, len(names), len(sizes))            # whose look-alike each person is
    v = syn.centres(len(sizes)) - syn.mu
    v -= (v * u[near]).sum(1, keepdims=True) * u[near]
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    a = rng.uniform(0.90, 0.97, len(sizes))[:, None]
    norm = np.median(np.linalg.norm(syn.centres(1000), axis=1))   # Synthetic's centre scale
    centres = (a * u[near] + np.sqrt(1 - a ** 2) * v) * norm
    lab = np.repeat(np.arange(len(sizes)), sizes)
    return syn.faces(centres.astype(np.float32), lab), lab


def lookalikes(x: np.ndarray, df: pd.DataFrame, n: int, work: Path) -> None:
    """The edge rules on the real faces hidden among n look-alike faces (one table, each rule
    a cluster_faces.py run): BCubed P/R of the real people's main faces and of everyone."""
    fake, fake_lab = lookalike_faces(x, df, n)
    truth = df.truth.to_numpy()
    real_idx = np.flatnonzero(truth != None)  # noqa: E711 (object array)
    cross = fake[:2000] @ x[real_idx].T
    print(f"\n## look-alikes: {len(x)} real faces ({len(real_idx)} labelled, {len(set(truth[real_idx]))} people) "
          f"among {n} synthetic faces of {fake_lab.max() + 1} look-alike people; a look-alike face's best real match: "
          f"cos {np.median(cross.max(1)):.3f} median, {(cross.max(1) >= people.THRESHOLD).mean():.1%} at or over "
          f"{people.THRESHOLD}")
    table = work / f"lookalikes_{n}"
    allx = np.concatenate([x, fake])
    if not table.exists():
        write_table(allx, table)
    codes = {name: i for i, name in enumerate(sorted(set(truth[real_idx])))}
    everyone = np.r_[np.full(len(x), -1), fake_lab + len(codes)]
    everyone[real_idx] = [codes[t] for t in truth[real_idx]]
    scored = np.flatnonzero(everyone >= 0)
    print(f"{'edge rule':<12}{'real P':>8}{'real R':>8}{'real F':>8}{'all P':>8}{'all R':>8}{'all F':>8}"
          f"{'people':>8}{'wall s':>8}")
    for rule in RULES:
        out = work / f"lookalikes_{n}_{rule}"
        wall, _, _ = run_job(table, out, rule)
        pred = pd.read_parquet(out, columns=["image_uri", "person"])
        person = np.empty(len(allx), object)
        person[pred.image_uri.str.slice(2, 11).astype(np.int64).to_numpy()] = pred.person.to_numpy()
        rp, rr, rf = bcubed(everyone[real_idx], person[real_idx])
        ap_, ar, af = bcubed(everyone[scored], person[scored])
        print(f"{rule:<12}{rp:>8.4f}{rr:>8.4f}{rf:>8.4f}{ap_:>8.4f}{ar:>8.4f}{af:>8.4f}"
              f"{pred.person.nunique():>8}{wall:>8.1f}", flush=True)


def search_latency(x_real: np.ndarray, n: int) -> None:
    import faiss
    x, _ = synthesise(x_real, n)
    t0 = time.monotonic()
    index = knn.build_index(x)
    build = time.monotonic() - t0
    faiss.omp_set_num_threads(1)
    q = x[np.random.default_rng(2).choice(n, 1000)]
    lat = []
    for row in q:
        t1 = time.perf_counter()
        index.search(row[None], 10)
        lat.append(time.perf_counter() - t1)
    lat = np.array(lat) * 1000
    print(f"search on {n} faces ({type(index).__name__}, build {build:.1f} s, 1 thread, k=10): "
          f"p50 {np.percentile(lat, 50):.2f} ms, p99 {np.percentile(lat, 99):.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scale at 10^5 only")
    ap.add_argument("--tables", nargs="+", help="scored identities (+ unknown) tables (default: score them now)")
    ap.add_argument("--scale", nargs="*", type=int, help="synthetic sizes (default 10^5 10^6)")
    ap.add_argument("--rule", default="fixed", help="edge rule for the scale runs (pipeline/people/graph.py RULES)")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "faceray_people_bench"),
                    help="where the scored and synthetic tables are kept between runs")
    ap.add_argument("--skip-accuracy", action="store_true", help="scale runs only")
    ap.add_argument("--keep-store-pages", action="store_true",
                    help="run each scale size first with workers keeping the store pages they read, then as shipped")
    ap.add_argument("--lookalikes", type=int, metavar="N",
                    help="hide the real faces among N look-alike faces and compare the edge rules (only this step)")
    ap.add_argument("--forget", type=int, metavar="N",
                    help="forget a person in the N-face scale run's people output (only this step)")
    args = ap.parse_args()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
          f"load average {os.getloadavg()[0]:.1f}, {time.strftime('%Y-%m-%d %H:%M')}")
    work = Path(args.work)
    if args.forget:
        forget(args.forget, args.rule, work)
        return 0
    tables = args.tables or score_tables(work)
    x, df = load(tables)
    if args.lookalikes:
        lookalikes(x, df, args.lookalikes, work)
        return 0
    if not args.skip_accuracy:
        accuracy(x, df)
        search(x, df)
    sizes = args.scale if args.scale is not None else ([100_000] if args.quick else [100_000, 1_000_000])
    if sizes:
        scale(x, sizes, args.rule, work, args.keep_store_pages)
        if not args.skip_accuracy:
            search_latency(x, max(sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
