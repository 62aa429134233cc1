"""What Inductor left to eager kernels in the graphs it compiled: reads the wrapper modules it wrote to its cache
(each compiled graph's `call()`), and counts its own generated kernels against its calls of library kernels
(`extern_kernels.mm`, cuDNN attention) and of aten ops it did not lower (a fallback, e.g. `aten.sum`), with the
source ops each fallback stands for. No GPU is needed to read a cache that a GPU run wrote.

    python benchmarks/inductor_fallbacks.py                  # torch's default cache dir of this user
    python benchmarks/inductor_fallbacks.py /tmp/torchinductor_root --out fallbacks.txt

Why: the compiled ViT-B step of 2026-11-27 ran 84 `aten::sum` reduce kernels per step (1.1 ms, in the reference
and in fastmae alike), which a fully lowered graph would not (NOTES §6.7).
"""

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

CALL = re.compile(r"\b(extern_kernels\.\w+|torch\.ops\.\w+\.\w+(?:\.\w+)?|aten\.\w+(?:\.\w+)?)\(")
KERNEL = re.compile(r"\b((?:triton|cpp)_\w+)(?:\.run)?\(")
SOURCE = re.compile(r"#\s*Topologically Sorted Source Nodes: \[(.*?)\], Original ATen: \[(.*?)\]")
NOT_WORK = ("torch.ops.inductor._alloc_from_pool", "torch.ops.aten.set_", "aten.set_")  # memory plumbing
# A reduction the wrapper runs as a tensor method, e.g. `buf57 = workspace_2[...].view(1576, 512).sum(dim=0)`:
# the last stage of a "mix order reduction" (torch >= 2.10: a LayerNorm backward's weight and bias gradients are
# summed per block of rows inside its Triton kernel, and the rows of partial sums are added up by eager torch).
# Each is one aten reduction launch on the GPU (NOTES §6.9: the 84 `aten::sum` of the compiled ViT-B step).
TENSOR_REDUCE = re.compile(r"\)\.(sum|amax|amin|prod|mean)\(dim=")


def _code_lines(lines: list[str]) -> list[bool]:
    """For each line, whether it is the wrapper's own code: False inside a triple-quoted string, which is where a
    wrapper embeds each kernel's source (with config.benchmark_kernel, each carries its own `def call(args)`)."""
    inside, code = False, []
    for line in lines:
        code.append(not inside)
        if line.count("'''") % 2:
            inside = not inside
    return code


def scan_file(path: Path) -> dict | None:
    """Counts for one wrapper module (None if the file is not one): kernels, library calls, aten fallbacks."""
    lines = path.read_text(errors="replace").splitlines()
    code = _code_lines(lines)
    # the graph's `def call(args)`: module level in older wrappers, a method of `Runner` in newer ones
    start = next((i for i, line in enumerate(lines) if code[i] and re.match(r"\s*def call\(", line)), None)
    if start is None:
        return None
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines))
    body = "\n".join(lines[start + 1:end])
    kernels, library, fallbacks, custom, sources = Counter(), Counter(), Counter(), Counter(), {}
    # a fallback often has no source comment of its own: keep the last comment and the last kernel seen before it
    last_source, last_kernel = "", ""
    for line in body.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            match = SOURCE.search(stripped)
            if match:
                last_source = match.group(2)
            continue
        for name in KERNEL.findall(stripped):
            kernels[name] += 1
            last_kernel = name
        for name in CALL.findall(stripped):
            if name.startswith(NOT_WORK):
                continue
            short = name.removeprefix("torch.ops.")
            if name.startswith("extern_kernels.") or "_attention" in name or "_efficient" in name:
                library[short] += 1
            elif short.split(".")[0] not in ("aten", "prims", "inductor"):
                custom[short] += 1  # a registered custom op (fastmae's kernels): opaque to Inductor by design
            else:
                fallbacks[short] += 1
                sources.setdefault(short, f"after kernel {last_kernel or '-'}; last source comment [{last_source}]")
        for op in TENSOR_REDUCE.findall(stripped):
            short = f"Tensor.{op}"
            fallbacks[short] += 1
            sources.setdefault(short, f"a tensor method in the wrapper, after kernel {last_kernel or '-'} "
                                      f"(a mix order reduction's last stage); last source comment [{last_source}]")
    return {"file": path.name, "kernels": kernels, "library": library, "fallbacks": fallbacks, "custom": custom,
            "sources": sources}


def scan(root: Path) -> list[dict]:
    return [r for p in sorted(root.rglob("*.py")) if (r := scan_file(p)) is not None]


def report(results: list[dict]) -> str:
    total_k = sum((r["kernels"] for r in results), Counter())
    total_l = sum((r["library"] for r in results), Counter())
    total_f = sum((r["fallbacks"] for r in results), Counter())
    total_c = sum((r.get("custom", Counter()) for r in results), Counter())
    lines = [f"{len(results)} compiled graphs: {sum(total_k.values())} generated kernel calls, "
             f"{sum(total_l.values())} library calls, {sum(total_f.values())} aten fallbacks, "
             f"{sum(total_c.values())} custom op calls", "",
             "library calls:"]
    lines += [f"  {n:5d}  {name}" for name, n in total_l.most_common()]
    if total_c:
        lines += ["", "custom ops (registered ops Inductor calls as they are):"]
        lines += [f"  {n:5d}  {name}" for name, n in total_c.most_common()]
    lines += ["", "aten fallbacks (op, calls, where its first call sits in its graph):"]
    for name, n in total_f.most_common():
        source = next(r["sources"][name] for r in results if name in r["sources"])
        lines.append(f"  {n:5d}  {name}   {source[:200]}")
    lines += ["", "per graph (file: generated kernels / library calls / fallbacks / custom ops):"]
    lines += [f"  {r['file']}: {sum(r['kernels'].values())} / {sum(r['library'].values())} / "
              f"{sum(r['fallbacks'].values())} / {sum(r.get('custom', Counter()).values())}" for r in results]
    return "\n".join(lines) + "\n"


def default_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cache", nargs="?", default=None, help="Inductor's cache dir (default: torch's for this user)")
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    root = Path(args.cache) if args.cache else default_cache_dir()
    if not root.is_dir():
        p.error(f"{root} is not a directory")
    text = report(scan(root))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
