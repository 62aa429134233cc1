"""Inductor's CUDA code for one MAE training step, generated on a machine without a GPU: the wrapper of each
compiled graph (forward and backward) as Inductor writes it for an sm_90 card, the count of its generated
Triton kernels, library calls and aten fallbacks (benchmarks/inductor_fallbacks.py), and the bytes Inductor
counts per scheduled node (bytes.json) and per generated kernel (kernels.json: calls, bytes and profile category
of each kernel, under the name a GPU profile gives it; benchmarks/kernel_bandwidth.py sets them against one).

    python -m benchmarks.inductor_cuda_codegen --model B --out /tmp/codegen      # ref-compiled, fast-compiled
    python -m benchmarks.inductor_cuda_codegen --model tiny --variants all       # every compiled e2e variant
    python -m benchmarks.inductor_cuda_codegen --model B --precision bf16-pure   # the trainer's bf16 weights mode
    python -m benchmarks.inductor_cuda_codegen --model B --variants fast-compiled-autotune  # max-autotune's GEMMs

Each e2e.py variant is traced as e2e runs it (bf16 autocast, the model's forward compiled whole with
fullgraph=True, fastmae with masked_only unless the variant says otherwise), on fake cuda tensors
(benchmarks/fakecuda): shapes and dtypes are real, values are not, nothing is timed or autotuned (a max-autotune
variant, or any with --gemm triton, gets Inductor's Triton GEMM templates in place of its timed choice). A variant
whose CUDA path breaks the graph fails here, on a CPU, instead of in the scarce device minutes. Two things
differ from a GPU run, both to avoid making real cuda tensors: the joint graph's constant folding is off, and
Inductor's pattern-matcher patterns are traced on the CPU.
Why: six sessions without a GPU, and questions only Inductor's CUDA output answers (NOTES §6.7-6.8).
"""

import argparse
import contextlib
import json
import sys
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import common, fakecuda, inductor_fallbacks, kernel_bandwidth  # noqa: E402
from benchmarks.e2e import MODELS, VARIANTS, SdpaBackend, create_variant_model  # noqa: E402
from fastmae.models import model_config  # noqa: E402

COMPILED = [name for name, spec in VARIANTS.items() if spec.mode is not None]
DEFAULT_VARIANTS = "ref-compiled,fast-compiled"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="B", choices=list(MODELS))
    p.add_argument("--batch", type=int, default=None, help="default: e2e's batch for the model")
    p.add_argument("--variants", default=DEFAULT_VARIANTS,
                   help=f"comma list of e2e's compiled variants, or all ({', '.join(COMPILED)})")
    p.add_argument("--backend", default="cuda", choices=["cuda", "triton", "torch"],
                   help="fastmae_kernels backend of fastmae's variants that name none (default cuda: what 'auto' "
                        "chose on the H100 of 2026-11-27; here 'auto' cannot probe a device)")
    p.add_argument("--precision", default="bf16", choices=["bf16", "bf16-pure"],
                   help="as the trainer's --precision: bf16 = bf16 autocast over fp32 weights (e2e's step, the "
                        "default); bf16-pure = weights, buffers and images in bf16, no autocast (DeepSpeed's bf16 "
                        "mode; its variant folders are named <variant>.bf16-pure)")
    p.add_argument("--gemm", default="library", choices=["library", "triton"],
                   help="library = torch.compile's default mode (cuBLAS GEMMs); triton = max-autotune with every GEMM "
                        "given to Inductor's Triton template, its epilogues fused without benchmarking (what "
                        "max-autotune-no-cudagraphs compiles where the templates win; folders <variant>.triton-gemm)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--out", default=None, help="default benchmarks/results/codegen-<model>-<date>")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="a GPU run's e2e profiles folder: compare each variant's kernels with its "
                        "<model>-<variant>.top.txt (3 profiled steps, as e2e --profile writes them)")
    p.add_argument("--build-dir", default=str(ROOT / ".build" / "fakecuda"), help="where the fake libraries go")
    args = p.parse_args(argv)
    args.variants = COMPILED if args.variants == "all" else args.variants.split(",")
    bad = [v for v in args.variants if v not in COMPILED]
    if bad:
        p.error(f"not a compiled e2e variant: {bad}; choose from {', '.join(COMPILED)} or all")
    args.batch = args.batch or MODELS[args.model][1]
    if args.batch < 1:
        p.error("--batch must be >= 1")
    date = datetime.now(timezone.utc).strftime("%Y%m%d")
    args.out = Path(args.out or ROOT / "benchmarks" / "results" / f"codegen-{args.model}-{date}")
    return args


def configure_inductor() -> None:
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    from torch._inductor.fx_passes import joint_graph

    inductor_config.fx_graph_cache = False  # a cached graph would skip the code generation read here
    inductor_config.compile_threads = 1  # no worker processes (they would not have the fake runtime's patches)
    inductor_config.joint_graph_constant_folding = False  # it evaluates constants as real cuda tensors
    functorch_config.force_non_lazy_backward_lowering = True  # backward compiles with forward, not at .backward()
    traced_on_cpu = joint_graph.lazy_init
    # the pattern-matcher's patterns are traced with real tensors of the graph's device: on the CPU here (they
    # are aten graphs; the device does not enter them)
    joint_graph.lazy_init = lambda input_device=None: traced_on_cpu(torch.device("cpu"))


@contextlib.contextmanager
def triton_gemms():
    """max-autotune as the GPU would compile it if Inductor's Triton GEMM templates won every benchmark: only the
    Triton backend offered, the first of its configs taken instead of timed (nothing can run here; the config
    changes the tile, not which bytes the kernel moves), pointwise consumers fused into the template's epilogue
    without the fusion benchmark (max-autotune's benchmark_epilogue_fusion would time fused against unfused).
    The one other thing max-autotune times while generating, the split of each LayerNorm backward's mix-order
    reduction, keeps the default mode's heuristic pick (the split moves a small workspace, not the rows)."""
    from unittest import mock

    import torch._inductor.config as inductor_config
    from torch._inductor.runtime.coordinate_descent_tuner import CoordescTuner
    from torch._inductor.select_algorithm import AlgorithmSelectorCache

    def first_config(self, name, input_nodes, layout, input_gen_fns, inputs_key, choices, precompile_fn, **kw):
        return {choice: float(i) for i, choice in enumerate(choices)}

    settings = {"max_autotune": True, "max_autotune_gemm_backends": "TRITON", "benchmark_epilogue_fusion": False,
                "epilogue_fusion": True}
    with inductor_config.patch(settings), \
            mock.patch.object(AlgorithmSelectorCache, "do_autotuning", first_config), \
            mock.patch.object(CoordescTuner, "autotune_single_field",
                              staticmethod(lambda fn, init_val, *args, **kwargs: init_val)):
        yield


def gemm_mode(variant: str, gemm: str) -> str:
    """"triton" when the variant compiles with max-autotune (its GEMMs can only be generated as templates here:
    nothing can be timed) or --gemm triton asks for it; else "library" (cuBLAS, as the default mode calls)."""
    mode = VARIANTS[variant].mode or ""
    return "triton" if gemm == "triton" or mode.startswith("max-autotune") else "library"


def graph_bytes(scheduler) -> dict:
    """Inductor's own count of the bytes each scheduled node reads and writes (the "theoretical" accesses its
    scheduler uses for fusion and bandwidth estimates: each buffer once), split into its generated kernels and
    the calls it makes as they are (library GEMMs and attention, aten fallbacks, custom ops; by op)."""
    from torch._inductor.scheduler import ExternKernelSchedulerNode, NopKernelSchedulerNode

    generated, generated_nodes, calls = 0, 0, Counter()
    for node in scheduler.nodes:
        if isinstance(node, NopKernelSchedulerNode):
            continue
        n = node.get_read_write_buffers_sizes()
        if isinstance(node, ExternKernelSchedulerNode):
            ir_node = node.node
            names = (getattr(ir_node, "python_kernel_name", None), getattr(ir_node, "op_overload", None))
            op = next((str(x) for x in names if x), type(ir_node).__name__)
            calls[op.removeprefix("torch.ops.")] += n
        else:
            generated += n
            generated_nodes += 1
    return {"generated_bytes": generated, "generated_nodes": generated_nodes, "call_bytes": dict(calls)}


_kernel_calls: list = []  # (kernel name, bytes) of each generated kernel call of the graph being generated


def template_kernel_bytes(kernel) -> int:
    """Bytes of one call of a Triton template kernel (a GEMM with its fused prologues and epilogues): every buffer
    the call reads or writes, once (numel x dtype size; an in-place buffer twice), the convention of Inductor's
    estimate for its other kernels. Inductor's own estimate for templates counts the GEMM's operands and output
    only, not what a fused epilogue stores or a fused prologue reads."""
    from torch._inductor.utils import get_dtype_size
    from torch._inductor.virtualized import V

    def nbytes(name) -> int:
        buf = V.graph.try_get_buffer(name)
        if buf is None:
            raise KeyError(name)
        numel = V.graph.sizevars.optimization_hint(buf.get_numel(), fallback=0)
        return int(numel) * get_dtype_size(buf.get_dtype())

    args = kernel.args
    inplace = {a.other_names[-1] for a in args.inplace_buffers.values() if hasattr(a, "other_names")}
    names = [n for n, inner in {**args.input_buffers, **args.output_buffers}.items()
             if not str(inner).startswith("REMOVED")]
    return sum(nbytes(n) for n in dict.fromkeys(names)) + sum(2 * nbytes(n) for n in inplace)


def record_kernel_calls() -> None:
    """Makes each generated Triton kernel call record its name and Inductor's estimate of the bytes that call reads
    and writes (`estimate_kernel_num_bytes`, the number Inductor's own bandwidth report divides by: each argument's
    numel x dtype size, a narrowed buffer's slice only, an in-place buffer twice; for a GEMM template with fused
    epilogues, `template_kernel_bytes`). Per call: one kernel that Inductor reuses for several sizes is counted at
    each size."""
    from torch._inductor.codegen.triton import TritonKernel
    from torch._inductor.select_algorithm import TritonTemplateKernel

    def recording(original, estimate):
        def call_kernel(self, name, *args, **kwargs):
            try:
                counted = int(estimate(self))
            except Exception:  # a kernel this torch cannot estimate stays in the calls, with no bytes
                counted = None
            _kernel_calls.append((name, counted))
            return original(self, name, *args, **kwargs)

        call_kernel._records_bytes = True
        return call_kernel

    for cls, estimate in ((TritonKernel, TritonKernel.estimate_kernel_num_bytes),
                          (TritonTemplateKernel, template_kernel_bytes)):
        if not getattr(cls.__dict__.get("call_kernel"), "_records_bytes", False):
            cls.call_kernel = recording(cls.__dict__["call_kernel"], estimate)


def kernel_table(calls: list) -> dict:
    """{kernel name: {"calls": n, "bytes": bytes of its n calls together, "category": fastmae.profiling's}} of one
    graph's recorded calls; "bytes" is None when any call of the kernel could not be estimated."""
    from fastmae.profiling import category

    table: dict = {}
    for name, counted in calls:
        row = table.setdefault(name, {"calls": 0, "bytes": 0, "category": category(name)})
        row["calls"] += 1
        row["bytes"] = None if counted is None or row["bytes"] is None else row["bytes"] + counted
    return table


def grab_wrappers(store: list) -> None:
    """Makes GraphLowering keep each graph's generated wrapper (with its byte counts: per scheduled node, and per
    kernel call) and stop before loading it (which would compile and load its kernels for a device that is not
    there)."""
    from torch._inductor.graph import GraphLowering

    record_kernel_calls()

    def compile_to_module(self, *args, **kwargs):
        _kernel_calls.clear()
        code = self.codegen()[0].value
        try:
            counted = graph_bytes(self.scheduler)
        except Exception as e:  # the wrapper is the product; a count this torch cannot give is said, not hidden
            counted = {"error": f"{type(e).__name__}: {e}"}
        store.append(("backward" if self.is_backward else "forward", code, counted, kernel_table(_kernel_calls)))
        raise _Grabbed()

    GraphLowering.compile_to_module = compile_to_module


class _Grabbed(Exception):
    pass


def _grabbed(exc: BaseException | None) -> bool:
    """True for the grab's stop, bare or as Inductor wraps it (InductorError.inner_exception)."""
    while exc is not None:
        if isinstance(exc, _Grabbed):
            return True
        exc = getattr(exc, "inner_exception", None) or exc.__cause__
    return False


def pretend_backends_run() -> None:
    """fastmae_kernels checks once that a backend's kernels run on the device (a tiny launch, cached; inside a
    compiled trace only the cache is read). No launch can run here: every backend is taken as running, as on the
    GPU, where each is imported before the trace so none is imported inside it."""
    import torch
    from fastmae_kernels import dispatch

    for name in dispatch.BACKENDS:
        module = dispatch._load(name)
        if isinstance(module, Exception):
            raise RuntimeError(f"fastmae_kernels backend {name!r} does not import: {module}")
        if hasattr(module, "fused_kernels_reason"):
            module.fused_kernels_reason = lambda device: None
    probe = dispatch.unavailable_reason
    dispatch.unavailable_reason = lambda name, device: (None if torch.device(device).type == "cuda"
                                                        else probe(name, device))


def trace_variant(variant: str, args, out_dir: Path) -> tuple[dict, dict]:
    """Traces one e2e variant's compiled step, writes its graphs' wrappers and their byte counts into `out_dir`
    (bytes.json: per scheduled node; kernels.json: per generated kernel), and returns both ({wrapper file:
    graph_bytes}, {wrapper file: kernel_table}). Raises when the step is not one graph with a forward and a
    backward (a graph break on CUDA)."""
    import torch
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch._dynamo.reset()  # each variant compiles afresh (no recompile limit across variants of one model class)
    spec = VARIANTS[variant]
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    name = MODELS[args.model][0]
    img = model_config(name).get("img_size", 224)
    model = create_variant_model(spec, name, backend=args.backend).to("meta")
    pure = args.precision == "bf16-pure"
    if pure:
        model = model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the module (on meta: no data)
    with fake:
        model = model.to_empty(device="cuda").train()  # parameters as fake cuda tensors
        imgs = torch.empty(args.batch, 3, img, img, device="cuda", dtype=torch.bfloat16 if pure else torch.float32)
    if not spec.reference:
        pretend_backends_run()  # then the model's backend stays as given: what resolve_backend chose on the GPU
        model.set_grad_checkpointing(spec.ckpt)
    if spec.sdpa is not None:
        model = SdpaBackend(model, spec.sdpa)

    wrappers: list = []
    grab_wrappers(wrappers)

    def inner(gm, example_inputs, **kwargs):
        try:
            compile_fx_inner(gm, example_inputs, **kwargs)
        except Exception as e:
            if not _grabbed(e):
                raise
        return gm  # AOTAutograd only needs something callable; it is never called for real

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        compile_fx(gm, example_inputs, inner_compile=inner)

        def run(*inputs):  # the forward runs on fake tensors, so the call returns and any later graph compiles
            with fake:
                return gm(*inputs)

        return run

    compiled = torch.compile(model, backend=backend, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not pure):
        compiled(imgs, args.mask_ratio, **spec.forward_kwargs())
    out_dir.mkdir(parents=True, exist_ok=True)
    counted, kernels = {}, {}
    for i, (kind, code, graph_counts, kernel_rows) in enumerate(wrappers):
        path = out_dir / f"{i:02d}-{kind}.py"
        path.write_text(code)
        counted[path.name] = graph_counts
        kernels[path.name] = kernel_rows
    (out_dir / "bytes.json").write_text(json.dumps(counted, indent=1) + "\n")
    (out_dir / "kernels.json").write_text(json.dumps(kernels, indent=1) + "\n")
    kinds = [kind for kind, *_ in wrappers]
    if len(graphs) != 1 or kinds != ["forward", "backward"]:
        raise RuntimeError(f"{variant}: expected one graph with a forward and a backward, got {len(graphs)} "
                           f"graphs and wrappers {kinds}")
    return counted, kernels


def bytes_summary(counted: dict, batch: int) -> str:
    """The step's bytes as Inductor counts them (what `trace_variant` returns), in GB per step and MB per image."""
    if any("error" in c for c in counted.values()):
        return "bytes: not counted (" + "; ".join(c["error"] for c in counted.values() if "error" in c) + ")"
    generated = sum(c["generated_bytes"] for c in counted.values())
    calls: Counter = Counter()
    for c in counted.values():
        calls.update(c["call_bytes"])
    lines = [f"bytes read + written per step, Inductor's count (each buffer once): generated kernels "
             f"{generated / 1e9:.2f} GB ({generated / batch / 1e6:.1f} MB/img, "
             f"{sum(c['generated_nodes'] for c in counted.values())} scheduled nodes), calls "
             f"{sum(calls.values()) / 1e9:.2f} GB:"]
    lines += [f"  {n / 1e9:8.3f} GB  {op}" for op, n in calls.most_common(8)]
    return "\n".join(lines)


def kernel_summary(kernels: dict, batch: int) -> str:
    """The generated kernels' bytes per step by fastmae.profiling's category (what a profile of the step files
    their time under), from the per-call estimates of `trace_variant`'s kernel tables."""
    by_category: dict = {}
    unestimated = 0
    for table in kernels.values():
        for row in table.values():
            calls, n = by_category.get(row["category"], (0, 0))
            unestimated += row["bytes"] is None
            by_category[row["category"]] = (calls + row["calls"], n + (row["bytes"] or 0))
    total = sum(n for _, n in by_category.values())
    lines = [f"generated kernels by category, Inductor's estimate per call (kernels.json): {total / 1e9:.2f} GB "
             f"({total / batch / 1e6:.1f} MB/img)" + (f"; {unestimated} kernels not estimated" if unestimated else "")]
    lines += [f"  {n / 1e9:8.3f} GB  {calls:5d} calls  {name}"
              for name, (calls, n) in sorted(by_category.items(), key=lambda kv: -kv[1][1])]
    return "\n".join(lines)


def profile_counts(top_txt: Path) -> dict[str, list[int]]:
    """Calls of the Inductor kernels in a profile's top-ops table: {name as printed: [calls of each kernel printed
    so]} (kernel_bandwidth.top_table_kernels reads the table)."""
    counts: dict[str, list[int]] = {}
    for k in kernel_bandwidth.top_table_kernels(top_txt):
        counts.setdefault(k["name"], []).append(k["calls"])
    return {name: sorted(c) for name, c in counts.items()}


def compare_with_profile(variant_dir: Path, top_txt: Path, steps: int) -> list[dict]:
    """For each Inductor kernel name in a GPU profile of `steps` steps: its calls per step there, and the calls of
    the wrappers' kernels of that name generated here. Equal counts under equal names say the GPU compiled the
    same graphs. A cut name matches every generated kernel it begins; the profile's counts must be among theirs."""
    generated: Counter = Counter()
    for graph in inductor_fallbacks.scan(variant_dir):
        generated.update(graph["kernels"])
    rows = []
    for printed, counts in profile_counts(top_txt).items():
        stem = printed.removesuffix("...")
        names = [n for n in generated if n == printed or (printed.endswith("...") and n.startswith(stem))]
        per_step = [c / steps for c in counts]
        here = sorted(generated[n] for n in names)
        same = not Counter(per_step) - Counter(here)  # every profiled kernel's count is among the matches'
        rows.append({"kernel": printed, "profile_per_step": per_step, "generated_per_step": here, "same": same})
    return rows


def start_meta(args) -> dict:
    """The folder's meta.json record for this run: common.environment's (its "device" is the faked card's name),
    as every benchmark keeps, with the variants an earlier run wrote into the same folder kept (each variant
    carries its own run's date and commit). One folder holds one torch version: another is refused."""
    meta = {**common.environment("cuda"), "model": MODELS[args.model][0], "batch": args.batch,
            "mask_ratio": args.mask_ratio, "backend": args.backend,
            "deviations": ["joint_graph_constant_folding off", "pattern-matcher patterns traced on the CPU"],
            "variants": {}}
    path = args.out / "meta.json"
    if path.is_file():
        earlier = json.loads(path.read_text())
        for key in ("torch", "model", "batch"):
            if earlier.get(key) != meta[key]:
                raise SystemExit(f"inductor_cuda_codegen: {path} is of {key} {earlier.get(key)!r}, this run "
                                 f"{meta[key]!r}: give another --out")
        variants = earlier.get("variants", {})
        for entry in variants.values():  # files written before each variant kept its own precision
            entry.setdefault("precision", earlier.get("precision", "bf16"))
        earlier.pop("precision", None)
        meta = {**earlier, **meta, "variants": variants}
    return meta


def run_child(args) -> int:
    fakecuda.install()
    configure_inductor()
    args.out.mkdir(parents=True, exist_ok=True)
    meta = start_meta(args)
    for variant in args.variants:
        gemm = gemm_mode(variant, args.gemm)
        # a max-autotune variant's name says its GEMMs; another traced with --gemm triton gets the suffix
        suffix = gemm == "triton" and not (VARIANTS[variant].mode or "").startswith("max-autotune")
        variant_dir = args.out / ".".join([variant] + [args.precision] * (args.precision != "bf16")
                                          + ["triton-gemm"] * suffix)
        with triton_gemms() if gemm == "triton" else contextlib.nullcontext():
            counted, kernels = trace_variant(variant, args, variant_dir)
        text = inductor_fallbacks.report(inductor_fallbacks.scan(variant_dir))
        text += "\n" + bytes_summary(counted, args.batch) + "\n"
        text += "\n" + kernel_summary(kernels, args.batch) + "\n"
        (variant_dir / "summary.txt").write_text(text)
        meta["variants"][variant_dir.name] = {"summary": text.splitlines()[0], "precision": args.precision,
                                              "gemm": gemm, "date_utc": meta["date_utc"],
                                              "git_commit": meta["git_commit"]}
        (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")  # kept as variants finish
        print(f"== {variant} ({MODELS[args.model][0]}, batch {args.batch}) ==\n{text}", flush=True)
        if args.against:
            top = Path(args.against) / f"{MODELS[args.model][0]}-{variant}.top.txt"
            if not top.is_file():
                print(f"--against: no profile of {variant} in {args.against} ({top.name}); not compared", flush=True)
                continue
            rows = compare_with_profile(variant_dir, top, steps=3)
            lines = [f"# Inductor kernels in {top} (3 steps) against the wrappers generated here, calls per step"]
            lines += [f"{'same' if r['same'] else 'DIFF'}  profile {r['profile_per_step']}  generated "
                      f"{r['generated_per_step']}  {r['kernel']}" for r in rows]
            (variant_dir / "against_profile.txt").write_text("\n".join(lines) + "\n")
            same = sum(r["same"] for r in rows)
            meta["variants"][variant_dir.name]["against_profile"] = {"kernels": len(rows), "same": same}
            print("\n".join(lines), flush=True)
    (args.out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if fakecuda.active():
        return run_child(args)
    reason = fakecuda.unavailable_reason()
    if reason:
        print(f"inductor_cuda_codegen: cannot fake a CUDA device here: {reason}", file=sys.stderr)
        return 2
    lib_dir = fakecuda.build(Path(args.build_dir))
    return fakecuda.run_under_fake_cuda("benchmarks.inductor_cuda_codegen", argv, lib_dir, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
