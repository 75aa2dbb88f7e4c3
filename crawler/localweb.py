"""The embedded web: an Openverse-compatible search API over a local face corpus, with web-like faults.

Nothing here reaches the internet, so the crawler's demo and tests crawl this instead.
It answers `GET /v1/images/?q=&page=&page_size=` in Openverse's format and serves the
images at `/images/<id>.<ext>`. A query's text is matched to a class through the
built-in taxonomy (crawler/default_queries.yaml); a share `noise` of its results shows
other classes, the label noise of real web search (each image is listed under one query).
Which images the web files under a wrong query is `noise_pick`: `uniform` (noise independent
of the image, as in the synthetic-noise benchmarks) or `ambiguous` (in proportion to an
image's ambiguity, 1 - its expression intensity from the corpus's corpus.csv: on the real
web a barely-there smile is filed under "neutral" far more often than a grin is under
"angry", and this is the uncertainty SCN's importance weight is meant to find).
Some served URLs are broken (404), slow (the body trickles over `slow_seconds`), or
not images (HTML sent as image/jpeg); some images appear a second time under another
id (`duplicates`). Everything follows from the corpus and the seed: ids depend on the
file path only, so they are stable, and the ground truth (`GET /ground_truth.json`,
`LocalWeb.ground_truth()`) records every image's true class, intensity and noise, so a crawl's
label noise can be measured with `label_noise`.

It listens on a loopback address only: a host outside 127.0.0.0/8 is refused.

    python -m crawler.localweb --corpus DIR [--port 0] [--noise 0.3] [--noise-pick ambiguous] [--seed 0] ...
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import ipaddress
import logging
import math
import random
import signal
import ssl
import sys
import threading
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from aiohttp import web
from PIL import Image

from crawler.queries import keyword_classes, load_queries, normalize_text
from shards.classes import CANONICAL
from shards.cli import ArgumentParser, add_log_level, bad_input, configure_logging

logger = logging.getLogger(__name__)

IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
FAULTS = ("broken", "slow", "nonimage")
NOISE_PICKS = ("uniform", "ambiguous")
LICENSE = ("cc0", "1.0", "https://creativecommons.org/publicdomain/zero/1.0/")
_NOT_AN_IMAGE = (
    b"<!DOCTYPE html><html><head><title>Access denied</title></head>"
    b"<body><h1>Hotlinking is not allowed</h1><p>Please visit our gallery instead.</p></body></html>"
)


@dataclass(frozen=True)
class LocalWebSettings:
    """The noise model and the address. Shares are fractions in [0, 1]; `noise` is per query's results."""

    noise: float = 0.3
    noise_pick: str = "uniform"  # one of NOISE_PICKS
    broken: float = 0.05
    slow: float = 0.02
    nonimage: float = 0.02
    duplicates: float = 0.05
    seed: int = 0
    host: str = "127.0.0.1"
    port: int = 0
    slow_seconds: float = 2.0
    max_page_size: int = 500

    def __post_init__(self) -> None:
        if not 0 <= self.noise < 1:
            raise ValueError(f"noise must be in [0, 1), got {self.noise}")
        if self.noise_pick not in NOISE_PICKS:
            raise ValueError(f"noise_pick must be one of {NOISE_PICKS}, got {self.noise_pick!r}")
        for name in ("broken", "slow", "nonimage", "duplicates"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.broken + self.slow + self.nonimage > 1:
            raise ValueError("broken + slow + nonimage must not exceed 1")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535] (0: any free port), got {self.port}")
        if self.slow_seconds < 0 or self.max_page_size < 1:
            raise ValueError(f"slow_seconds must be >= 0 and max_page_size >= 1, got {self.slow_seconds} and "
                             f"{self.max_page_size}")
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            address = None
        if address is None or address.version != 4 or not address.is_loopback:
            raise ValueError(
                f"the embedded web listens on a loopback address only (127.0.0.0/8), not {self.host!r}"
            )


@dataclass(frozen=True)
class WebImage:
    """One served image: its file, its true class, and what the noise model did to it."""

    id: str
    file: str
    ext: str
    true_class: str
    intensity: float | None  # the expression's intensity, where the corpus records one
    fault: str | None
    duplicate_of: str | None
    width: int | None
    height: int | None
    filesize: int


class Catalog:
    """The model of the web: which images exist, under which ids, with which faults, found by which queries."""

    def __init__(self, corpus: str | Path, settings: LocalWebSettings) -> None:
        self.corpus = Path(corpus)
        self.settings = settings
        self.keywords = keyword_classes(load_queries(None))
        rng = random.Random(settings.seed)
        entries = sorted(read_corpus(self.corpus), key=lambda e: (CANONICAL.index(e.cls), e.file))
        if not entries:
            raise ValueError(f"{self.corpus}: no images found")
        if settings.noise_pick == "ambiguous" and any(e.intensity is None for e in entries):
            raise ValueError(f"{self.corpus}: noise_pick 'ambiguous' needs each image's intensity, "
                             "from an `intensity` column in corpus.csv (crawler.synthetic writes one)")
        sources = []
        for entry in entries:
            sources.append((_stable_id("image", entry.file), entry, None))
            if rng.random() < settings.duplicates:
                sources.append((_stable_id("duplicate", entry.file), entry, _stable_id("image", entry.file)))
        self.images: dict[str, WebImage] = {}
        for image_id, entry, duplicate_of in sources:
            path = self.corpus / entry.file
            width, height = _size(path)
            self.images[image_id] = WebImage(
                id=image_id,
                file=entry.file,
                ext=path.suffix.lower().lstrip("."),
                true_class=entry.cls,
                intensity=entry.intensity,
                fault=_draw_fault(rng, settings),
                duplicate_of=duplicate_of,
                width=width,
                height=height,
                filesize=path.stat().st_size,
            )
        self.results = _list_under_classes(self.images, settings.noise, settings.noise_pick, rng)
        self._ranked: dict[str, list[str]] = {}

    def search(self, text: str) -> list[WebImage]:
        """The ranked results of a query text: its class's list in an order of its own (empty if unknown)."""
        key = normalize_text(text)
        cls = self.keywords.get(key)
        if cls not in self.results:
            return []
        if key not in self._ranked:
            ranked = list(self.results[cls])
            random.Random(f"{self.settings.seed}\0{key}").shuffle(ranked)
            self._ranked[key] = ranked
        return [self.images[i] for i in self._ranked[key]]

    def ground_truth(self, base_url: str) -> dict[str, Any]:
        """Every served image: URL, true class, file, and its noise kinds (label, duplicate, and a fault)."""
        listed: dict[str, list[str]] = {}
        for cls, ids in self.results.items():
            for i in ids:
                listed.setdefault(i, []).append(cls)
        images = {}
        for image in self.images.values():
            classes = listed.get(image.id, [])
            noise = ["label"] if any(c != image.true_class for c in classes) else []
            noise += ["duplicate"] if image.duplicate_of else []
            noise += [image.fault] if image.fault else []
            images[image.id] = {
                "url": image_url(base_url, image),
                "class": image.true_class,
                "intensity": image.intensity,
                "file": image.file,
                "fault": image.fault,
                "duplicate_of": image.duplicate_of,
                "listed_under": classes,
                "noise": noise,
            }
        return {"base_url": base_url, "settings": asdict(self.settings), "images": images}


def _list_under_classes(images: Mapping[str, WebImage], noise: float, pick: str,
                        rng: random.Random) -> dict[str, list[str]]:
    """Which class's search lists each image: every image under one class, so that a share
    `noise` of each class's results shows another class.

    Each class gives `round(noise * n)` of its n images to the searches of other classes
    (which ones: `pick`, see `_pick_moved`) and receives as many back, dealt to the class
    most short of them. An image is found under a wrong query only, as on the web, not also
    under its own (where a crawler would see a conflict between two queries and could set it aside).
    """
    own = {cls: sorted(i for i, im in images.items() if im.true_class == cls) for cls in CANONICAL}
    results = {cls: list(ids) for cls, ids in own.items() if ids}
    given: list[str] = []
    short: dict[str, int] = {}
    for cls, ids in results.items():
        moved = _pick_moved(ids, round(noise * len(ids)), images, pick, rng)
        given += moved
        short[cls] = len(moved)
        results[cls] = [i for i in ids if i not in set(moved)]
    rng.shuffle(given)
    for image_id in given:
        true = images[image_id].true_class
        others = [c for c in results if c != true]
        if not others:  # a corpus of one class has no other query to list it under
            results[true].append(image_id)
            continue
        target = max(others, key=lambda c: (short[c], -CANONICAL.index(c)))
        short[target] -= 1
        results[target].append(image_id)
    return results


def _pick_moved(ids: Sequence[str], k: int, images: Mapping[str, WebImage], pick: str,
                rng: random.Random) -> list[str]:
    """k of a class's images for other classes' searches: uniformly, or (`ambiguous`) each with
    weight 1 - intensity, drawn without replacement (Efraimidis-Spirakis keys u ** (1 / w)).
    A full-intensity image has weight 0 and is moved only once no ambiguous one is left."""
    if pick == "uniform":
        return rng.sample(list(ids), k)
    keys = {}
    for i in ids:
        weight = 1.0 - images[i].intensity
        u = rng.random()
        keys[i] = u ** (1.0 / weight) if weight > 0 else 0.0
    return sorted(ids, key=lambda i: -keys[i])[:k]


@dataclass(frozen=True)
class CorpusEntry:
    file: str  # relative to the corpus
    cls: str
    intensity: float | None  # from corpus.csv's `intensity` column, where it has one


def read_corpus(corpus: Path) -> list[CorpusEntry]:
    """The corpus's images, from `corpus.csv` or else from class-named folders (no intensity then)."""
    index = corpus / "corpus.csv"
    entries = []
    if index.exists():
        try:
            with open(index, newline="", encoding="utf-8") as f:
                for n, row in enumerate(csv.DictReader(f), start=1):
                    if row.get("class") not in CANONICAL:
                        raise ValueError(f"{index}: row {n}: unknown class {row.get('class')!r}; "
                                         f"known: {list(CANONICAL)}")
                    if not (corpus / (row.get("file") or "")).is_file():
                        raise ValueError(f"{index}: row {n}: file {row.get('file')!r} not found under {corpus}")
                    entries.append(CorpusEntry(row["file"], row["class"], _intensity(row.get("intensity"), index, n)))
        except (UnicodeDecodeError, csv.Error) as exc:  # messages that do not name the file
            raise ValueError(f"{index}: not a readable CSV ({exc})") from exc
        return entries
    if not corpus.is_dir():
        raise ValueError(f"corpus {corpus} is not a directory")
    for folder in sorted(p for p in corpus.iterdir() if p.is_dir()):
        if folder.name not in CANONICAL:
            raise ValueError(f"{folder}: folder name is not a class; known: {list(CANONICAL)}")
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_TYPES:
                entries.append(CorpusEntry(path.relative_to(corpus).as_posix(), folder.name, None))
    return entries


def _intensity(text: str | None, index: Path, row: int) -> float | None:
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{index}: row {row}: intensity {text!r} is not a number in [0, 1]")
    return value


def image_url(base_url: str, image: WebImage) -> str:
    return f"{base_url}/images/{image.id}.{image.ext}"


def label_noise(manifest_rows: Iterable[Mapping[str, Any]], ground_truth: Mapping[str, Any]) -> dict[str, Any]:
    """Share of written samples whose label (`label_name`, from the query) differs from the true class.

    Rows are matched to the ground truth by `url`; rows the embedded web never served
    are counted as `unknown` and left out of the shares. Per class means per written label.
    """
    truth = {entry["url"]: entry["class"] for entry in ground_truth["images"].values()}
    samples: Counter[str] = Counter()
    noisy: Counter[str] = Counter()
    unknown = 0
    for row in manifest_rows:
        true_class = truth.get(row["url"])
        if true_class is None:
            unknown += 1
            continue
        samples[row["label_name"]] += 1
        noisy[row["label_name"]] += row["label_name"] != true_class
    total, wrong = sum(samples.values()), sum(noisy.values())
    return {
        "samples": total,
        "noisy": wrong,
        "noise": wrong / total if total else 0.0,
        "unknown": unknown,
        "per_class": {
            c: {"samples": samples[c], "noisy": noisy[c], "noise": noisy[c] / samples[c]}
            for c in CANONICAL
            if samples[c]
        },
    }


class ServerThread:
    """An aiohttp application served from a background thread with its own event loop.

    For in-process servers (the embedded web, test fixtures): `start()` returns once
    the socket listens, `stop()` returns once it is closed and in-flight requests ended.
    With an `ssl_context` it serves https (for clients that only speak https, e.g. yt-dlp).
    """

    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.ssl_context = ssl_context
        self.base_url: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> str:
        loop = asyncio.new_event_loop()
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        started = threading.Event()
        failure: list[BaseException] = []

        async def listen() -> None:
            await runner.setup()
            await web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context).start()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(listen())
            except BaseException as exc:  # reported to the starting thread, which raises it
                failure.append(exc)
            started.set()
            if not failure:
                loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"server-{self.host}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            raise failure[0]
        self.port = runner.addresses[0][1]
        self.base_url = f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"
        return self.base_url

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._thread = self._loop = None

    def __enter__(self) -> ServerThread:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalWeb:
    """The embedded web as a library: `with LocalWeb(corpus, settings) as web: web.base_url ...`."""

    def __init__(self, corpus: str | Path, settings: LocalWebSettings | None = None) -> None:
        self.settings = settings or LocalWebSettings()
        self.catalog = Catalog(corpus, self.settings)
        app = web.Application()
        app.router.add_get("/v1/images/", self._search)
        app.router.add_get("/v1/images/{id}/", self._detail)
        app.router.add_get("/images/{name}", self._image)
        app.router.add_get("/ground_truth.json", self._ground_truth)
        self._server = ServerThread(app, self.settings.host, self.settings.port)

    @property
    def base_url(self) -> str:
        if self._server.base_url is None:
            raise RuntimeError("the embedded web is not started")
        return self._server.base_url

    def start(self) -> str:
        return self._server.start()

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> LocalWeb:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ground_truth(self) -> dict[str, Any]:
        return self.catalog.ground_truth(self.base_url)

    def _item(self, image: WebImage) -> dict[str, Any]:
        """One result in Openverse's format. Titles and tags say nothing of the class, as on the web."""
        url = image_url(self.base_url, image)
        detail = f"{self.base_url}/v1/images/{image.id}/"
        license, version, license_url = LICENSE
        title = f"Portrait {image.id[:8]}"
        return {
            "id": image.id,
            "title": title,
            "foreign_landing_url": detail,
            "url": url,
            "creator": "scn-scale synthetic corpus",
            "creator_url": None,
            "license": license,
            "license_version": version,
            "license_url": license_url,
            "provider": "localweb",
            "source": "localweb",
            "category": "photograph",
            "filesize": image.filesize,
            "filetype": image.ext,
            "tags": [],
            "attribution": f'"{title}" by scn-scale synthetic corpus is marked with CC0 {version}. '
            f"To view the terms, visit {license_url}.",
            "fields_matched": ["title"],
            "mature": False,
            "height": image.height,
            "width": image.width,
            "thumbnail": url,
            "detail_url": detail,
            "related_url": f"{detail}related/",
        }

    async def _search(self, request: web.Request) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            page_size = int(request.query.get("page_size", "20"))
        except ValueError:
            return web.json_response({"detail": "page and page_size must be integers"}, status=400)
        if not 0 < page_size <= self.settings.max_page_size:
            detail = f"Page size must be between 1 & {self.settings.max_page_size} for unauthenticated requests."
            return web.json_response({"detail": detail}, status=401)
        results = self.catalog.search(request.query.get("q", ""))
        page_count = math.ceil(len(results) / page_size)
        if not 1 <= page <= max(page_count, 1):
            return web.json_response({"detail": "Invalid page."}, status=400)
        chunk = results[(page - 1) * page_size : page * page_size]
        return web.json_response(
            {
                "result_count": len(results),
                "page_count": page_count,
                "page_size": page_size,
                "page": page,
                "results": [self._item(image) for image in chunk],
                "warnings": [],
            }
        )

    async def _detail(self, request: web.Request) -> web.Response:
        image = self.catalog.images.get(request.match_info["id"])
        if image is None:
            return web.json_response({"detail": "Not found."}, status=404)
        return web.json_response(self._item(image))

    async def _image(self, request: web.Request) -> web.StreamResponse:
        image_id, _, ext = request.match_info["name"].partition(".")
        image = self.catalog.images.get(image_id)
        if image is None or ext != image.ext or image.fault == "broken":
            return web.Response(status=404, text="Not Found")
        if image.fault == "nonimage":
            return web.Response(body=_NOT_AN_IMAGE, content_type="image/jpeg")
        data = (self.catalog.corpus / image.file).read_bytes()
        content_type = IMAGE_TYPES[f".{image.ext}"]
        if image.fault != "slow":
            return web.Response(body=data, content_type=content_type)
        # A slow host: headers at once, then the body in pieces over slow_seconds.
        response = web.StreamResponse(headers={"Content-Type": content_type, "Content-Length": str(len(data))})
        await response.prepare(request)
        pieces = 4
        step = math.ceil(len(data) / pieces)
        try:
            for start in range(0, len(data), step):
                await asyncio.sleep(self.settings.slow_seconds / pieces)
                await response.write(data[start : start + step])
            await response.write_eof()
        except ConnectionResetError:
            logger.debug("client left during a slow response for %s", image.id)
        return response

    async def _ground_truth(self, request: web.Request) -> web.Response:
        return web.json_response(self.ground_truth())


def _stable_id(kind: str, rel: str) -> str:
    """A UUID (Openverse's id format) from the file path alone, so ids survive reseeding and restarts."""
    return str(uuid.UUID(bytes=hashlib.sha256(f"{kind}:{rel}".encode()).digest()[:16], version=4))


def _draw_fault(rng: random.Random, settings: LocalWebSettings) -> str | None:
    u = rng.random()
    for fault in FAULTS:
        share = getattr(settings, fault)
        if u < share:
            return fault
        u -= share
    return None


def _size(path: Path) -> tuple[int | None, int | None]:
    """Width and height from the header (no decode); None for a file Pillow cannot read."""
    try:
        with Image.open(path) as image:
            return image.size
    except OSError:
        return None, None


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m crawler.localweb", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus folder (corpus.csv, or one folder per class)")
    defaults = LocalWebSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, help="default: %(default)s")
    add_log_level(parser)
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        local_web = LocalWeb(args.corpus, LocalWebSettings(**{name: getattr(args, name) for name in asdict(defaults)}))
        local_web.start()
    except (ValueError, OSError) as exc:  # a bad corpus or setting; an address already in use
        return bad_input(exc)
    stop = threading.Event()
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        print(local_web.base_url)
        print(f"READY {local_web.base_url}", flush=True)
        logger.info("%d images, %d classes", len(local_web.catalog.images), len(local_web.catalog.results))
        while not stop.wait(0.5):
            pass
    finally:
        local_web.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
