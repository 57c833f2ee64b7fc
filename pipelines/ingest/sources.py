"""List the photos of a source tree (local path or any fsspec URL, e.g. s3://) and read them.

Two layouts:

- plain: ``<root>/<identity>/<photo>`` at any depth; the identity is the photo's parent folder
  (photos directly under the root have no identity, e.g. a gallery of group photos).
- VGGFace2: ``<root>/train_list.txt`` / ``test_list.txt`` (lines ``n000002/0001_01.jpg``)
  with photos under ``<root>/train/`` and ``<root>/test/``, plus ``identity_meta.csv``. The
  lists are the listing (no directory walk over millions of objects); a listed photo that is
  missing is rejected when read.

An input is anything whose name ends in an image extension (any case). Such an entry that
cannot be read (a dangling link, a directory named ``x.jpg``, no permission) is still an input
and ends up in the rejects table: every input lands in exactly one of faces or rejects.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass

from storage import urls

from .decode import TOO_LARGE, Rejected

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".pgm", ".ppm", ".gif")
VGGFACE2_LISTS = ("train_list.txt", "test_list.txt")


@dataclass(frozen=True)
class Source:
    url: str  # what `read_source` opens and what the `source` column records
    identity: str | None
    partition: str | None = None  # VGGFace2 "train"/"test"
    problem: str | None = None  # known unreadable at listing time (not a regular file)


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_sources(root: str, storage_options: dict | None = None) -> list[Source]:
    """Every input photo under ``root``, sorted by URL (the order that decides which duplicate is first)."""
    fs, base = urls.resolve(root, storage_options)
    if not fs.exists(base):
        raise FileNotFoundError(f"source folder not found: {root}")
    if not fs.isdir(base):
        raise ValueError(f"source {root} is a file; give the folder that holds identity/photo files")
    if any(fs.exists(posixpath.join(base, name)) for name in VGGFACE2_LISTS):
        sources = _list_vggface2(root, fs, base)
    else:
        sources = _list_tree(root, fs, base)
    if not sources:
        raise ValueError(f"no photos found under {root} (looked for files ending in {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(sources, key=lambda s: s.url)


def _list_tree(root: str, fs, base: str) -> list[Source]:
    if urls.is_local(root):
        return _list_local_tree(base)
    base = base.rstrip("/")
    out = []
    for path, info in fs.find(base, withdirs=True, detail=True).items():
        name = posixpath.basename(path)
        if path.rstrip("/") == base or not is_image_name(name):
            continue
        parent = posixpath.dirname(path)
        identity = None if parent.rstrip("/") == base else posixpath.basename(parent)
        kind = info.get("type")
        problem = None if kind == "file" else ("is a directory" if kind == "directory" else "not a regular file (dangling link?)")
        out.append(Source(url=_url(root, base, path), identity=identity, problem=problem))
    return out


def _list_local_tree(base: str) -> list[Source]:
    """Local trees: follow symlinks (data folders are often trees of links), flag broken ones."""
    import os

    base = base.rstrip("/") or "/"
    out = []
    seen = {os.path.realpath(base)}
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        identity = None if dirpath == base else os.path.basename(dirpath)
        entries = filenames + dirnames
        # do not descend into image-named folders (they are rejected inputs) or into a link loop
        keep = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if not is_image_name(d) and real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        for name in entries:
            if not is_image_name(name):
                continue
            path = os.path.join(dirpath, name)
            if os.path.isfile(path):
                problem = None
            elif os.path.isdir(path):
                problem = "is a directory"
            else:
                problem = "not a regular file (dangling link?)"
            out.append(Source(url=path, identity=identity, problem=problem))
    return out


def _list_vggface2(root: str, fs, base: str) -> list[Source]:
    out = []
    for list_name in VGGFACE2_LISTS:
        list_path = posixpath.join(base, list_name)
        if not fs.exists(list_path):
            continue
        partition = list_name.split("_")[0]
        text = fs.cat_file(list_path).decode("utf-8", errors="replace")
        for line_no, line in enumerate(text.splitlines(), 1):
            rel = line.strip()
            if not rel:
                continue
            parts = rel.split("/")
            if len(parts) != 2 or ".." in parts:
                raise ValueError(f"{root}/{list_name} line {line_no}: expected 'identity/photo.jpg', got {rel!r}")
            path = posixpath.join(base, partition, rel)
            out.append(Source(url=_url(root, base, path), identity=parts[0], partition=partition))
    return out


def _url(root: str, base: str, path: str) -> str:
    """The source URL in the caller's spelling: a bare path for local disk, scheme://... otherwise."""
    if urls.is_local(root):
        return path
    return urls.join(root, path[len(base.rstrip("/")) + 1:])


def read_source(url: str, max_bytes: int, storage_options: dict | None = None) -> bytes:
    """All bytes of one photo; ``OSError`` when it cannot be read, ``Rejected`` when too big."""
    fs, path = urls.resolve(url, storage_options)
    size = fs.size(path)
    if size is not None and size > max_bytes:
        raise Rejected(TOO_LARGE, f"{size} bytes is over the {max_bytes}-byte limit")
    return fs.cat_file(path)
