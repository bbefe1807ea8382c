"""End-to-end throughput and latency of ``cxr serve`` against the in-process limit.

    python bench/bench_e2e.py [--films 96] [--rounds 8] [--skip-e2e]     # about 3 minutes

All figures come from one run on one machine (its CPU model and core count are printed):

a. in-process limit: decode + the service's own preprocessing (``shared.imaging.preprocess``
   with the bundled model's config and lung segmenter, as ``worker/processing.py`` calls it)
   + batched inference (``Classifier.predict``, as the worker uses it), images/s;
b. naive baseline: the same preprocessing + ``model.predict`` one image per call, on fewer
   films, images/s; and the ratio a/b;
c. end to end through ``python -m cli.main serve --workers N`` (its own data dir, embedded
   Redis and API port, all in a temp dir): the films submitted over HTTP in jobs of 48, first
   POST to the last result stored (the set submitted ``--rounds`` times over, 8 by default, so
   that start-up is not most of it), with 1 and 2 worker processes; images/s and ratio to (a),
   and the steady state (the first stored chunk to the last);
d. submit latency (p50/p99) of 50-image jobs (~0.5 MB films) while the workers are busy, and
   poll latency (p50/p99) of ``GET /v1/jobs/{id}?per_page=0`` (the summary, as ``cxr wait``
   polls) with 50 concurrent pollers;
e. peak RSS (VmHWM) of the worker and API processes.

Films: real ones from ``../shared/data/cxr`` (a round-robin mix of its sources) when present,
otherwise generated (``ml.synthetic``): large 8-bit JPEGs and 16-bit PNGs.  No patient data is
written anywhere but the temp dir, which is removed at the end.  ``cxr serve`` is stopped with
SIGINT, as Ctrl-C would.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import datetime as dt
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import requests
from bench_inference import timed  # the best of N runs: the least disturbed by a shared machine

from ml.synthetic import chest_film
from shared.model_store import Classifier
from shared.redis_server import free_port
from shared.settings import Settings, get_settings, local_key_file

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "cxr"
POLL_INTERVAL = 1.0  # seconds: `cxr wait`'s default
POLLS = 10
JOB_SIZE = 48
WAIT = {"per_page": 0}  # the job's summary, as `cxr wait` polls it
TERMINAL = {"completed", "completed_with_errors", "failed"}


# ---------------------------------------------------------------------------- films


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def real_films(n: int) -> list[tuple[str, bytes]]:
    """Round-robin over the sources, so every source (and its sizes) is in the mix."""
    by_source: dict[str, list[str]] = {}
    with (DATA / "manifest.csv").open() as fh:
        for row in csv.DictReader(fh):
            by_source.setdefault(row["source"], []).append(row["file"])
    picked: list[str] = []
    lists = [sorted(v) for _, v in sorted(by_source.items())]
    i = 0
    while len(picked) < n and any(i < len(v) for v in lists):
        picked += [v[i] for v in lists if i < len(v)]
        i += 1
    return [(name, (DATA / name).read_bytes()) for name in picked[:n]]


def jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def png16(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", img.astype(np.uint16) * 257)
    assert ok
    return buf.tobytes()


def generated_films(n: int) -> list[tuple[str, bytes]]:
    out = []
    for k in range(n):
        img = chest_film(k, height=2048, width=2048)
        if k % 2:
            out.append((f"gen-{k}.png", png16(img)))
        else:
            out.append((f"gen-{k}.jpg", jpeg(img)))
    return out


def describe(films: list[tuple[str, bytes]]) -> str:
    sizes = [len(b) for _, b in films]
    shapes = [
        cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_UNCHANGED).shape for _, b in films
    ]
    pixels = [s[0] * s[1] / 1e6 for s in shapes]
    exts = sorted({name.rsplit(".", 1)[-1] for name, _ in films})
    return (
        f"{len(films)} films, formats {exts}, {sum(sizes) / 1e6:.1f} MB in all "
        f"({min(sizes) // 1024}-{max(sizes) // 1024} KiB), "
        f"{min(pixels):.2f}-{max(pixels):.2f} MP"
    )


# ---------------------------------------------------------------------------- in process


def in_process(
    films: list[tuple[str, bytes]], n_base: int, repeat: int
) -> tuple[float, float, float, float, dict[str, float], dict[int, float]]:
    from shared.imaging import ImageError, preprocess, preprocess_many
    from worker.processing import decode_threads
    from worker.resources import inference_threads

    settings = get_settings()
    clf = Classifier.load(settings.model_path, threads=inference_threads(settings))
    config, pixels, seg = clf.info.preprocess, settings.max_image_pixels, clf.segmenter

    def prep(data: bytes) -> np.ndarray | None:  # one film at a time: the naive way
        try:
            return preprocess(data, config, pixels, segmenter=seg)
        except ImageError:  # the worker marks it failed or skipped and scores the rest
            return None

    first = next(a for a in (prep(b) for _, b in films) if a is not None)
    clf.predict(first[None])  # warm up both paths
    clf.model.predict(first[None], verbose=0)

    threads = decode_threads(settings)

    def limit(size: int = settings.chunk_size) -> None:
        # one chunk at a time as a worker does it (worker/processing.py: _decode_all): films
        # decoded on a thread pool, the segmenter once per chunk, one batch for the classifier
        with cf.ThreadPoolExecutor(max_workers=threads) as pool:
            for i in range(0, len(films), size):
                chunk = [b for _, b in films[i : i + size]]
                out = preprocess_many(chunk, config, pixels, seg, mapper=pool.map)
                arrays = [a for a in out if not isinstance(a, ImageError)]
                if arrays:
                    clf.predict(np.stack(arrays))

    def baseline() -> None:
        for _, b in films[:n_base]:
            arr = prep(b)
            if arr is not None:
                clf.model.predict(arr[None], verbose=0)

    rate_a = len(films) / timed(limit, repeat)
    rate_b = n_base / timed(baseline, repeat)
    # the model alone, on the same preprocessed films (what bench_inference.py compares)
    batch = np.stack([a for a in (prep(b) for _, b in films) if a is not None])
    rate_inf = len(batch) / timed(lambda: clf.predict(batch), repeat)
    one = batch[: min(n_base, len(batch))]
    rate_inf_base = len(one) / timed(
        lambda: [clf.model.predict(one[i : i + 1], verbose=0) for i in range(len(one))], repeat
    )
    by_size = {  # CXR_CHUNK_SIZE: the in-process limit at other sizes
        size: len(films) / timed(lambda size=size: limit(size), repeat)
        for size in (8, 16, 32, 64)
        if size != settings.chunk_size
    }
    by_size[settings.chunk_size] = rate_a
    steps = profile(films, clf, settings, repeat)
    return rate_a, rate_b, rate_inf, rate_inf_base, steps, dict(sorted(by_size.items()))


def profile(films: list[tuple[str, bytes]], clf: Classifier, settings, repeat: int):
    """Milliseconds per film of each step, one step at a time on one thread (TensorFlow on its
    own threads): where (a) and (b) spend their time."""
    from shared.imaging import decode_grayscale, lung_crop, to_model_input
    from shared.lungs import seg_input

    datas = [b for _, b in films]
    n, size = len(datas), settings.chunk_size
    grays = [decode_grayscale(d) for d in datas]
    seg, config = clf.segmenter, clf.info.preprocess
    findings = seg.find_many(grays, config.lung_margin) if seg else [None] * n
    ok = [(g, f) for g, f in zip(grays, findings, strict=True) if f is None or f.box is not None]

    def model_input(gray: np.ndarray, finding) -> np.ndarray:
        return to_model_input(gray if finding is None else lung_crop(gray, finding), config)

    inputs = np.stack([model_input(g, f) for g, f in ok])
    chunks = [grays[i : i + size] for i in range(0, n, size)]
    k = len(inputs)
    steps = {  # name: (the step, films it handles)
        "decode (OpenCV)": (lambda: [decode_grayscale(d) for d in datas], n),
        "segmenter input": (lambda: [seg_input(g) for g in grays], n),
        "segmenter, one call per chunk": (lambda: [seg.find_many(c) for c in chunks], n),
        "segmenter, one call per film": (lambda: [seg.find(g) for g in grays], n),
        "crop + resize to 224": (lambda: [model_input(g, f) for g, f in ok], k),
        "classifier, one call per chunk": (
            lambda: [clf.predict(inputs[i : i + size]) for i in range(0, k, size)],
            k,
        ),
        "classifier, model.predict per film": (
            lambda: [clf.model.predict(x[None], verbose=0) for x in inputs[:24]],
            min(24, k),
        ),
    }
    out = {}
    for name, (step, count) in steps.items():
        if seg is not None or not name.startswith("segmenter"):
            out[name] = timed(step, repeat) * 1000 / count
    return out


# ---------------------------------------------------------------------------- the stack


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def parse_ts(s: str) -> float:
    t = dt.datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            kids = []
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def peak_rss(pid: int) -> dict[str, list[float]]:
    """VmHWM (MiB) of every process under ``cxr serve``, by role."""
    roles: dict[str, list[float]] = {"worker": [], "api": []}
    for p in descendants(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        hwm = next((ln for ln in status.splitlines() if ln.startswith("VmHWM")), None)
        if hwm is None:
            continue
        mib = int(hwm.split()[1]) / 1024
        if "celery" in cmd:
            roles["worker"].append(mib)
        elif "gunicorn" in cmd:
            roles["api"].append(mib)
    return roles


class Stack:
    def __init__(self, workers: int, tmp: Path) -> None:
        self.dir = tmp / f"serve-{workers}"
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ)
        env.update(
            CXR_DATA_DIR=str(self.dir),
            CXR_PORT=str(self.port),
            CXR_EMBEDDED_REDIS_PORT=str(free_port()),
            CXR_LOG_LEVEL="WARNING",
        )
        env.pop("CXR_REDIS_URL", None)
        env.pop("CXR_DATABASE_URL", None)
        self.dir.mkdir(parents=True)
        self.log = (self.dir.parent / f"serve-{workers}.log").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve", "--workers", str(workers)],
            cwd=ROOT,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.http = requests.Session()
        deadline = time.time() + 240
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cxr serve exited; see {self.log.name}")
            try:
                if self.http.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError("cxr serve not ready after 240 s")
            time.sleep(0.5)
        key = local_key_file(Settings(data_dir=self.dir)).read_text().strip()
        self.headers = {"Authorization": f"Bearer {key}"}
        self.http.headers.update(self.headers)

    def submit(self, films: list[tuple[str, bytes]], session: requests.Session | None = None):
        files = [("files", (name, data, "application/octet-stream")) for name, data in films]
        r = (session or self.http).post(f"{self.base}/v1/jobs", files=files, timeout=300)
        r.raise_for_status()
        return r.json()["id"]

    def job(self, job_id: str, session: requests.Session | None = None) -> dict:
        r = (session or self.http).get(f"{self.base}/v1/jobs/{job_id}?per_page=1", timeout=60)
        r.raise_for_status()
        return r.json()

    def wait(self, job_ids: list[str], timeout: float = 900) -> list[dict]:
        done: dict[str, dict] = {}
        deadline = time.time() + timeout
        while len(done) < len(job_ids):
            for j in job_ids:  # in order, stopping at the first unfinished one: polling costs
                if j not in done:  # the API CPU that the workers share on a small machine
                    body = self.job(j)
                    if body["status"] not in TERMINAL:
                        break
                    done[j] = body
            if time.time() > deadline:
                raise RuntimeError("jobs not finished in time")
            time.sleep(0.25)
        return [done[j] for j in job_ids]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def e2e_run(stack: Stack, films: list[tuple[str, bytes]]) -> dict:
    """Throughput: first POST to the last result stored (the jobs' completed_at)."""
    t0 = time.time()
    ids = [stack.submit(films[i : i + JOB_SIZE]) for i in range(0, len(films), JOB_SIZE)]
    t_submitted = time.time()
    bodies = stack.wait(ids)
    t_seen = time.time()
    last = max(parse_ts(b["completed_at"]) for b in bodies)
    counts: dict[str, int] = {}
    for b in bodies:
        for k, v in b["counts"].items():
            counts[k] = counts.get(k, 0) + v
    # per-image finish times: when the chunks were stored (a timeline of the workers' output)
    finishes = []
    for j in ids:
        r = stack.http.get(f"{stack.base}/v1/jobs/{j}?per_page=500", timeout=60).json()
        for im in r["images"]:
            d = stack.http.get(f"{stack.base}/v1/images/{im['id']}", timeout=60).json()
            if d.get("finished_at"):
                finishes.append(parse_ts(d["finished_at"]))
    finishes.sort()
    # once the pipeline is full: the films stored after the first chunk, over the time from it
    # to the last (the first chunk's upload, dispatch and decode are the pipeline filling)
    later = [f for f in finishes if f > finishes[0] + 0.05] if finishes else []
    steady = len(later) / (finishes[-1] - finishes[0]) if later else float("nan")
    return {
        "steady": steady,
        "rate": len(films) / (last - t0),
        "wall": last - t0,
        "submit_s": t_submitted - t0,
        "seen_s": t_seen - t0,
        "first_result_s": finishes[0] - t0 if finishes else float("nan"),
        "batches": sorted({round(f - t0, 1) for f in finishes}),
        "counts": counts,
    }


def latency_run(stack: Stack, films: list[tuple[str, bytes]], half_mb: list[tuple[str, bytes]]):
    """Submit latency of 50-image jobs and poll latency with 50 pollers, workers kept busy."""
    busy = [stack.submit(films[i : i + JOB_SIZE]) for i in range(0, len(films), JOB_SIZE)]
    submit_ms = []
    jobs = []
    for _ in range(10):
        start = time.perf_counter()
        jobs.append(stack.submit(half_mb))
        submit_ms.append((time.perf_counter() - start) * 1000)
    targets = busy + jobs
    poll_ms: list[float] = []
    lock = threading.Lock()

    def poller(k: int) -> None:
        """A client waiting for its job as `cxr wait` does: one GET every POLL_INTERVAL s."""
        s = requests.Session()
        s.headers.update(stack.headers)
        mine = []
        time.sleep(k * POLL_INTERVAL / 50)  # the clients did not all start in the same instant
        for n in range(POLLS):
            start = time.perf_counter()
            job = targets[(k + n) % len(targets)]
            r = s.get(f"{stack.base}/v1/jobs/{job}", params=WAIT, timeout=60)
            took = time.perf_counter() - start
            mine.append(took * 1000)
            r.raise_for_status()
            time.sleep(max(0.0, POLL_INTERVAL - took))
        with lock:
            poll_ms.extend(mine)

    def hammer(k: int) -> None:
        """No pause between GETs: the API's capacity, not a client's experience."""
        s = requests.Session()
        s.headers.update(stack.headers)
        for n in range(20):
            s.get(
                f"{stack.base}/v1/jobs/{targets[(k + n) % len(targets)]}", params=WAIT, timeout=60
            )

    serial_ms: dict[str, list[float]] = {"summary": [], "page of 100": []}
    for n in range(20):  # one poller alone: the service time of one GET, without queueing
        for form, params in (("summary", WAIT), ("page of 100", {})):
            start = time.perf_counter()
            url = f"{stack.base}/v1/jobs/{targets[n % len(targets)]}"
            stack.http.get(url, params=params, timeout=60)
            serial_ms[form].append((time.perf_counter() - start) * 1000)
    state_before = stack.job(targets[-1])["status"]
    with cf.ThreadPoolExecutor(50) as pool:
        list(pool.map(poller, range(50)))
    start = time.perf_counter()
    with cf.ThreadPoolExecutor(50) as pool:
        list(pool.map(hammer, range(50)))
    rps = 50 * 20 / (time.perf_counter() - start)
    state_after = stack.job(targets[-1])["status"]
    return submit_ms, poll_ms, serial_ms, rps, (state_before, state_after)


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--films", type=int, default=96)
    parser.add_argument("--baseline-films", type=int, default=24)
    parser.add_argument(
        "--rounds", type=int, default=8, help="(c) submits the films this many times over"
    )
    parser.add_argument("--repeat", type=int, default=3, help="in-process timings: best of")
    parser.add_argument("--skip-e2e", action="store_true", help="only (a) and (b)")
    args = parser.parse_args()

    now = dt.datetime.now(dt.UTC)
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores; {now:%Y-%m-%d %H:%M} UTC")
    real = (DATA / "manifest.csv").is_file()
    films = real_films(args.films) if real else generated_films(args.films)
    origin = f"real, {DATA}" if real else "generated (ml.synthetic)"
    print(f"films: {origin}: {describe(films)}")

    n_base = min(args.baseline_films, len(films))
    rate_a, rate_b, rate_inf, rate_inf_base, steps, by_size = in_process(films, n_base, args.repeat)
    print(f"(a) in-process limit, threaded preprocess + batched predict : {rate_a:7.1f} img/s")
    print(f"(b) baseline, preprocess + model.predict per image : {rate_b:7.1f} img/s")
    print(f"    a/b = {rate_a / rate_b:.1f}x   (best of {args.repeat}; baseline on {n_base} films)")
    print(
        f"    model alone: batched {rate_inf:.1f} img/s vs model.predict per image "
        f"{rate_inf_base:.1f} img/s = {rate_inf / rate_inf_base:.1f}x"
    )
    sizes = ", ".join(f"{k}: {v:.1f}" for k, v in by_size.items())
    print(f"    (a) by chunk size (CXR_CHUNK_SIZE), img/s: {sizes}")
    print("    profile, ms per film, each step alone on one thread (TensorFlow on its own):")
    for name, ms in steps.items():
        print(f"      {name:<36} {ms:6.2f}")
    rows = [
        ("(a) / (b)", f"{rate_a / rate_b:.1f}x", ">= 10x", rate_a / rate_b >= 10),
        (
            "(a) / (b), model alone (no preprocessing)",
            f"{rate_inf / rate_inf_base:.1f}x",
            ">= 10x",
            rate_inf / rate_inf_base >= 10,
        ),
    ]

    if not args.skip_e2e:
        half_mb = [(f"half-{k}.jpg", jpeg(chest_film(1000 + k, 1024, 1024))) for k in range(50)]
        print(f"submit-latency films: {describe(half_mb)}")
        tmp = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
        try:
            for workers in (1, 2):
                stack = Stack(workers, tmp)
                try:
                    stack.submit(films[:2])  # warm the API processes
                    stack.wait([stack.submit(films[:4])])  # and the workers' first batch
                    r = e2e_run(stack, films * args.rounds)
                    ratio = r["rate"] / rate_a
                    print(
                        f"(c) end to end, {workers} worker(s), {len(films) * args.rounds} images: "
                        f"{r['rate']:7.1f} img/s = "
                        f"{ratio:.3f} of (a); {r['wall']:.1f} s (all POSTs done at "
                        f"{r['submit_s']:.1f} s, first result stored at "
                        f"{r['first_result_s']:.1f} s, results seen by poller at "
                        f"{r['seen_s']:.1f} s); image statuses {r['counts']}"
                    )
                    print(
                        f"    steady state, first stored chunk to the last: {r['steady']:.1f} "
                        f"img/s = {r['steady'] / rate_a:.3f} of (a)"
                    )
                    print(f"    results stored at (s after first POST): {r['batches']}")
                    name = f"e2e, {workers} worker(s) / (a)"
                    rows.append((name, f"{ratio:.3f}", ">= 0.85", ratio >= 0.85))
                    steady = r["steady"] / rate_a
                    rows.append(
                        (f"{name}, steady state", f"{steady:.3f}", ">= 0.85", steady >= 0.85)
                    )
                    if workers == 2:
                        sub, poll, serial, rps, states = latency_run(stack, films, half_mb)
                        print(
                            f"(d) submit, 50 x ~0.5 MB, workers busy (10 jobs): p50 "
                            f"{pct(sub, 50):.0f} ms, p99 {pct(sub, 99):.0f} ms"
                        )
                        print(
                            f"    poll, 50 pollers x {POLLS} GETs, one per {POLL_INTERVAL:.0f} s "
                            f"each: p50 {pct(poll, 50):.1f} ms, p99 "
                            f"{pct(poll, 99):.1f} ms, mean {statistics.mean(poll):.1f} ms "
                            f"(last job {states[0]} -> {states[1]} meanwhile); "
                            f"capacity {rps:.0f} GET/s (50 clients, no pause); "
                            "one poller alone: p50 "
                            + ", ".join(f"{pct(v, 50):.1f} ms ({k})" for k, v in serial.items())
                        )
                        p99 = pct(sub, 99)
                        rows.append(("submit p99", f"{p99:.0f} ms", "< 1000 ms", p99 < 1000))
                        rows.append(
                            ("poll p99", f"{pct(poll, 99):.1f} ms", "< 50 ms", pct(poll, 99) < 50)
                        )
                    rss = peak_rss(stack.proc.pid)
                    print(
                        f"(e) peak RSS with {workers} worker(s): celery processes "
                        f"{[round(x) for x in rss['worker']]} MiB; gunicorn processes "
                        f"{[round(x) for x in rss['api']]} MiB"
                    )
                finally:
                    stack.stop()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    print("\n| target | measured | goal | |\n| --- | --- | --- | --- |")
    for name, value, goal, ok in rows:
        print(f"| {name} | {value} | {goal} | {'met' if ok else 'MISSED'} |")


if __name__ == "__main__":
    main()
