"""What benchmarks/gpu_check.sh runs on a lent GPU must exist and be accepted as written: a rejected flag or a
missing test file would cost a stage of scarce device time. The trainer's command lines are taken from the script
and resolved through the trainer's own checks as on a one-GPU CUDA machine."""

import re
import shlex
import sys
from pathlib import Path

from fastmae.train.config import parse_config

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for benchmarks.*


def _trainer_commands(script: str) -> list[list[str]]:
    text = script.replace("\\\n", " ")
    base = shlex.split(re.search(r"PRETRAIN=\((.*?)\)", text, re.S).group(1))
    base = base[base.index("fastmae/pretrain.py") + 1:]  # what follows torchrun's own flags and the script
    commands = []
    for line in text.splitlines():
        if '"${PRETRAIN[@]}"' in line and not line.lstrip().startswith("#"):
            commands.append(base + line.split('"${PRETRAIN[@]}"', 1)[1].split())
    return commands


def test_every_trainer_stage_resolves_as_on_one_gpu(tmp_path):
    script = (REPO / "benchmarks/gpu_check.sh").read_text()
    ds_file = tmp_path / "ds_with_timer.json"
    ds_file.write_text(re.search(r"printf '(.*?)' >\"\$WORK/ds_with_timer.json\"", script).group(1))
    loop = re.search(r"for precision in ([^;]+);", script).group(1).split()
    commands = _trainer_commands(script)
    assert len(commands) == 4 and loop == ["bf16", "bf16-pure"]  # the parse found the stages
    resolved = []
    for words in commands:
        for precision in loop if '"$precision"' in words else [None]:
            argv = [w.strip('"') for w in words]
            argv = [precision if w == "$precision" else str(ds_file) if w.endswith("ds_with_timer.json") else w
                    for w in argv]
            argv = [str(tmp_path / Path(w).name.replace("$precision", precision or "")) if w.startswith("/tmp/")
                    else w for w in argv]
            resolved.append(parse_config(argv, device_type="cuda", world_size=1))
    stages = [(c.zero_stage, c.precision, c.compile, c.max_steps, c.profile_steps) for c in resolved]
    assert stages == [(2, "bf16", False, 30, 0), (0, "bf16", True, 60, 5), (0, "bf16", True, 40, 5),
                      (2, "bf16", True, 40, 0), (2, "bf16-pure", True, 40, 0)]
    assert all(c.model == "mae_vit_base_patch16_dec512d8b" and c.batch_size * c.accum_iter == 256 for c in resolved)
    assert all(c.ds_config.get("timers") for c in resolved[2:3])  # the timer run reads its DeepSpeed file


def test_the_test_files_and_kernel_shapes_it_names_exist():
    from benchmarks.kernels.cases import GPU_SHAPES

    script = (REPO / "benchmarks/gpu_check.sh").read_text()
    named = set(re.findall(r"tests/[\w/]+\.py", script))
    assert len(named) >= 6 and all((REPO / path).is_file() for path in named), sorted(named)
    from benchmarks.kernels import timing  # the copy rate the check times first, for the report's kernel rates

    assert "from benchmarks.kernels.timing import copy_bandwidth" in script and callable(timing.copy_bandwidth)
    shapes = re.findall(r"benchmarks\.kernels\.run --shapes (\S+)", script)
    assert shapes and set(",".join(shapes).split(",")) <= {s.name for s in GPU_SHAPES}, shapes


def test_the_attention_gate_runs_the_e2e_stage_only_when_the_triton_decoder_wins(tmp_path):
    """The inline Python after the attention stage decides whether e2e_B_attn (~4 minutes of device time) runs: only
    when ViT-B's decoder attention ran faster with the Triton kernels than with SDPA."""
    import json
    import subprocess

    script = (REPO / "benchmarks/gpu_check.sh").read_text()
    gate = re.search(r"<<'PY'.*?\n(.*?)\nPY\n", script, re.S).group(1)
    assert "benchmarks/attention.py --models B,H,L" in script and "stage e2e_B_attn" in script

    def run(rows) -> int:
        path = tmp_path / "attention.json"
        path.write_text(json.dumps({"rows": rows}))
        return subprocess.run([sys.executable, "-c", gate, str(path)], capture_output=True).returncode

    def row(impl, ms, model="B", stack="decoder"):
        return {"model": model, "stack": stack, "impl": impl, "fwd_bwd_ms": ms}

    assert run([row("sdpa", 1.0), row("triton", 0.8)]) == 0
    assert run([row("sdpa", 1.0), row("triton", 1.2)]) == 1
    assert run([row("sdpa", 1.0), row("triton", 0.5, stack="encoder"), row("triton", 1.1)]) == 1
    assert run([row("sdpa", 1.0), row("triton", None)]) == 1  # a mismatch row is not timed
    assert run([row("sdpa", 1.0)]) == 1
    from benchmarks import e2e

    assert {"fast-compiled-tritonattn-dec", "fast-compiled-tritonattn"} <= set(e2e.VARIANTS)
