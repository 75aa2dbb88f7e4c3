"""A report's markdown page as one self-contained HTML file: every image inlined as a data: URI.

The markdown reports (evaluation, training run, crawl, demo) link their PNGs by relative
path, so they only read well next to their files. The HTML twin is one file that can be
mailed, attached to a ticket or opened from an object store, and it loads nothing from
anywhere (no scripts, fonts or style sheets from the web). It is rendered from the
markdown itself, so the two cannot disagree.

Rendered by Python-Markdown with its tables extension; raw HTML in the markdown is shown
as text, never interpreted.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import markdown
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

from shards.atomic import write_text

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; }
th { background: #f3f3f3; }
img { max-width: 100%; display: block; margin: 1em 0; }
code { background: #f3f3f3; padding: 0 0.2em; }
"""


def data_uri(path: Path) -> str:
    """The file as a data: URI; raises for a missing file or a type a browser may not show."""
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path}: not an image type an HTML report inlines ({', '.join(_MIME)})")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


class _InlineImages(Treeprocessor):
    """Every <img> of the page gets its file's bytes as a data: URI, read relative to `base`."""

    def __init__(self, md: markdown.Markdown, base: Path) -> None:
        super().__init__(md)
        self.base = base

    def run(self, root) -> None:
        for img in root.iter("img"):
            src = img.get("src", "")
            if "://" in src:
                raise ValueError(f"image {src}: a self-contained report inlines local files only")
            img.set("src", data_uri(self.base / src))


class _SelfContained(Extension):
    def __init__(self, base: Path) -> None:
        super().__init__()
        self.base = base

    def extendMarkdown(self, md: markdown.Markdown) -> None:
        md.treeprocessors.register(_InlineImages(md, self.base), "inline_images", 0)
        # Reports quote file names, settings and comparisons ("<x>", "a<b"): text, never markup.
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")


def markdown_to_html(text: str, base: Path, title: str) -> str:
    """A whole page from a report's markdown (Python-Markdown with tables); images are read relative to `base`."""
    body = markdown.markdown(text, extensions=["tables", _SelfContained(base)])
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
        f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_html(markdown: Path, path: Path | None = None) -> Path:
    """Render `markdown` (a report.md) to `path` (default: report.html beside it), atomically; returns the path."""
    markdown = Path(markdown)
    path = markdown.with_suffix(".html") if path is None else Path(path)
    text = markdown.read_text()
    first = next((line for line in text.splitlines() if line.startswith("# ")), "# report")
    write_text(path, markdown_to_html(text, markdown.parent, first[2:].strip()))
    return path
