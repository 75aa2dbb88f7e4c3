"""`python -m scn_scale.demo --out DIR [--scale default|tiny]`: the whole product on one machine, offline, on CPU.

From search queries to a trained and evaluated SCN, with nothing from the internet:
1. synthetic faces: a pool for the embedded web, a clean test set of other people, and a
   RAF-DB-layout tree (7 classes) standing in for a public benchmark;
2. the embedded web (`crawler.localweb`) serves the pool on 127.0.0.1 with web-like noise:
   a share of each query's results from other classes, broken links, duplicates;
3. `crawler.build` crawls it with the default query taxonomy into a shard set; the embedded
   web's ground truth, joined to the crawl's manifest by URL, says which crawl labels are
   wrong, written as a label-override table so training can audit itself;
4. a local Ray cluster on 127.0.0.1; `scn_scale.train` trains SCN and the plain
   cross-entropy baseline on the crawl side by side with the same budget (one DeepSpeed
   worker each on CPU: a core each, nothing to all-reduce);
5. `scn_scale.evaluate` scores both on the clean test set;
6. the RAF-DB-layout tree is imported (`scn_scale.importers rafdb`) and fine-tuned from the
   crawl-pretrained SCN and from scratch, same budget, two workers each (the relabel table
   merged and checked on both ranks every epoch); both evaluated;
7. the report (`scn_scale.demo_report`): what SCN did, measured against the ground truth.

Every stage runs the project's own command line in a child process, as a user would (and
the crawler is never imported here: crawler and scn_scale meet only in the shard format).
Children run in their own sessions and are stopped by group when the demo ends, fails or
is interrupted (SIGINT, SIGTERM); the demo then checks that none of their processes is left.
Everything is written under --out, which a new run empties first.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import yaml

from scn_scale import checkpoint
from scn_scale.train import free_ports
from shards import open_shard_set, read_manifest
from shards.atomic import write_json, write_parquet
from shards.cli import set_flags

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "cluster" / "configs" / "demo.yaml"
#: Marks a directory as a demo's output, so a re-run may empty it (and never anything else).
MARKER = ".scn-demo"
STAGES = 7


@dataclass(frozen=True)
class DemoScale:
    """The demo's sizes. The scales differ only here: the method (loss, relabel rule, optimizer,
    schedule) comes from cluster/configs/demo.yaml and is the same at every scale."""

    name: str
    pool_per_class: int  # faces per class behind the embedded web (8 classes)
    test_per_class: int  # clean test faces per class, other people than the pool's
    rafdb_per_class: int  # RAF-DB-layout faces per class (7 classes, 20% of them test, split by person)
    epochs: int  # crawl training, SCN and baseline alike
    warmup_epochs: int  # SCN's cross-entropy warm-up on the crawl (scn.warmup_epochs)
    relabel_epoch: int  # first epoch SCN relabels in (1-based)
    finetune_epochs: int  # RAF-DB-layout fine-tuning, pretrained and scratch alike
    finetune_warmup_epochs: int
    finetune_relabel_epoch: int
    image_size: int  # training input (the crawl's crops are 112 px, RAF-DB's 100 px)
    batch_size: int  # the batch of one optimizer step, split over a run's ranks
    noise: float = 0.3  # share of each query's results from other classes
    # Which images are filed under other classes: the ambiguous ones (weak expressions), as on the
    # web, where label noise follows the image (see crawler.localweb); "uniform" draws them regardless.
    noise_pick: str = "ambiguous"
    broken: float = 0.05  # broken links (404)
    duplicates: float = 0.05  # images served a second time under another id
    # Ray Train workers per run; the compared runs train side by side. On the crawl one rank per run:
    # each run has a core of its own and no gradient all-reduce. The fine-tuning runs take two ranks
    # each, so the demo also trains with the relabel table synchronized across ranks.
    workers: int = 1
    finetune_workers: int = 2

    @property
    def cluster_cpus(self) -> int:
        """The Ray cluster's logical CPUs: one per Ray Train worker, for two runs at a time."""
        return 2 * max(self.workers, self.finetune_workers)

    def validate(self) -> DemoScale:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name.endswith("warmup_epochs") else 1
            if isinstance(value, int) and value < least:
                raise ValueError(f"demo scale {self.name}: {f.name} must be >= {least}, got {value}")
        for warmup, relabel in (("warmup_epochs", "relabel_epoch"), ("finetune_warmup_epochs", "finetune_relabel_epoch")):
            if getattr(self, relabel) <= getattr(self, warmup):
                raise ValueError(f"demo scale {self.name}: {relabel} must come after the {warmup}")
        for workers in (self.workers, self.finetune_workers):
            if self.batch_size % workers:
                raise ValueError(f"demo scale {self.name}: batch_size {self.batch_size} must split evenly over {workers} ranks")
        if self.rafdb_per_class < 5:
            raise ValueError(f"demo scale {self.name}: rafdb_per_class must be >= 5 so every class has a test face")
        return self


SCALES: dict[str, DemoScale] = {
    # Under 15 minutes on 2 cores (measured; see the README). The recipe from random weights:
    # cross-entropy until the network has fit the clean majority, then SCN, relabeling from the
    # next epoch on (cluster/configs/demo.yaml says why, with the measurements).
    "default": DemoScale(
        name="default", pool_per_class=300, test_per_class=100, rafdb_per_class=70, epochs=10, warmup_epochs=4,
        relabel_epoch=5, finetune_epochs=4, finetune_warmup_epochs=1, finetune_relabel_epoch=3, image_size=48,
        batch_size=64,
    ),
    # The slow test's size: every stage and every file in minutes; its numbers mean little.
    "tiny": DemoScale(
        name="tiny", pool_per_class=12, test_per_class=4, rafdb_per_class=10, epochs=2, warmup_epochs=1,
        relabel_epoch=2, finetune_epochs=1, finetune_warmup_epochs=0, finetune_relabel_epoch=1, image_size=32,
        batch_size=8,
    ),
}


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the demo: unwind, stopping every child on the way out."""


class StageError(RuntimeError):
    """A child failed, or a stage's output is not what the next stage needs."""


# -- child processes -----------------------------------------------------------------------------------


class Child:
    """One child process in its own session, its output copied to a log file and, if `echo`, to the console."""

    def __init__(self, name: str, cmd: Sequence[str], proc: subprocess.Popen, log_path: Path, echo: bool,
                 ready: str | None, graceful: bool) -> None:
        self.name, self.cmd, self.proc, self.log_path, self.echo = name, list(cmd), proc, log_path, echo
        self.ready = ready  # a text whose first line marks the child as ready (servers)
        self.ready_line: str | None = None
        self.graceful = graceful  # stop by SIGTERM to the leader alone, which stops its own children
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float) -> str:
        """The line containing `ready`, once the child printed it; StageError if it exits or takes too long."""
        deadline = time.monotonic() + timeout
        while self.ready_line is None:
            if self.proc.poll() is not None:
                raise StageError(f"{self.name} exited (status {self.proc.returncode}) before it was ready; "
                                 f"see {self.log_path}:\n{self.last_lines()}")
            if time.monotonic() > deadline:
                raise StageError(f"{self.name} was not ready after {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.1)
        return self.ready_line

    def last_lines(self) -> str:
        return "\n".join(f"  | {line}" for line in self.tail)


class Supervisor:
    """Every process the demo starts. Each child gets its own session (so its whole process tree
    can be signalled as one group and found again by session id); `stop_all` ends them all."""

    def __init__(self, log_dir: Path, env: Mapping[str, str], console: Any = None) -> None:
        self.log_dir = log_dir
        self.env = dict(env)
        self.console = console if console is not None else sys.stdout
        self.children: list[Child] = []
        self._console_lock = threading.Lock()

    def spawn(self, name: str, cmd: Sequence[str], *, echo: bool = True, env: Mapping[str, str] | None = None,
              ready: str | None = None, graceful: bool = False) -> Child:
        log_path = self.log_dir / f"{name.replace(' ', '-')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s: %s", name, " ".join(cmd))
        proc = subprocess.Popen(list(cmd), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**self.env, **(env or {})}, start_new_session=True)
        child = Child(name, cmd, proc, log_path, echo, ready, graceful)
        self.children.append(child)
        child.reader = threading.Thread(target=self._pump, args=(child,), name=f"pump-{name}", daemon=True)
        child.reader.start()
        return child

    def _pump(self, child: Child) -> None:
        """Copy the child's output as it comes (tqdm's carriage returns included) to its log and the console."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        partial = ""
        fd = child.proc.stdout.fileno()
        with open(child.log_path, "ab") as log_file:
            while True:
                data = os.read(fd, 65536)
                if not data:
                    break
                log_file.write(data)
                log_file.flush()
                text = decoder.decode(data)
                if child.echo:
                    with self._console_lock:
                        self.console.write(text)
                        self.console.flush()
                partial += text
                *lines, partial = partial.split("\n")
                for line in lines:
                    line = line.rsplit("\r", 1)[-1].rstrip()
                    child.tail.append(line)
                    if child.ready and child.ready_line is None and child.ready in line:
                        child.ready_line = line
        child.proc.stdout.close()

    def finish(self, child: Child) -> None:
        """Wait for a child to end; StageError, with its last lines, unless it ended well."""
        status = child.proc.wait()
        if child.reader is not None:
            child.reader.join()
        if status != 0:
            raise StageError(f"{child.name} failed (exit status {status}); its log is {child.log_path}:\n"
                             f"{child.last_lines()}")

    def run(self, name: str, cmd: Sequence[str], **kwargs: Any) -> Child:
        child = self.spawn(name, cmd, **kwargs)
        self.finish(child)
        return child

    def run_all(self, jobs: Sequence[tuple[str, Sequence[str]]], env: Mapping[str, str] | None = None) -> list[Child]:
        """Run jobs side by side (the 2 cores are otherwise half idle in single-process stages).
        Only the first one's output is shown live; the others' are in their logs."""
        children = [self.spawn(name, cmd, echo=i == 0, env=env) for i, (name, cmd) in enumerate(jobs)]
        for child in children:
            self.finish(child)
        for child in children[1:]:
            print(f"[{child.name}] {child.tail[-1] if child.tail else ''}", file=self.console, flush=True)
        return children

    def stop(self, child: Child, grace: float = 10.0) -> None:
        """End a child and everything in its session: SIGTERM first (to the leader alone if it is
        `graceful`, as `ray start --block` drains its node on SIGTERM), SIGKILL after `grace` seconds."""
        if child.proc.poll() is None:
            try:
                if child.graceful:
                    child.proc.send_signal(signal.SIGTERM)
                else:
                    os.killpg(child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                child.proc.wait(grace)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s of SIGTERM: killing it", child.name, grace)
        deadline = time.monotonic() + grace
        while True:
            members = session_members(child.pid)
            if not members:
                break
            if time.monotonic() > deadline:
                for pid in members:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
            time.sleep(0.2)
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait()
        if child.reader is not None:
            child.reader.join(timeout=5)

    def stop_all(self) -> None:
        """Stop every child still running (last started first) and any process left in their sessions."""
        for child in reversed(self.children):
            if child.proc.poll() is None or session_members(child.pid):
                log.info("stopping %s (pid %d)", child.name, child.pid)
                self.stop(child, grace=45.0 if child.graceful else 10.0)

    def leftovers(self) -> dict[str, list[int]]:
        """Processes still running in the sessions of the children: {child name: pids}, empty when all ended."""
        left = {}
        for child in self.children:
            pids = session_members(child.pid)
            if child.proc.poll() is None:
                pids = sorted(set(pids) | {child.pid})
            if pids:
                left[child.name] = pids
        return left

    def record(self) -> list[dict]:
        return [{"name": c.name, "pid": c.pid, "session": c.pid, "cmd": c.cmd, "status": c.proc.poll(),
                 "log": str(c.log_path)} for c in self.children]


def session_members(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`, read from /proc; [] where /proc is missing."""
    proc = Path("/proc")
    members = []
    if not proc.is_dir():
        return members
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces and parentheses): state ppid pgrp session ...
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return sorted(members)


# -- the ground truth of the crawl -----------------------------------------------------------------------


NOISE_SCHEMA = pa.schema([("key", pa.string()), ("label", pa.int64()), ("true_label", pa.int64())])


def crawl_noise(manifest: Mapping[str, Sequence[Any]], ground_truth: Mapping[str, Any],
                classes: Sequence[str]) -> tuple[pa.Table, dict]:
    """Join the crawl's manifest (key, url, label) to the embedded web's ground truth by URL.

    Returns the label-override table of the samples whose crawl label is wrong, in
    scn_scale.noise's format (key, label = the crawl label, true_label), so training keeps
    the crawl's labels and knows which are noisy; and the measured noise, overall and per
    crawl label. Every crawled URL must be one the embedded web served.
    """
    truth_by_url = {entry["url"]: entry["class"] for entry in ground_truth["images"].values()}
    classes = list(classes)
    rows: dict[str, list] = {"key": [], "label": [], "true_label": []}
    per_class = {c: {"samples": 0, "noisy": 0} for c in classes}
    unknown = []
    for key, url, label in zip(manifest["key"], manifest["url"], manifest["label"]):
        true_class = truth_by_url.get(url)
        if true_class is None:
            unknown.append(url)
            continue
        if true_class not in classes:
            raise StageError(f"sample {key}: true class {true_class!r} is not in the crawl's classes {classes}")
        true_label = classes.index(true_class)
        per_class[classes[label]]["samples"] += 1
        if true_label != label:
            per_class[classes[label]]["noisy"] += 1
            rows["key"].append(key)
            rows["label"].append(int(label))
            rows["true_label"].append(true_label)
    if unknown:
        raise StageError(f"{len(unknown)} crawled URLs are unknown to the embedded web, e.g. {unknown[:3]}")
    samples = sum(v["samples"] for v in per_class.values())
    noisy = len(rows["key"])
    for v in per_class.values():
        v["noise"] = v["noisy"] / v["samples"] if v["samples"] else None
    stats = {"samples": samples, "noisy": noisy, "noise": noisy / samples if samples else 0.0, "per_class": per_class}
    return pa.Table.from_pydict(rows, schema=NOISE_SCHEMA), stats


# -- the demo ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paths:
    """Where every stage writes, all under --out."""

    out: Path

    @property
    def corpus(self) -> Path:
        return self.out / "corpus"

    @property
    def pool(self) -> Path:
        return self.corpus / "pool"

    @property
    def test_faces(self) -> Path:
        return self.corpus / "test"

    @property
    def rafdb_tree(self) -> Path:
        return self.corpus / "rafdb"

    @property
    def crawl(self) -> Path:
        return self.out / "crawl"

    @property
    def ground_truth(self) -> Path:
        return self.out / "web" / "ground_truth.json"

    @property
    def noise_table(self) -> Path:
        return self.out / "labels" / "crawl_noise.parquet"

    @property
    def test_shards(self) -> Path:
        return self.out / "shards" / "test"

    @property
    def rafdb_shards(self) -> Path:
        return self.out / "shards" / "rafdb"

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def evals(self) -> Path:
        return self.out / "eval"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def report(self) -> Path:
        return self.out / "report"


RUNS = {
    "scn": "SCN on the crawl",
    "baseline": "baseline (plain cross-entropy) on the crawl",
    "finetune-crawl": "RAF-DB layout, fine-tuned from the crawl-pretrained SCN",
    "finetune-scratch": "RAF-DB layout, from scratch (never saw the crawl)",
}


class Demo:
    """The seven stages, in order; `run()` returns the results the report is written from."""

    def __init__(self, out: Path, scale: DemoScale, supervisor: Supervisor, config: Path = DEFAULT_CONFIG,
                 seed: int | None = None) -> None:
        self.paths = Paths(out)
        self.scale = scale.validate()
        self.sup = supervisor
        self.config = config
        self.settings: dict[str, Any] = yaml.safe_load(config.read_text())  # the training config, read once
        # Every training run's seed: the config's unless given.
        self.seed = int(self.settings.get("seed", 0)) if seed is None else seed
        self.python = sys.executable
        self.start = time.monotonic()
        self.timings: dict[str, float] = {}
        self.stage_no = 0
        self.web_url = ""
        self.ray_address = ""
        self.ray_temp: Path | None = None  # Ray's session files (outside --out: Ray's socket paths must stay short)
        self.results: dict[str, Any] = {"scale": dataclasses.asdict(scale), "config": str(config), "seed": self.seed}

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.stage_no += 1
        started = time.monotonic()
        print(f"\n=== [{self.stage_no}/{STAGES}] {title}   (elapsed {_clock(started - self.start)}) ===", flush=True)
        yield
        self.timings[title] = round(time.monotonic() - started, 1)
        print(f"--- {title}: done in {_clock(self.timings[title])}", flush=True)

    def _py(self, module: str, *args: Any) -> list[str]:
        return [self.python, "-m", module, *map(str, args)]

    # 1
    def make_corpus(self) -> None:
        s, p = self.scale, self.paths
        # Three seeds, three sets of people. Intensities skewed to strong with a tail to barely-there
        # (beta 2, 1.5), as in real FER data, where most faces show their expression clearly.
        faces = ("--intensity", "beta")
        self.sup.run_all([
            ("synthetic-pool", self._py("crawler.synthetic", "--out", p.pool, "--per-class", s.pool_per_class,
                                        "--seed", 1, *faces)),
            ("synthetic-test", self._py("crawler.synthetic", "--out", p.test_faces, "--per-class", s.test_per_class,
                                        "--seed", 2, *faces)),
            ("synthetic-rafdb", self._py("crawler.synthetic", "--out", p.rafdb_tree, "--per-class", s.rafdb_per_class,
                                         "--seed", 3, "--layout", "rafdb", *faces)),
        ])

    # 2
    def serve_web(self) -> Child:
        s = self.scale
        web = self.sup.spawn("localweb", self._py(
            "crawler.localweb", "--corpus", self.paths.pool, "--port", 0, "--noise", s.noise,
            "--noise-pick", s.noise_pick, "--broken", s.broken, "--duplicates", s.duplicates, "--seed", 0),
            ready="READY ")
        url = web.wait_ready(timeout=120).split("READY ", 1)[1].strip()
        print(f"embedded web at {url} (127.0.0.1 only)", flush=True)
        self.web_url = url
        return web

    # 3
    def crawl(self, web: Child) -> None:
        p, s = self.paths, self.scale
        self.sup.run("crawl", self._py(
            "crawler.build", "--provider", "localweb", "--api-base", self.web_url, "--out", p.crawl,
            # Only the embedded web's own port: not whatever else listens on this machine's loopback.
            "--faces", "none", "--allow-host", f"127.0.0.1:{urlsplit(self.web_url).port}", "--workers", 2,
            # Our own server on loopback: no politeness limit (the default is 10 requests/s per host).
            "--set", "fetch.per_host_rate=0",
            # The web's duplicates are byte copies (the exact stage drops them). Synthetic faces share
            # one layout, so at the default pHash distance (8) a quarter of distinct faces would be
            # dropped as near duplicates; at 2, fewer than 1 in 200 (measured on this generator).
            "--set", "dedupe.max_distance=2"))
        with urllib.request.urlopen(f"{self.web_url}/ground_truth.json", timeout=60) as resp:
            truth = json.load(resp)
        write_json(p.ground_truth, truth)
        self.sup.stop(web)
        print("embedded web stopped", flush=True)

        summary = json.loads((p.crawl / "crawl_summary.json").read_text())
        shard_set = open_shard_set(str(p.crawl))
        manifest = read_manifest(str(p.crawl), columns=["key", "url", "label"]).to_pydict()
        table, noise = crawl_noise(manifest, truth, shard_set.classes)
        write_parquet(p.noise_table, table)
        reported = summary.get("label_noise")
        if reported is not None and reported["noisy"] != noise["noisy"]:
            raise StageError(f"the crawl reported {reported['noisy']} noisy labels, the join to the ground truth "
                             f"finds {noise['noisy']}")
        self.results["crawl"] = {k: summary[k] for k in ("candidates", "fetched", "failed", "duplicates", "written",
                                                          "written_per_class", "skipped") if k in summary}
        self.results["crawl"]["classes"] = list(shard_set.classes)
        self.results["noise"] = noise
        print(f"crawl label noise, measured against the embedded web's ground truth: {noise['noise']:.1%} "
              f"({noise['noisy']} of {noise['samples']} samples) -> {p.noise_table}", flush=True)

        # The clean test set: other people, the crawl's class list (validation needs the same one).
        self.sup.run("import-test", self._py(
            "scn_scale.importers", "imagefolder", "--root", p.test_faces, "--out", p.test_shards, "--split", "test",
            "--classes", ",".join(shard_set.classes), "--dataset", "cleantest"))

    # 4
    def start_cluster(self) -> Child:
        ports = free_ports(9)
        address = f"127.0.0.1:{ports[0]}"
        self.ray_temp = Path(tempfile.mkdtemp(prefix="scn-demo-ray-"))
        head = self.sup.spawn("ray-head", [
            ray_command(self.python), "start", "--head", "--block", "--disable-usage-stats",
            "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--port={ports[0]}",
            f"--dashboard-port={ports[1]}", f"--ray-client-server-port={ports[2]}",
            f"--dashboard-agent-listen-port={ports[3]}", f"--dashboard-agent-grpc-port={ports[4]}",
            f"--runtime-env-agent-port={ports[5]}", f"--metrics-export-port={ports[6]}",
            f"--node-manager-port={ports[7]}", f"--object-manager-port={ports[8]}",
            f"--num-cpus={self.scale.cluster_cpus}", "--num-gpus=0", f"--object-store-memory={300 * 1024**2}",
            f"--temp-dir={self.ray_temp}",
        ], echo=False, ready="Ray runtime started", graceful=True, env={
            # On Linux Ray replaces --node-ip-address=127.0.0.1 by the machine's network address
            # (services.resolve_ip_for_localhost) unless multi-node clusters are off, as they are by
            # default on macOS and Windows. The demo's cluster is one node: keep it on loopback.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            # Processes of the cluster that look it up (Ray Train's placement-group cleaner does)
            # must find this one, not another cluster on the machine.
            "RAY_ADDRESS": address,
            # Nothing to drain on a throwaway cluster: SIGTERM stops it at once (else up to 30 s).
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        })
        head.wait_ready(timeout=180)
        self.ray_address = address
        print(f"Ray head at {self.ray_address} ({self.scale.cluster_cpus} CPUs, loopback only; pid {head.pid})", flush=True)
        return head

    def train_pair(self, runs: Sequence[tuple[str, Sequence[str]]], workers: int) -> None:
        """Train the compared runs side by side, each with `workers` ranks, the same budget and seed.

        A run spends much of its wall time starting (imports in the driver and in every worker,
        rendezvous, DeepSpeed set-up) and between epochs (validation, checkpoints) with a core
        idle; two at once fill those gaps and give the same numbers as one after the other (the
        runs are seeded, measured identical). On the crawl each run has one rank: two 2-rank
        runs on 2 cores trained about 54 images/s between them (four processes time-slicing two
        cores, and a gloo all-reduce of ResNet-18's gradients every step); two 1-rank runs train
        45-60 images/s each, and wait 0.4-0.7 s an epoch for data out of about 40 s.
        """
        s = self.scale
        ds = self.settings.get("deepspeed", "")
        common = [f"out_dir={self.paths.runs}", f"num_workers={workers}", f"image_size={s.image_size}",
                  f"batch_size={s.batch_size // workers}", f"seed={self.seed}"]
        if isinstance(ds, str) and ds and not Path(ds).is_absolute():
            common.append(f"deepspeed={ROOT / ds}")
        self.sup.run_all(
            [(f"train-{name}", self._py("scn_scale.train", "--config", self.config,
                                        *set_flags([*common, f"run_name={name}", *overrides])))
             for name, overrides in runs],
            env={"RAY_ADDRESS": self.ray_address, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        for name, _ in runs:
            freed = prune_checkpoints(self.paths.runs / name)
            print(f"kept the last checkpoint of {name} whole; earlier epochs keep their relabel table, config and "
                  f"state ({freed / 1024**2:.0f} MiB of weights and optimizer state removed)", flush=True)

    def train_crawl(self) -> None:
        s, p = self.scale, self.paths
        common = [f"train_shards={p.crawl}", f"val_shards={p.test_shards}", f"label_overrides={p.noise_table}",
                  f"epochs={s.epochs}", f"scn.warmup_epochs={s.warmup_epochs}", f"scn.relabel_epoch={s.relabel_epoch}"]
        self.train_pair([("scn", ["method=scn", *common]), ("baseline", ["method=baseline", *common])], s.workers)

    # 5 and 6
    def evaluate(self, runs: Sequence[str], shards: Path) -> None:
        self.sup.run_all([
            (f"evaluate-{name}", self._py("scn_scale.evaluate", "--checkpoint", self.paths.runs / name, "--shards", shards,
                                          "--out", self.paths.evals / name, "--loader-workers", 1))
            for name in runs
        ])
        for name in runs:
            report = json.loads((self.paths.evals / name / "report.json").read_text())
            print(f"{RUNS[name]}: accuracy {report['accuracy']:.2%}, mean class accuracy "
                  f"{report['mean_class_accuracy']:.2%} on {report['samples']} test faces", flush=True)

    def finetune(self) -> None:
        s, p = self.scale, self.paths
        self.sup.run("import-rafdb", self._py(
            "scn_scale.importers", "rafdb", "--root", p.rafdb_tree, "--out", p.rafdb_shards))
        common = [f"train_shards={p.rafdb_shards / 'train'}", f"val_shards={p.rafdb_shards / 'test'}",
                  f"epochs={s.finetune_epochs}", f"scn.warmup_epochs={s.finetune_warmup_epochs}",
                  f"scn.relabel_epoch={s.finetune_relabel_epoch}", "method=scn"]
        self.train_pair([("finetune-crawl", [f"init={final_model(p.runs / 'scn')}", *common]),
                         ("finetune-scratch", common)], s.finetune_workers)

    def run(self) -> dict[str, Any]:
        with self.stage("synthetic faces: the web's pool, a clean test set, a RAF-DB-layout tree"):
            self.make_corpus()
        with self.stage("the embedded web on 127.0.0.1, with web-like noise"):
            web = self.serve_web()
        with self.stage("crawl it (crawler.build, default query taxonomy, faces none); import the clean test set"):
            self.crawl(web)
        with self.stage(f"train on the crawl: local Ray cluster, SCN and baseline side by side, "
                        f"{self.scale.workers} DeepSpeed worker(s) each on CPU"):
            head = self.start_cluster()
            self.train_crawl()
        with self.stage("evaluate SCN and baseline on the clean test set"):
            self.evaluate(["scn", "baseline"], self.paths.test_shards)
        with self.stage(f"fine-tune on a RAF-DB-layout benchmark: crawl-pretrained vs from scratch, "
                        f"{self.scale.finetune_workers} workers each"):
            self.finetune()
            self.sup.stop(head, grace=45.0)
            print("Ray cluster stopped", flush=True)
            self.evaluate(["finetune-crawl", "finetune-scratch"], self.paths.rafdb_shards / "test")
        with self.stage("the report"):
            report = self.write_report()
        self.results["report"] = str(report)
        self.results["timings"] = dict(self.timings)
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        return self.results

    # 7
    def write_report(self) -> Path:
        from scn_scale import demo_report

        p = self.paths
        runs = {}
        for name in RUNS:
            run = p.runs / name
            runs[name] = {
                "title": RUNS[name],
                "dir": str(run),
                "metrics": checkpoint.read_metrics(str(run)),
                "eval": json.loads((p.evals / name / "report.json").read_text()),
                "eval_dir": str(p.evals / name),
                "model": str(final_model(run)),
            }
        self.results["runs"] = runs
        scored = score_alpha(final_model(p.runs / "scn"), p.crawl, p.noise_table, self.scale.image_size)
        self.results["alpha"] = scored.stats
        manifest = read_manifest(str(p.crawl), columns=["key", "url"]).to_pydict()
        self.results["alpha_by_intensity"] = alpha_by_intensity(
            scored, dict(zip(manifest["key"], manifest["url"])), json.loads(p.ground_truth.read_text()))
        labels = CrawlLabels.read(p.crawl, p.noise_table)
        table = relabel_table_path(final_model(p.runs / "scn").parent)
        self.results["audit"] = relabel_audit(table, labels)
        self.results["galleries"] = draw_galleries(p.crawl, scored, table, labels, p.report)
        self.results["timings"] = dict(self.timings)
        self.results["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.results["report"] = str(p.report / demo_report.REPORT_MD)  # recorded in results.json too
        return demo_report.write_report(self.results, scored.alpha, scored.noisy, p.report)


def ray_command(python: str) -> str:
    """The `ray` CLI of this environment (beside its python), else the one on PATH."""
    beside = Path(python).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        raise StageError("the `ray` command is missing: install the project (make install) or pip install 'ray[default]'")
    return found


def final_model(run: Path) -> Path:
    """The plain model file of a run's last epoch (the epoch count is the run's metrics file's last line)."""
    metrics = checkpoint.read_metrics(str(run))
    if not metrics:
        raise StageError(f"{run}: no {checkpoint.METRICS_FILE}; did the training run finish?")
    path = run / checkpoint.checkpoint_dir_name(metrics[-1]["epoch"]) / checkpoint.MODEL_FILE
    if not path.is_file():
        raise StageError(f"{path} is missing: the last epoch's checkpoint has no plain model file")
    return path


def prune_checkpoints(run: Path) -> int:
    """Remove the weights and DeepSpeed state of every epoch but the last; returns the bytes freed.

    The trainer keeps every epoch's checkpoint whole (about 200 MiB for ResNet-18 with ZeRO-2
    state), which for the demo's 30 epochs would be gigabytes that nothing reads: the report
    needs the metrics file and the last checkpoint, and a resume needs only the last.
    """
    last = final_model(run).parent
    freed = 0
    for ckpt in sorted(run.glob("checkpoint_epoch_*")):
        if ckpt == last:
            continue
        for part in (ckpt / checkpoint.DEEPSPEED_DIR, ckpt / checkpoint.MODEL_FILE):
            if part.is_dir():
                freed += sum(f.stat().st_size for f in part.rglob("*") if f.is_file())
                shutil.rmtree(part)
            elif part.is_file():
                freed += part.stat().st_size
                part.unlink()
    return freed


@dataclass
class AlphaScores:
    keys: list[str]
    alpha: np.ndarray
    noisy: np.ndarray  # bool, per key: the crawl label is wrong
    stats: dict


def score_alpha(model_file: Path, shards: Path, noise_table: Path, image_size: int) -> AlphaScores:
    """alpha of every crawled sample under the trained model (eval mode, no augmentation), noisy vs clean.

    The trainer logs alpha during training (with augmentation, the model still changing);
    scoring the finished model on the whole set once is the measurement the report's
    histogram shows.
    """
    from scn_scale import metrics
    from scn_scale.data import shard_loader
    from scn_scale.noise import load_ground_truth
    from scn_scale.predictions import collect
    from scn_scale.weights import load_model_file

    model, _, _ = load_model_file(str(model_file))
    loader = shard_loader(open_shard_set(str(shards)), train=False, image_size=image_size, batch_size=64,
                          loader_workers=0)
    pred = collect(model, loader).dedupe()
    noisy_keys = set(load_ground_truth(str(noise_table)))
    noisy = np.array([k in noisy_keys for k in pred.keys], dtype=bool)
    return AlphaScores(pred.keys, pred.alpha, noisy, metrics.alpha_stats(pred.alpha, noisy))


#: Expression-intensity bins of the report's alpha-by-intensity table (the last one includes 1).
INTENSITY_BINS = (0.0, 0.25, 0.5, 0.75, 1.0)


def alpha_by_intensity(scored: AlphaScores, url_of: Mapping[str, str], ground_truth: Mapping[str, Any]) -> dict:
    """Mean alpha of the crawled faces by how strongly they show their true expression.

    SCN's importance weight exists to discount ambiguous samples; the embedded web's ground
    truth knows each image's intensity, so this checks whether the trained alpha does. Neutral
    faces show no expression (intensity 0 by construction) and get a row of their own. Each row:
    samples, noisy ones, mean alpha overall, of its clean and of its noisy samples; plus the
    correlation of alpha with intensity over the faces that show an expression. `url_of` maps
    the crawl's sample keys to the URLs they were fetched from (its manifest).
    """
    truth = {entry["url"]: entry for entry in ground_truth["images"].values()}
    names = ["neutral"] + [f"intensity {lo:.2f}-{hi:.2f}" for lo, hi in zip(INTENSITY_BINS, INTENSITY_BINS[1:])]
    groups: dict[str, list[tuple[float, bool]]] = {name: [] for name in names}
    expressive: list[tuple[float, float]] = []  # (intensity, alpha)
    unknown = 0
    for key, alpha, noisy in zip(scored.keys, scored.alpha.tolist(), scored.noisy.tolist()):
        entry = truth[url_of[key]]
        intensity = entry.get("intensity")
        if entry["class"] == "neutral":
            groups["neutral"].append((alpha, noisy))
        elif intensity is None:
            unknown += 1
        else:
            b = min(int(np.searchsorted(INTENSITY_BINS, intensity, side="right")), len(INTENSITY_BINS) - 1)
            groups[names[b]].append((alpha, noisy))
            expressive.append((intensity, alpha))

    def mean(values: list[float]) -> float | None:
        return float(np.mean(values)) if values else None

    rows = [{"faces": name, "n": len(g), "noisy": sum(n for _, n in g), "alpha_mean": mean([a for a, _ in g]),
             "alpha_clean": mean([a for a, n in g if not n]), "alpha_noisy": mean([a for a, n in g if n])}
            for name, g in groups.items()]
    x = np.array(expressive, dtype=np.float64).reshape(-1, 2)
    corr = float(np.corrcoef(x[:, 0], x[:, 1])[0, 1]) if len(x) > 2 and x.std(axis=0).min() > 0 else None
    return {"rows": rows, "correlation": corr, "without_intensity": unknown}


@dataclass
class CrawlLabels:
    """The crawl's labels and the embedded web's truth, by sample key; and the set's classes."""

    given: dict[str, int]
    truth: dict[str, int]
    classes: tuple[str, ...]

    @classmethod
    def read(cls, shards: Path, noise_table: Path) -> CrawlLabels:
        from scn_scale.noise import load_ground_truth, load_overrides

        manifest = read_manifest(str(shards), columns=["key", "label"]).to_pydict()
        given = dict(zip(manifest["key"], manifest["label"]))
        given.update(load_overrides(str(noise_table)))  # the crawl labels (the same ones: the table restates them)
        truth = {**given, **load_ground_truth(str(noise_table))}
        return cls(given, truth, open_shard_set(str(shards)).classes)


def relabel_table_path(checkpoint_dir: Path) -> Path:
    tables = sorted(checkpoint_dir.glob("*relabel*.parquet"))
    if not tables:
        raise StageError(f"{checkpoint_dir}: no relabel table")
    return tables[0]


def relabel_audit(table: Path, labels: CrawlLabels) -> dict:
    """The final relabel table against the ground truth: precision and recall of SCN's relabeling,
    and the crawl's wrong labels before the table (`noisy`) and after it (`wrong_after`)."""
    from scn_scale.relabel_table import RelabelTable

    audit = RelabelTable.load(str(table)).audit(labels.truth, labels.given, labels.classes)
    audit["table"] = str(table)
    return audit


def draw_galleries(shards: Path, scored: AlphaScores, table: Path, labels: CrawlLabels, out: Path) -> dict[str, str]:
    """The 16 crawled faces SCN gave the lowest alpha, and 16 it relabeled (old -> new label), each
    framed right or wrong against the web's truth: scn_scale.gallery's sheets, as the other reports draw them."""
    from scn_scale import gallery
    from scn_scale.relabel_table import RelabelTable
    from scn_scale.report import save_figure

    images = gallery.SampleImages(str(shards))
    files = {"lowest_alpha": "gallery_lowest_alpha.png", "relabeled": "gallery_relabeled.png"}
    save_figure(gallery.lowest_alpha(
        images, scored.keys, scored.alpha, [labels.given[k] for k in scored.keys], labels.classes,
        truth=labels.truth, title="The 16 crawled faces with the lowest alpha (crawl label; truth)",
    ), out / files["lowest_alpha"])
    save_figure(gallery.relabels(
        images, RelabelTable.load(str(table)).to_pydict(), labels.classes, truth=labels.truth,
        title="16 faces SCN relabeled (crawl label -> new label; truth)",
    ), out / files["relabeled"])
    return files


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# -- entry points ----------------------------------------------------------------------------------------


def prepare_out(out: Path) -> None:
    """Empty `out` for a fresh run, but only if it is a demo's output (or empty): never delete anything else."""
    if out.exists():
        if not out.is_dir():
            raise StageError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()) and not (out / MARKER).exists():
            raise StageError(f"--out {out} is not empty and is not a demo's output ({MARKER} missing): "
                             "choose another directory or empty it yourself")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("written by python -m scn_scale.demo; a new run empties this directory\n")


def child_env() -> dict[str, str]:
    """The environment of every child: unbuffered output (progress streams as it happens), Ray's
    token authentication off for this throwaway loopback cluster (on both sides), DeepSpeed on CPU."""
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", RAY_AUTH_MODE="disabled", DS_ACCELERATOR="cpu")
    env.pop("RAY_ADDRESS", None)  # only the training runs get one: ours
    return env


def run_demo(
    out: str | Path, scale: DemoScale, config: Path = DEFAULT_CONFIG, on_cleanup: Callable[[], None] = lambda: None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run the demo into `out`; returns its results (also in out/report/results.json).

    Whatever happens (a failure, an interrupt turned into an exception by the caller),
    every child is stopped before this returns or raises, and out/logs/processes.json
    records what was started and whether anything was left running. `on_cleanup` is called
    when the stopping begins (the CLI then lets no signal cut it short).
    """
    out = Path(out).resolve()
    prepare_out(out)
    sup = Supervisor(out / "logs", child_env())
    demo = Demo(out, scale, sup, config, seed)
    try:
        return demo.run()
    finally:
        on_cleanup()
        sup.stop_all()
        left = sup.leftovers()
        write_json(out / "logs" / "processes.json", {"children": sup.record(), "left_running": left})
        if demo.ray_temp is not None:
            shutil.rmtree(demo.ray_temp, ignore_errors=True)
        if left:
            log.error("processes left running after the demo: %s", left)
        else:
            log.info("all %d child processes have ended", len(sup.children))


def summary_table(results: dict[str, Any]) -> str:
    """The final table printed at the end: stage times and the headline numbers."""
    rows: list[tuple[str, str]] = [(f"stage: {title}", _clock(s)) for title, s in results["timings"].items()]
    rows.append(("total wall time", _clock(results["elapsed_s"])))
    noise, alpha, audit, runs = results["noise"], results["alpha"], results["audit"], results["runs"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    rows += [
        ("crawl label noise (measured)", f"{pct(noise['noise'])} ({noise['noisy']}/{noise['samples']})"),
        ("mean alpha, noisy / clean", f"{alpha['noisy'].get('mean', float('nan')):.3f} / "
                                      f"{alpha['clean'].get('mean', float('nan')):.3f}"),
        ("relabel precision / recall", f"{pct(audit['precision'])} / {pct(audit['recall'])} "
                                       f"({audit['changed']} changed, {audit['restored']} restored)"),
        ("clean test accuracy, SCN / baseline", f"{pct(runs['scn']['eval']['accuracy'])} / "
                                                f"{pct(runs['baseline']['eval']['accuracy'])}"),
        ("RAF-DB-layout accuracy, pretrained / scratch", f"{pct(runs['finetune-crawl']['eval']['accuracy'])} / "
                                                         f"{pct(runs['finetune-scratch']['eval']['accuracy'])}"),
        ("report", results["report"]),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def main(argv: Sequence[str] | None = None) -> int:
    from scn_scale.config import ConfigError, TrainConfig, load_config
    from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging

    parser = ArgumentParser(prog="python -m scn_scale.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where everything goes (emptied first if it holds a demo)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="default",
                        help="default: the full demo (under 15 minutes on 2 cores); tiny: every stage in minutes")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="training config (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the training seed of every run (model init, data order, augmentation); default: the "
                             "config's. The crawl and the faces do not change with it")
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:  # the training config is read now, not when training starts after the crawl
        load_config(TrainConfig, args.config, [])
    except ConfigError as exc:
        return bad_input(exc)

    stopping: list[str] = []  # set by the first signal, or when the demo starts stopping its children

    def interrupt(signum: int, frame: Any) -> None:
        # The first signal unwinds the demo; none may cut its clean-up short, however it began.
        name = signal.Signals(signum).name
        if stopping:
            print(f"\n{name}: still stopping the demo's processes, please wait", file=sys.stderr, flush=True)
            return
        stopping.append(name)
        raise Interrupted(name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        results = run_demo(args.out, SCALES[args.scale], Path(args.config), on_cleanup=lambda: stopping.append("cleanup"),
                           seed=args.seed)
    except Interrupted as exc:
        print(f"\ninterrupted ({exc}): every process the demo started has been stopped", file=sys.stderr)
        return 130
    except StageError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("\n" + summary_table(results))
    print(f"\nthe report: {results['report']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
