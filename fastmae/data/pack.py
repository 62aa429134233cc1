"""Pack an ImageFolder into webdataset tar shards.

    python -m fastmae.data.pack /data/imagenet/train /data/imagenet-shards --samples-per-shard 1000

Each sample is two members, `<key>.<ext>` (the original bytes, not re-encoded) and `<key>.cls` (the
class index as text), keys in the ImageFolder's sorted order; shards are `shard-000000.tar`, ...
The loaders read shards by member offset (random access), so shuffling stays per epoch and global,
not limited to a shuffle buffer. Non-image files are left out (and counted).
"""

import argparse
import io
import os
import sys
import tarfile

from tqdm import tqdm

from fastmae.data.sources import open_source, validate_data_path


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # fixed mtime: identical input -> identical shards
    tar.addfile(info, io.BytesIO(data))


def pack(src: str, out_dir: str, samples_per_shard: int = 1000, prefix: str = "shard") -> list[str]:
    """Write the shards; returns their paths."""
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    validate_data_path(src)
    source = open_source(src)
    if source.kind != "imagefolder":
        raise ValueError(f"{src} is a {source.kind}, not an ImageFolder")
    root = os.path.abspath(src)
    classes = sorted({os.path.relpath(p, root).split(os.sep)[0] for p in source.paths})
    class_index = {c: i for i, c in enumerate(classes)}
    os.makedirs(out_dir, exist_ok=True)
    shards, tar = [], None
    for i, path in enumerate(tqdm(source.paths, desc=f"packing {src}", unit="img")):
        if i % samples_per_shard == 0:
            if tar is not None:
                tar.close()
            shards.append(os.path.join(out_dir, f"{prefix}-{len(shards):06d}.tar"))
            tar = tarfile.open(shards[-1], "w", format=tarfile.USTAR_FORMAT)
        ext = os.path.splitext(path)[1].lower().lstrip(".")
        key = f"{i:09d}"
        with open(path, "rb") as f:
            _add(tar, f"{key}.{ext}", f.read())
        _add(tar, f"{key}.cls", str(class_index[os.path.relpath(path, root).split(os.sep)[0]]).encode())
    tar.close()
    print(f"wrote {len(source.paths)} images in {len(shards)} shard(s) to {out_dir}; "
          f"left out {source.num_ignored} non-image file(s)", file=sys.stderr)
    return shards


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="ImageFolder root (root/<class>/<image>)")
    ap.add_argument("out_dir", help="folder for the shards (created)")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--prefix", default="shard")
    args = ap.parse_args(argv)
    try:
        pack(args.src, args.out_dir, args.samples_per_shard, args.prefix)
    except ValueError as e:
        sys.exit(f"pack: {e}")


if __name__ == "__main__":
    main()
