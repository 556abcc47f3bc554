"""RQ-KMeans and RQ-VAE fit / assign time and peak memory vs catalog size.

Usage:
    .venv/bin/python bench/quantization.py --out bench/results/quantization.json [--png FILE]
        [--sizes 10000 100000 1000000] [--dim 576] [--kmeans-iters 20] [--vae-epochs 5] [--threads N]
        [--faiss-python /tmp/faissvenv/bin/python]

Catalogs:
- ``scientific``: the 4,385 Amazon Scientific items (UniSRec ``Scientific.text``), embedded with
  all-MiniLM-L6-v2 (d=384; cached under ``.sidrec/bench-cache``);
- ``synthetic-<n>``: ``n`` vectors of dimension ``--dim`` (576 = SmolLM2 hidden size) drawn from a
  mixture of 512 Gaussians (so the k-means has structure to find).

Per catalog: M=3 levels, codebook 256 (the production setting for catalogs of this size).
RQ-KMeans: ``sidrec.index.quantize.fit_rq_kmeans`` with ``--kmeans-iters`` Lloyd iterations per level
(the pipeline default is 50; Lloyd stops early on convergence); each level's centroids are fitted
on at most 256 rows per centroid (65,536 rows for N=256, as faiss's k-means), then every row is
assigned. RQ-VAE: ``fit_rq_vae`` with
``--vae-epochs`` epochs (the pipeline default is 200; the time per epoch is reported so that the
full run can be extrapolated). Assign = ``QuantizerState.assign`` on the whole catalog.

Memory: peak resident-set growth over the level before the call (psutil, sampled every 10 ms in
a background thread), i.e. the extra memory the fit/assign needed; plus ``ru_maxrss`` at the end.

Optional: ``--faiss-python`` runs ``faiss.ResidualQuantizer`` (greedy, beam 1, same M / nbits)
on the same synthetic data in that interpreter (a separate venv; faiss is not a project
dependency) for a speed reference.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from sidrec.config import RQVAEConfig  # noqa: E402
from sidrec.index.quantize import MAX_POINTS_PER_CENTROID, fit_rq_kmeans, fit_rq_vae, raw_collision_rate  # noqa: E402

SCI_TEXT = Path("/work/shared/data/amazon-scientific/Scientific.text")


class PeakRSS:
    """Context manager: peak RSS growth (bytes) while the block ran."""

    def __init__(self, interval: float = 0.01):
        self.proc = psutil.Process()
        self.interval = interval

    def __enter__(self):
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.extra_mb = (self.peak - self.base) / 2**20


def scientific_embeddings() -> np.ndarray:
    f = common.CACHE / "scientific-minilm.npy"
    if f.is_file():
        return np.load(f)
    from sidrec.data.text import minilm_embeddings

    texts = []
    with SCI_TEXT.open(encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            parts = line.rstrip("\n").split("\t", 1)
            texts.append(parts[1] if len(parts) > 1 else parts[0])
    emb = minilm_embeddings(texts, progress=False)
    f.parent.mkdir(parents=True, exist_ok=True)
    np.save(f, emb)
    return emb


def synthetic(n: int, d: int, seed: int = 0, clusters: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, d), dtype=np.float32) * 2.0
    x = centers[rng.integers(clusters, size=n)]
    x += rng.standard_normal((n, d), dtype=np.float32)
    return x


def bench_one(name: str, x: np.ndarray, levels: int, cb: int, iters: int, epochs: int, vae_batch: int, seed: int = 0) -> dict:
    out = {"catalog": name, "n": int(x.shape[0]), "d": int(x.shape[1]), "levels": levels, "codebook": cb}
    with PeakRSS() as m:
        t0 = time.perf_counter()
        st = fit_rq_kmeans(x, levels, cb, seed, iters=iters)
        out["rq_kmeans_fit_s"] = round(time.perf_counter() - t0, 3)
    out["rq_kmeans_fit_peak_extra_mb"] = round(m.extra_mb, 1)
    with PeakRSS() as m:
        t0 = time.perf_counter()
        codes = st.assign(x)
        out["rq_kmeans_assign_s"] = round(time.perf_counter() - t0, 3)
    out["rq_kmeans_assign_peak_extra_mb"] = round(m.extra_mb, 1)
    out["rq_kmeans_raw_collision_rate"] = round(raw_collision_rate(codes), 4)
    print(f"  {name}: rq_kmeans fit {out['rq_kmeans_fit_s']}s assign {out['rq_kmeans_assign_s']}s", flush=True)

    vcfg = RQVAEConfig(epochs=epochs, batch_size=vae_batch)
    with PeakRSS() as m:
        t0 = time.perf_counter()
        st = fit_rq_vae(x, levels, cb, seed, cfg=vcfg, progress=False)
        out["rq_vae_fit_s"] = round(time.perf_counter() - t0, 3)
    out["rq_vae_fit_peak_extra_mb"] = round(m.extra_mb, 1)
    out["rq_vae_epochs"] = epochs
    out["rq_vae_s_per_epoch"] = round(out["rq_vae_fit_s"] / epochs, 3)  # includes the k-means init
    out["rq_vae_fit_s_extrapolated_200_epochs"] = round(out["rq_vae_fit_s"] / epochs * 200, 1)
    with PeakRSS() as m:
        t0 = time.perf_counter()
        codes = st.assign(x)
        out["rq_vae_assign_s"] = round(time.perf_counter() - t0, 3)
    out["rq_vae_assign_peak_extra_mb"] = round(m.extra_mb, 1)
    out["rq_vae_raw_collision_rate"] = round(raw_collision_rate(codes), 4)
    out["load"] = common.load_note()
    print(f"  {name}: rq_vae {epochs} ep fit {out['rq_vae_fit_s']}s assign {out['rq_vae_assign_s']}s", flush=True)
    return out


FAISS_SCRIPT = r"""
import json, sys, time, resource
import numpy as np, faiss
path, M, nbits, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
faiss.omp_set_num_threads(threads)
x = np.load(path).astype('float32')
x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
rq = faiss.ResidualQuantizer(x.shape[1], M, nbits)
rq.max_beam_size = 1  # greedy residual assignment, as RQ-KMeans
t0 = time.perf_counter(); rq.train(x); fit = time.perf_counter() - t0
t0 = time.perf_counter(); codes = rq.compute_codes(x); asg = time.perf_counter() - t0
# VmHWM: this process image's peak RSS (ru_maxrss would include the forking parent's before exec)
hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]
peak = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"faiss": faiss.__version__, "fit_s": round(fit, 3), "assign_s": round(asg, 3),
                  "peak_rss_mb": round(peak, 1), "data_mb": round(x.nbytes / 2**20, 1)}))
"""


def run_faiss(py: str, x: np.ndarray, levels: int, cb: int, threads: int) -> dict:
    f = common.CACHE / f"faiss-input-{x.shape[0]}x{x.shape[1]}.npy"
    f.parent.mkdir(parents=True, exist_ok=True)
    np.save(f, x)
    try:
        r = subprocess.run([py, "-c", FAISS_SCRIPT, str(f), str(levels), str(int(np.log2(cb))), str(threads)],
                           capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
        return json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        f.unlink(missing_ok=True)


def plot(rows: list[dict], path: Path, faiss_rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    rows = sorted(rows, key=lambda r: r["n"])
    n = [r["n"] for r in rows]
    ax[0].plot(n, [r["rq_kmeans_fit_s"] for r in rows], "o-", label="RQ-KMeans fit")
    ax[0].plot(n, [r["rq_vae_fit_s_extrapolated_200_epochs"] for r in rows], "s--", label="RQ-VAE fit (200 ep, extrap.)")
    ax[0].plot(n, [r["rq_vae_fit_s"] for r in rows], "s-", label="RQ-VAE fit (epochs run)")
    fr = [(r["n"], faiss_rows[str(r["n"])]["fit_s"]) for r in rows if "fit_s" in faiss_rows.get(str(r["n"]), {})]
    if fr:
        ax[0].plot(*zip(*fr), "^-", label="faiss ResidualQuantizer fit")
    ax[0].set_xscale("log"); ax[0].set_yscale("log")
    ax[0].set_xlabel("items"); ax[0].set_ylabel("seconds"); ax[0].set_title("fit time"); ax[0].legend(fontsize=7)
    ax[1].plot(n, [r["rq_kmeans_assign_s"] for r in rows], "o-", label="RQ-KMeans assign")
    ax[1].plot(n, [r["rq_vae_assign_s"] for r in rows], "s-", label="RQ-VAE assign")
    fa = [(r["n"], faiss_rows[str(r["n"])]["assign_s"]) for r in rows if "assign_s" in faiss_rows.get(str(r["n"]), {})]
    if fa:
        ax[1].plot(*zip(*fa), "^-", label="faiss assign")
    ax[1].set_xscale("log"); ax[1].set_yscale("log")
    ax[1].set_xlabel("items"); ax[1].set_ylabel("seconds"); ax[1].set_title("assign time"); ax[1].legend(fontsize=7)
    mb = lambda key: [max(r[key], 1.0) for r in rows]  # noqa: E731  (log axis: ~0 growth drawn at 1 MB)
    ax[2].plot(n, mb("rq_kmeans_fit_peak_extra_mb"), "o-", label="RQ-KMeans fit (+RSS)")
    ax[2].plot(n, mb("rq_kmeans_assign_peak_extra_mb"), "o--", label="RQ-KMeans assign (+RSS)")
    ax[2].plot(n, mb("rq_vae_fit_peak_extra_mb"), "s-", label="RQ-VAE fit (+RSS)")
    ax[2].plot(n, [r["n"] * r["d"] * 4 / 2**20 for r in rows], ":", color="grey", label="the data (float32)")
    fm = [(r["n"], faiss_rows[str(r["n"])]["peak_rss_mb"]) for r in rows if "peak_rss_mb" in faiss_rows.get(str(r["n"]), {})]
    if fm:
        ax[2].plot(*zip(*fm), "^-", label="faiss process peak (incl. data)")
    ax[2].set_xscale("log"); ax[2].set_yscale("log")
    ax[2].set_xlabel("items"); ax[2].set_ylabel("MB"); ax[2].set_title("memory"); ax[2].legend(fontsize=7)
    fig.suptitle("Quantizer time vs catalog size (M=3, N=256; Scientific d=384 MiniLM, synthetic d=576; 2-core CPU)", fontsize=9)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench/results/quantization.json")
    ap.add_argument("--png", default=None)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--codebook", type=int, default=256)
    ap.add_argument("--kmeans-iters", type=int, default=20)
    ap.add_argument("--vae-epochs", type=int, nargs="*", default=None,
                    help="epochs per catalog (scientific, then --sizes); default 20 for <=10k items, 2 up to 100k, 1 above")
    ap.add_argument("--vae-batch", type=int, default=512)
    ap.add_argument("--no-scientific", action="store_true")
    ap.add_argument("--faiss-python", default=None, help="python of a venv with faiss-cpu (optional)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        done = json.loads(Path(args.out).read_text(encoding="utf-8"))
        fr = done["faiss_residual_quantizer"] if isinstance(done["faiss_residual_quantizer"], dict) else {}
        plot(done["results"], Path(args.png) if args.png else Path(args.out).with_suffix(".png"), fr)
        return 0

    threads = common.set_threads(args.threads)
    env = common.env_info()
    t_start = time.perf_counter()
    cats: list[tuple[str, np.ndarray]] = []
    if not args.no_scientific:
        t0 = time.perf_counter()
        cats.append(("scientific", scientific_embeddings()))
        print(f"scientific embeddings {cats[-1][1].shape} in {time.perf_counter() - t0:.1f}s", flush=True)
    for n in args.sizes:
        cats.append((f"synthetic-{n}", synthetic(n, args.dim)))
    epochs = args.vae_epochs or [20 if x.shape[0] <= 10_000 else 2 if x.shape[0] <= 100_000 else 1 for _, x in cats]
    rows, faiss_rows = [], {}
    for (name, x), ep in zip(cats, epochs):
        rows.append(bench_one(name, x, args.levels, args.codebook, args.kmeans_iters, ep, args.vae_batch))
        if args.faiss_python:
            faiss_rows[str(x.shape[0])] = run_faiss(args.faiss_python, x, args.levels, args.codebook, threads)
            print(f"  {name}: faiss {faiss_rows[str(x.shape[0])]}", flush=True)
    result = {
        "benchmark": "quantization",
        "command": "python bench/quantization.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "results": rows,
        "faiss_residual_quantizer": faiss_rows or "not run (pass --faiss-python)",
        "setup": {"levels": args.levels, "codebook": args.codebook, "kmeans_iters": args.kmeans_iters,
                  "kmeans_fit_rows_max": args.codebook * MAX_POINTS_PER_CENTROID,
                  "vae_epochs": epochs, "vae_batch": args.vae_batch, "dim_synthetic": args.dim,
                  "scientific_embedder": "all-MiniLM-L6-v2 (d=384)", "threads": threads, "repeats": 1,
                  "memory": "peak RSS growth during the call (psutil, 10 ms sampling)"},
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "env": env, "load_at_end": common.load_note(), "wall_s": round(time.perf_counter() - t_start, 1),
    }
    out = common.write_json(args.out, result)
    plot(rows, Path(args.png) if args.png else out.with_suffix(".png"), faiss_rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
