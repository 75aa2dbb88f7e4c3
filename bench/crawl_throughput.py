"""Crawl throughput: `crawler.build` against img2dataset on the same URL list from the same server.

One run: the embedded web (`python -m crawler.localweb`, faults off) serves a corpus of
web-sized JPEG faces on 127.0.0.1; both tools crawl the same URL list into 112x112
centre crops with the same number of processes, and the script prints images written
per second of wall time (start to exit, imports included) for each and the ratio
(target >= 1.0). Then the crawler with MTCNN on: images per second per core.

img2dataset lives in its own venv (it pins its own dependencies); the script creates
it when missing:

    python bench/crawl_throughput.py [--images 2000] [--workers 2] [--i2d-venv /tmp/i2d-venv]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
CLASSES = ("neutral", "happiness", "sadness", "surprise")


def build_corpus(root: Path, images: int) -> Path:
    """Synthetic faces enlarged to web sizes (384-768 px, JPEG q85-95), one folder per class; cached."""
    from crawler.synthetic import generate_face
    from crawler.synthetic_draw import sample_identity

    corpus = root / f"corpus-{images}"
    if (corpus / "done").exists():
        return corpus
    shutil.rmtree(corpus, ignore_errors=True)
    for i in tqdm(range(images), desc="corpus", unit="img"):
        rng = np.random.default_rng([7, i])
        cls = CLASSES[i % len(CLASSES)]
        face, _ = generate_face(rng, cls, size=112, identity=sample_identity(np.random.default_rng([8, i])))
        side = int(rng.integers(384, 769))
        canvas = Image.new("RGB", (side, side + int(rng.integers(0, 128))), tuple(int(v) for v in rng.integers(0, 256, 3)))
        big = face.resize((int(side * rng.uniform(0.35, 0.7)),) * 2, Image.Resampling.BICUBIC)
        canvas.paste(big, (int(rng.integers(0, canvas.width - big.width)), int(rng.integers(0, canvas.height - big.height))))
        path = corpus / cls / f"{cls}-{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        canvas.save(buf, format="JPEG", quality=int(rng.integers(85, 96)))
        path.write_bytes(buf.getvalue())
    (corpus / "done").write_text("ok\n")
    return corpus


def start_web(corpus: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "crawler.localweb", "--corpus", str(corpus), "--noise", "0", "--broken", "0",
         "--slow", "0", "--nonimage", "0", "--duplicates", "0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:  # type: ignore[union-attr]
        if line.startswith("READY "):
            return proc, line.split()[1]
    raise RuntimeError("the embedded web did not start")


def url_list(base_url: str, path: Path, limit: int | None = None) -> int:
    with urllib.request.urlopen(f"{base_url}/ground_truth.json") as resp:
        truth = json.load(resp)
    rows = sorted((entry["url"], entry["class"]) for entry in truth["images"].values())[:limit]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["url", "label"])
        writer.writerows(rows)
    return len(rows)


def timed(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall seconds and CPU seconds (user + system, the command and every process it waited for)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def run_ours(urls: Path, out: Path, workers: int, faces: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    seconds, cpu = timed([
        sys.executable, "-m", "crawler.build", "--provider", "urllist", "--input", str(urls), "--out", str(out),
        "--faces", faces, "--allow-host", "127.0.0.1", "--workers", str(workers), "--image-size", "112",
        "--no-progress", "--log-level", "WARNING",
        # One host serves everything here: lift the per-host politeness limits, as for an allow-listed mirror.
        "--set", "fetch.per_host_rate=0", "--set", "fetch.per_host_concurrency=64", "--set", "fetch.concurrency=64",
    ])
    summary = json.loads((out / "crawl_summary.json").read_text())
    # Crawled: fetched, decoded and cropped; near copies among them are then dropped, not written.
    crawled = summary["statuses"].get("ok", 0) + summary["statuses"].get("duplicate", 0)
    return _figures(seconds, cpu, crawled, written=summary["written"], crawl_phase_s=summary["crawl_s"])


def _figures(seconds: float, cpu: float, crawled: int, **extra) -> dict:
    return {"images_per_s": round(crawled / seconds, 1), "cpu_ms_per_image": round(1000 * cpu / max(crawled, 1), 1),
            "seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "crawled": crawled, **extra}


def ensure_img2dataset(venv: Path) -> Path:
    exe = venv / "bin" / "img2dataset"
    if not exe.exists():
        print(f"creating {venv} with img2dataset (PyPI) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "img2dataset"], check=True)
    return exe


def run_img2dataset(exe: Path, urls: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    seconds, cpu = timed([
        str(exe), "--url_list", str(urls), "--input_format", "csv", "--url_col", "url", "--caption_col", "label",
        "--output_format", "webdataset", "--output_folder", str(out), "--processes_count", str(workers),
        "--thread_count", "64", "--image_size", "112", "--resize_mode", "center_crop", "--encode_quality", "95",
        "--timeout", "20", "--retries", "0", "--enable_wandb", "False", "--number_sample_per_shard", "1000",
        "--distributor", "multiprocessing",
    ], env={**os.environ, "PYTHONWARNINGS": "ignore"})
    written = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return _figures(seconds, cpu, written, written=written)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="processes for each tool")
    parser.add_argument("--mtcnn-images", type=int, default=400, help="images for the MTCNN run (0: skip)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs of each tool")
    parser.add_argument("--i2d-venv", default="/tmp/i2d-venv")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "crawl"))
    args = parser.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    corpus = build_corpus(root, args.images)
    exe = ensure_img2dataset(Path(args.i2d_venv))
    web, base_url = start_web(corpus)
    try:
        n = url_list(base_url, root / "urls.csv")
        ours, theirs = [], []
        for _ in range(args.repeats):  # alternate, so both see the same machine load
            ours.append(run_ours(root / "urls.csv", root / "ours", args.workers, "none"))
            theirs.append(run_img2dataset(exe, root / "urls.csv", root / "img2dataset", args.workers))
        best_ours = max(ours, key=lambda r: r["images_per_s"])
        best_theirs = max(theirs, key=lambda r: r["images_per_s"])
        result = {
            "images": n,
            "workers": args.workers,
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "crawler_faces_none": best_ours,
            "img2dataset": best_theirs,
            "ratio": round(best_ours["images_per_s"] / best_theirs["images_per_s"], 3),
            "cpu_ratio": round(best_theirs["cpu_ms_per_image"] / best_ours["cpu_ms_per_image"], 3),
            "runs": {"crawler_faces_none": ours, "img2dataset": theirs},
        }
        if args.mtcnn_images:
            m = url_list(base_url, root / "urls-mtcnn.csv", args.mtcnn_images)
            r = run_ours(root / "urls-mtcnn.csv", root / "ours-mtcnn", args.workers, "mtcnn")
            r["images_per_s"] = round(m / r["seconds"], 2)
            r["images_per_s_per_core"] = round(m / r["seconds"] / args.workers, 2)
            r["cpu_ms_per_image"] = round(1000 * r["cpu_s"] / m, 1)
            result["crawler_mtcnn"] = {"images": m, **r}
    finally:
        web.terminate()
        web.wait()
    a, b = result["crawler_faces_none"], result["img2dataset"]
    print(f"{n} images from the embedded web, {args.workers} processes each, wall time incl. start-up, "
          f"load average {result['load_average'][0]:.1f}")
    print(f"crawler.build --faces none  {a['images_per_s']:8.1f} images/s  {a['cpu_ms_per_image']:6.1f} CPU ms/image")
    print(f"img2dataset                 {b['images_per_s']:8.1f} images/s  {b['cpu_ms_per_image']:6.1f} CPU ms/image")
    if "crawler_mtcnn" in result:
        r = result["crawler_mtcnn"]
        print(f"crawler.build --faces mtcnn {r['images_per_s']:8.2f} images/s, {r['images_per_s_per_core']:.2f} per core, "
              f"{r['cpu_ms_per_image']:.0f} CPU ms/image ({r['images']} images)")
    print(f"ratio                       {result['ratio']:8.2f}   (target >= 1.0, goal 1.5); "  # the last line: the contract
          f"CPU per image ratio {result['cpu_ratio']:.2f}")
    (root / "crawl_throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
