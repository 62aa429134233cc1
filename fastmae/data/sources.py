"""Where the images come from: an ImageFolder tree, a file list, webdataset tar shards, or the embedded
procedural set. Every source is random access by index (`read(i) -> bytes`), so sharding, shuffling
and resume are the same index arithmetic for all readers and loaders (see sharding.py).

Accepted `data_path` forms:
  - a folder with class subfolders: root/<class>/<image>  (ImageFolder)
  - a folder of `*.tar` files, or one `.tar` file: webdataset shards (`python -m fastmae.data.pack`);
    each member whose extension is an image extension is one sample
  - a text file (`.txt` / `.lst`): one image path per line, relative to the list's folder or absolute;
    blank lines and lines starting with '#' are skipped, anything after a tab is ignored (e.g. a label)
"""

import io
import os
import tarfile
from functools import lru_cache

import numpy as np
from PIL import Image

from fastmae.data.procedural import draw_image

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LIST_EXTENSIONS = (".txt", ".lst")


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class Source:
    """Random-access images. `num_ignored`: files found while listing that are not images (skipped)."""

    kind: str = "?"
    num_ignored: int = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def read(self, index: int) -> bytes:
        """The encoded file of sample `index` (raises OSError when it cannot be read)."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        raise NotImplementedError


class FileSource(Source):
    """Image files on disk: an ImageFolder tree or a file list."""

    def __init__(self, kind: str, paths: list[str], num_ignored: int):
        self.kind, self.paths, self.num_ignored = kind, paths, num_ignored

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, index: int) -> bytes:
        with open(self.paths[index], "rb") as f:
            return f.read()

    def describe(self, index: int) -> str:
        return self.paths[index]


class TarSource(Source):
    """Webdataset shards read by member offset: one `open` per shard per process, `pread` per sample."""

    kind = "webdataset"

    def __init__(self, shards: list[str], members: list[tuple[int, int, int, str]], num_ignored: int):
        self.shards, self.members, self.num_ignored = shards, members, num_ignored  # (shard, offset, size, name)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.members)

    def __getstate__(self):  # file descriptors do not travel to DataLoader workers
        return {**self.__dict__, "_fds": {}}

    def read(self, index: int) -> bytes:
        shard, offset, size, _ = self.members[index]
        if self._pid != os.getpid():  # forked: the parent's descriptors share its file offsets; reopen
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read in {self.shards[shard]}")
        return data

    def describe(self, index: int) -> str:
        shard, _, _, name = self.members[index]
        return f"{self.shards[shard]}:{name}"


class ProceduralSource(Source):
    """The embedded default set: ProceduralImages drawn on the fly; `array(i)` is [H, W, 3] uint8."""

    kind = "procedural"

    def __init__(self, num_images: int, image_size: int, seed: int):
        self.num_images, self.image_size, self.seed = num_images, image_size, seed

    def __len__(self) -> int:
        return self.num_images

    def array(self, index: int) -> np.ndarray:
        return draw_image(self.seed, index, self.image_size)[0]

    def read(self, index: int) -> bytes:
        raise OSError("procedural images have no encoded file; use array()")

    def describe(self, index: int) -> str:
        return f"procedural[{index}]"


def _list_imagefolder(root: str) -> FileSource:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    paths, ignored = [], 0
    for cls in classes:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, cls), followlinks=True):
            dirnames.sort()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue  # .DS_Store and friends are not data
                if _is_image_name(name):
                    paths.append(os.path.join(dirpath, name))
                else:
                    ignored += 1
    if not paths:
        raise ValueError(f"data_path {root}: no image files ({', '.join(IMG_EXTENSIONS)}) in its class subfolders")
    return FileSource("imagefolder", paths, ignored)


def _list_filelist(list_path: str) -> FileSource:
    base = os.path.dirname(os.path.abspath(list_path))
    paths, ignored = [], 0
    with open(list_path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n").split("\t", 1)[0].strip()
            if not line or line.startswith("#"):
                continue
            if _is_image_name(line):
                paths.append(os.path.normpath(line if os.path.isabs(line) else os.path.join(base, line)))
            else:
                ignored += 1
    if not paths:
        raise ValueError(f"data_path {list_path}: the file list names no image files")
    return FileSource("filelist", paths, ignored)


def _list_tars(shards: list[str]) -> TarSource:
    members, ignored = [], 0
    for s, shard in enumerate(shards):
        try:
            with tarfile.open(shard, "r:") as tar:  # uncompressed only: members must be addressable by offset
                for m in tar:
                    if not m.isfile():
                        continue
                    if _is_image_name(m.name):
                        members.append((s, m.offset_data, m.size, m.name))
                    elif not m.name.lower().endswith((".cls", ".txt", ".json")):  # wds metadata is expected
                        ignored += 1
        except tarfile.TarError as e:
            raise ValueError(f"data_path: {shard} is not a readable uncompressed tar: {e}") from None
    if not members:
        raise ValueError(f"data_path: no image members in the {len(shards)} tar shard(s)")
    return TarSource(shards, members, ignored)


@lru_cache(maxsize=8)
def _open_listing(path: str) -> Source:
    if not os.path.exists(path):
        raise ValueError(f"data_path {path} does not exist")
    if os.path.isfile(path):
        if path.lower().endswith(".tar"):
            return _list_tars([path])
        if path.lower().endswith(LIST_EXTENSIONS):
            return _list_filelist(path)
        raise ValueError(f"data_path {path} is not a folder (nor a .txt/.lst file list or a .tar shard)")
    if not os.path.isdir(path):
        raise ValueError(f"data_path {path} is not a folder")
    entries = sorted(os.scandir(path), key=lambda e: e.name)
    if any(e.is_dir() and not e.name.startswith(".") for e in entries):
        return _list_imagefolder(path)
    tars = [e.path for e in entries if e.is_file() and e.name.lower().endswith(".tar")]
    if tars:
        return _list_tars(tars)
    raise ValueError(
        f"data_path {path} has no class subfolders (ImageFolder layout: root/<class>/<image>) and no .tar shards"
    )


def open_source(data_path: str | None, *, num_images: int = 4096, image_size: int = 64, seed: int = 0) -> Source:
    """The Source for `data_path` (None -> the embedded ProceduralImages). Raises ValueError on bad paths."""
    if data_path is None:
        return ProceduralSource(num_images, image_size, seed)
    return _open_listing(os.path.abspath(os.path.expanduser(data_path)))


def decode_rgb(data: bytes) -> tuple[Image.Image, bool]:
    """Fully decoded RGB PIL image and whether it had to be converted (grayscale, CMYK, RGBA, palette, ...).

    Raises on anything that is not a complete image (PIL refuses truncated files by default)."""
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode == "RGB":
        return img, False
    return img.convert("RGB"), True


def validate_data_path(path: str | None) -> None:
    """Raise ValueError (one line) unless `path` is usable: exists, has images, at least one decodes.

    Cheap: lists the files and decodes only until the first readable image."""
    if path is None:
        return
    source = open_source(path)
    for i in range(len(source)):
        try:
            decode_rgb(source.read(i))
            return
        except Exception:  # noqa: BLE001 - any failure means "not this file"; keep looking
            continue
    raise ValueError(f"data_path {path}: none of its {len(source)} image files is a readable image")
