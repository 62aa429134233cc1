"""Images/s of the DALI and torchvision pretraining loaders on the same machine, same cores, same JPEGs.

    python -m benchmarks.data.bench_loaders                     # CPU: 1 core and all cores
    python -m benchmarks.data.bench_loaders --cores 1 --num-images 256 --repeats 2   # quick

The JPEGs are procedural images with photo-like texture and grain (fastmae.data.synth_files), of
ImageNet-like sizes (333-500 px sides), written once into --image-dir; flat-colour images would
flatter every decoder. Each (loader, cores) point runs in a fresh subprocess pinned to the first
`cores` CPUs (sched_setaffinity, inherited by DataLoader workers and DALI threads): torchvision gets
`cores` DataLoader workers, DALI `cores` threads. One untimed warm-up epoch (page cache, pipeline
build), then `repeats` timed epochs of batches consumed on the host; best and median are reported.
The machine may be shared: the load average before and after each point is recorded.

Writes benchmarks/results/data_loaders.{json,csv,md,png}. Only what ran here is written; GPU decoding
("dali-gpu", nvJPEG / hardware decoder) is listed as not measured unless it ran.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, bar_chart, environment, markdown_table, write_csv, write_json

RESULTS = REPO / "benchmarks" / "results"


def make_images(image_dir: Path, num_images: int, quality: int) -> dict:
    from fastmae.data.synth_files import write_imagefolder

    marker = image_dir / f".complete-{num_images}-q{quality}"
    if not marker.exists():
        import shutil

        shutil.rmtree(image_dir, ignore_errors=True)
        print(f"writing {num_images} JPEGs to {image_dir} ...", file=sys.stderr)
        write_imagefolder(str(image_dir), num_images, seed=0, min_side=333, max_side=500, num_classes=10,
                          quality=quality)
        marker.touch()
    sizes = [p.stat().st_size for p in image_dir.rglob("*.jpg")]
    return {"num_images": len(sizes), "mean_kib": sum(sizes) / len(sizes) / 1024, "jpeg_quality": quality}


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all its threads, and its children (live DataLoader
    workers read from /proc, reaped ones from os.times). Unlike wall time, it barely moves when other
    jobs share the cores, so images per CPU-second is the robust "per core" figure on a busy machine."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    me, tick = str(os.getpid()), os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if fields[1] == me:  # ppid
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def measure(kind: str, cores: int, image_dir: str, input_size: int, batch_size: int, repeats: int) -> dict:
    """One point, in this (fresh) process: pin to `cores` CPUs, warm up one epoch, time `repeats` epochs."""
    os.sched_setaffinity(0, set(range(cores)))
    import torch

    torch.set_num_threads(cores)
    from fastmae.data import dali_feed
    from fastmae.data.loader import DataConfig, build_pretrain_loader

    host = {"s": 0.0}  # time DALI spends in the Python feed (file read, header, crop params)
    if kind == "dali":
        inner = dali_feed.DaliFeed.batch

        def timed(self, *a, **k):
            t = time.perf_counter()
            out = inner(self, *a, **k)
            host["s"] += time.perf_counter() - t
            return out

        dali_feed.DaliFeed.batch = timed
    cfg = DataConfig(data_path=image_dir, input_size=input_size, batch_size=batch_size, num_workers=cores,
                     loader=kind, device="cpu")
    loader = build_pretrain_loader(cfg)
    rates, per_cpu_s, load_before = [], [], os.getloadavg()[0]
    for epoch in range(repeats + 1):
        loader.set_epoch(epoch)
        host["s"] = 0.0
        c, t = cpu_seconds(), time.perf_counter()
        n = 0
        for imgs in loader:  # [B, 3, S, S]
            n += imgs.shape[0]
        dt, dc = time.perf_counter() - t, cpu_seconds() - c
        if epoch > 0:  # epoch 0 is the warm-up
            rates.append(n / dt)
            per_cpu_s.append(n / dc)
            host_us = host["s"] / n * 1e6
    return {
        "loader": loader.name, "cores": cores, "images_per_epoch": n,
        "img_s_best": max(rates), "img_s_median": statistics.median(rates),
        "img_s_per_core": max(rates) / cores,
        "img_per_cpu_s": statistics.median(per_cpu_s),
        "dali_host_us_per_img": host_us if kind == "dali" else None,
        "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", default=None, help="comma list; default 1 and all")
    ap.add_argument("--loaders", default="torchvision,dali")
    ap.add_argument("--num-images", type=int, default=512)
    ap.add_argument("--input-size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--image-dir", default=str(REPO / ".build" / "bench_data_jpegs"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--_point", nargs=2, help=argparse.SUPPRESS)  # internal: kind cores, in a subprocess
    ap.add_argument("--render", metavar="JSON", help="re-render md/csv/png from an earlier data_loaders.json")
    args = ap.parse_args(argv)
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        for k in ("input_size", "batch_size", "repeats"):
            setattr(args, k, saved["setup"][k])
        write(saved["rows"], saved["setup"], args, Path(args.out), env=saved["environment"])
        return
    if args._point:
        row = measure(args._point[0], int(args._point[1]), args.image_dir, args.input_size, args.batch_size,
                      args.repeats)
        print("RESULT " + json.dumps(row))
        return

    ncpu = len(os.sched_getaffinity(0))
    cores = [int(c) for c in args.cores.split(",")] if args.cores else sorted({1, ncpu})
    data = make_images(Path(args.image_dir), args.num_images, args.quality)
    rows = []
    for c in cores:
        for kind in args.loaders.split(","):
            cmd = [sys.executable, "-m", "benchmarks.data.bench_loaders", "--_point", kind, str(c),
                   "--image-dir", args.image_dir, "--input-size", str(args.input_size),
                   "--batch-size", str(args.batch_size), "--repeats", str(args.repeats)]
            out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True).stdout
            row = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            print(f"{row['loader']:12s} cores={c}  {row['img_s_best']:8.1f} img/s  "
                  f"({row['img_s_per_core']:.1f} per core, {row['img_per_cpu_s']:.1f} per CPU-second)",
                  file=sys.stderr)
            rows.append(row)
    for c in cores:  # DALI over torchvision, per core count
        tv = next((r for r in rows if r["cores"] == c and r["loader"] == "torchvision"), None)
        for r in rows:
            if r["cores"] == c and tv is not None:
                r["speedup_vs_torchvision"] = r["img_s_best"] / tv["img_s_best"]
                r["cpu_efficiency_vs_torchvision"] = r["img_per_cpu_s"] / tv["img_per_cpu_s"]
    write(rows, data, args, Path(args.out))


def write(rows: list[dict], data: dict, args, out: Path, env: dict | None = None) -> None:
    """Writes the results; `env` is given when re-rendering an earlier measurement (--render)."""
    if env is None:
        import nvidia.dali
        import PIL
        import torchvision

        env = {**environment("cpu"), "dali": nvidia.dali.__version__, "torchvision": torchvision.__version__,
               "pillow": PIL.__version__, "cpus_on_machine": os.cpu_count()}
    setup = {**data, "input_size": args.input_size, "batch_size": args.batch_size, "repeats": args.repeats}
    not_measured = [
        "dali-gpu (device 'mixed': nvJPEG + H100 hardware JPEG decoder): no GPU on this machine, and the lent "
        "GPU machine has no DALI (its wheel is too large to carry there)",
        "more than the cores listed here: this machine has only " + str(os.cpu_count()) + " cores",
    ]
    out.mkdir(parents=True, exist_ok=True)
    write_json({"environment": env, "setup": setup, "rows": rows, "not_measured": not_measured},
               out / "data_loaders.json")
    write_csv(rows, out / "data_loaders.csv", env={**env, **setup})
    cols = ["loader", "cores", "img_s_best", "img_s_median", "img_s_per_core", "speedup_vs_torchvision",
            "img_per_cpu_s", "cpu_efficiency_vs_torchvision", "dali_host_us_per_img", "load_avg_before", "load_avg_after"]
    md = [
        "# Data loaders: images/s (CPU)\n",
        f"Measured on **{env['device']}** ({os.cpu_count()} cores, shared with other jobs: see load averages), "
        f"{env['date_utc']}, commit `{env['git_commit']}`; torch {env['torch']}, torchvision "
        f"{env['torchvision']}, Pillow {env['pillow']}, DALI {env['dali']} (CPU, device_id=None).\n",
        f"Input: {data['num_images']} procedural textured JPEGs, 333-500 px sides, quality {data['jpeg_quality']}, "
        f"mean {data['mean_kib']:.1f} KiB; output [{args.batch_size}, 3, {args.input_size}, {args.input_size}] "
        "float32 on the host; MAE augmentation (RandomResizedCrop 0.2-1 bicubic, flip, normalise). dali-cpu: ROI "
        "decode in DALI, resize + flip + normalise in torch (fastmae/data/host_resize.py). "
        f"Best of {args.repeats} epochs after a warm-up epoch.\n",
        "`img_s_*`: wall-clock images/s (best / median epoch); `img_per_cpu_s`: images per CPU-second used by the "
        "loader (its process, threads and worker processes; median epoch), the per-core figure that other jobs "
        "on the machine disturb least.\n",
        markdown_table(rows, cols),
        "\nDALI over torchvision, images per CPU-second (target >= 2x per core): " + ", ".join(
            f"{r['cores']} core(s) {r['cpu_efficiency_vs_torchvision']:.2f}x"
            for r in rows if r["loader"].startswith("dali") and r.get("cpu_efficiency_vs_torchvision")
        ) + ". Wall-clock ratios on this shared machine swing with the other jobs' load (columns load_avg_*).\n",
        "\nNot measured:\n" + "".join(f"- {n}\n" for n in not_measured),
        "\n![images/s](data_loaders.png)\n",
    ]
    (out / "data_loaders.md").write_text("\n".join(md))
    groups = [f"{c} core{'s' if c > 1 else ''}" for c in sorted({r['cores'] for r in rows})]
    series = {}
    for r in rows:  # the per-CPU-second figure: wall-clock rates on a shared machine are mostly noise
        series.setdefault(r["loader"], [None] * len(groups))[groups.index(
            f"{r['cores']} core{'s' if r['cores'] > 1 else ''}")] = r["img_per_cpu_s"]
    bar_chart(groups, series, "images per CPU-second (median epoch)",
              f"MAE pretraining input, {args.input_size}px, on {env['device']} (shared)", out / "data_loaders.png")
    print(f"wrote {out}/data_loaders.{{json,csv,md,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
