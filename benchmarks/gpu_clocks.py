"""The card's clock log that `gpu_check.sh` samples every 200 ms (`nvidia-smi --query-gpu=timestamp,clocks.sm,
clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_event_reasons.active --format=csv -lms 200`, run
with TZ=UTC), read back so that slow steps can be set against clock drops by their wall-clock times."""

import csv
import datetime as dt
from dataclasses import dataclass
from pathlib import Path

# NVML's clock-event (formerly "throttle") reason bits, as nvidia-smi prints them in hex
REASONS = {0x1: "idle", 0x2: "application clocks", 0x4: "SW power cap", 0x8: "HW slowdown", 0x10: "sync boost",
           0x20: "SW thermal slowdown", 0x40: "HW thermal slowdown", 0x80: "HW power brake", 0x100: "display clocks"}


@dataclass(frozen=True)
class Sample:
    t: float  # unix seconds
    sm_mhz: float | None
    mem_mhz: float | None
    power_w: float | None
    temp_c: float | None
    util_pct: float | None
    reasons: int


def _number(text: str) -> float | None:
    """'1980 MHz' -> 1980.0, '512.34 W' -> 512.34, '[N/A]' or '' -> None."""
    word = text.strip().split(" ")[0]
    try:
        return float(word)
    except ValueError:
        return None


def _column(header: list[str], *prefixes: str) -> int | None:
    for i, name in enumerate(header):
        if name.strip().startswith(prefixes):
            return i
    return None


def read(path: Path | str) -> list[Sample]:
    """Samples in file order; lines that do not parse (an nvidia-smi error message, a cut last line) are skipped."""
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    if not lines:
        return []
    header = lines[0]
    cols = {key: _column(header, *prefixes) for key, prefixes in {
        "t": ("timestamp",), "sm": ("clocks.current.sm", "clocks.sm"), "mem": ("clocks.current.memory", "clocks.mem"),
        "power": ("power.draw",), "temp": ("temperature.gpu",), "util": ("utilization.gpu",),
        "reasons": ("clocks_event_reasons.active", "clocks_throttle_reasons.active")}.items()}
    if cols["t"] is None:
        return []
    samples = []
    for line in lines[1:]:
        try:
            stamp = dt.datetime.strptime(line[cols["t"]].strip(), "%Y/%m/%d %H:%M:%S.%f")
        except (ValueError, IndexError):
            continue

        def value(key: str) -> float | None:
            i = cols[key]
            return _number(line[i]) if i is not None and i < len(line) else None

        i = cols["reasons"]
        try:
            reasons = int(line[i].strip(), 16) if i is not None and i < len(line) else 0
        except ValueError:
            reasons = 0
        samples.append(Sample(stamp.replace(tzinfo=dt.timezone.utc).timestamp(), value("sm"), value("mem"),
                              value("power"), value("temp"), value("util"), reasons))
    return samples


def describe(mask: int) -> str:
    """'SW power cap + HW slowdown'; 'none' for 0."""
    names = [name for bit, name in REASONS.items() if mask & bit]
    unknown = mask & ~sum(REASONS)
    if unknown:
        names.append(hex(unknown))
    return " + ".join(names) or "none"


def during(samples: list[Sample], start: float, end: float, slack: float = 0.2) -> list[Sample]:
    """Samples taken between start and end (unix seconds), widened by `slack` on each side: at one sample per
    200 ms a 50 ms step may hold none of its own."""
    return [s for s in samples if start - slack <= s.t <= end + slack]
