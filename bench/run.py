"""hf_crosscoder benchmarks: one entry point, every section in one run so ratios share the machine's load.

    python bench/run.py [--quick] [--sections peers,archs,...] [--out bench/results.json]

Each measurement runs in a worker subprocess (ours.py, decode.py, harvest.py, e2e.py, and the peers'
peer_saelens.py / peer_sparsify.py in their own venvs from bench/setup_peers.sh), one after another;
the peer comparison interleaves the libraries over several rounds and pools the step times.
Prints markdown tables and writes them with the raw numbers to bench/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hf_crosscoder.modeling import ARCHITECTURES

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTIONS = ["archs", "peers", "decode", "memory", "harvest", "e2e", "overlap", "distributed"]
ARCHS = list(ARCHITECTURES)  # every registered architecture, Matryoshka included
PEER_ARCHS = {"crosscoder": ("saelens", "standard"), "topk_crosscoder": ("saelens", "topk"),
              "batchtopk_crosscoder": ("saelens", "batchtopk"), "jumprelu_crosscoder": ("saelens", "jumprelu")}
TARGETS = {"saelens": 0.8, "sparsify": 1.0, "flops": 0.5, "decode": 3.0, "memory": 1.3, "scaling": 1.6}
B, K = 4096, 32
GLIBC_MMAP = 131072


def worker(python: str | Path, script: str, *args, timeout: int = 3600, env: dict | None = None,
           launcher: tuple = ()) -> dict:
    """Run bench/`script` (after `launcher`'s arguments, if any) and return its last stdout line's JSON."""
    cmd = [str(python), *map(str, launcher), str(HERE / script), *map(str, args)]
    print(f"  $ {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def save_acts(path: Path, width: int) -> str:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    save_file({"acts": torch.randn(B, width)}, str(path))
    return str(path)


def table(header: list[str], rows: list[list]) -> str:
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows])


def dense_flops(d_in: int, d_out: int, d_sae: int) -> float:
    """The 5 matmuls of a dense step: encoder forward, decoder forward, decoder weight grad, decoder input
    grad, encoder weight grad."""
    return 2 * B * d_sae * (2 * d_in + 3 * d_out)


def ok(ratio: float, target: float, lower_is_better: bool = True) -> str:
    met = ratio <= target if lower_is_better else ratio >= target
    return f"{ratio:.2f} ({'met' if met else 'NOT met'}: {'<=' if lower_is_better else '>='} {target})"


# ---------------------------------------------------------------------------------------------- sections
def run_archs(a, tmp: Path, out: dict) -> str:
    acts = save_acts(tmp / "acts1536.safetensors", 1536)
    rows, raw = [], {}
    for d_sae in ([8192] if a.quick else [8192, 16384]):
        model = worker(sys.executable, "ours.py", acts, "--hooks", 3, "--separate-out", "--d-sae", d_sae,
                       "--reps", a.reps, "--peak", "--mode", "model")
        trainer = worker(sys.executable, "ours.py", acts, "--hooks", 3, "--separate-out", "--d-sae", d_sae,
                         "--reps", a.reps, "--peak", "--mode", "trainer")
        peak = model["matmul_peak_flops"]  # timed in the same process, minutes apart at most
        raw[d_sae] = {"model": model, "trainer": trainer, "peak_flops": peak}
        for arch in ARCHS:
            t, tt = model["results"][arch]["median_s"], trainer["results"][arch]["median_s"]
            flops = dense_flops(1536, 1536, d_sae) / t
            target = ok(flops / peak, TARGETS["flops"], lower_is_better=False) if arch == "crosscoder" else \
                f"{flops / peak:.2f} (effective)"
            rows.append([arch, d_sae, t, B / t, tt, B / tt, flops / 1e9, target])
    out["archs"] = raw
    peaks = ", ".join(f"{v['peak_flops'] / 1e9:.0f}" for v in raw.values())
    return ("### Training step, d_in = d_out = 1536 (3 hooks x 512 in, 3 other hooks out), batch 4096\n\n"
            f"fp32 matmul peak [4096,512]x[512,16384], 2 threads, timed in the same worker as the model steps "
            f"(per d_sae): {peaks} GFLOP/s; FLOP/s counts the 5 matmuls of a dense step (2 B d_sae (2 d_in + "
            "3 d_out)), so for TopK it is an effective rate\n\n"
            + table(["architecture", "d_sae", "model step s", "tokens/s", "train_step s", "tokens/s",
                     "GFLOP/s (5 dense matmuls)", "FLOP/s / peak (target >= 0.5, dense)"], rows))


def run_peers(a, tmp: Path, out: dict) -> str:
    acts = save_acts(tmp / "acts512.safetensors", 512)
    venv = {name: HERE / f".venv-{name}" / "bin" / "python" for name in ("saelens", "sparsify")}
    missing = [n for n, py in venv.items() if not py.exists()]
    if missing:
        return f"### Peers\n\npending: run bench/setup_peers.sh first (missing venvs: {missing})"
    times: dict[tuple[str, str], list[float]] = {}
    versions = {}
    for _ in range(a.rounds):
        runs = [("ours", worker(sys.executable, "ours.py", acts, "--reps", a.reps, "--archs", ",".join(PEER_ARCHS))),
                ("saelens", worker(venv["saelens"], "peer_saelens.py", acts, "--reps", a.reps)),
                ("sparsify", worker(venv["sparsify"], "peer_sparsify.py", acts, "--reps", a.reps))]
        for lib, res in runs:
            versions[lib] = res["library"]
            for arch, r in res["results"].items():
                times.setdefault((lib, arch), []).extend(r["times_s"])
    med = {key: statistics.median(v) for key, v in times.items()}
    out["peers"] = {"versions": versions, "median_s": {f"{lib}/{arch}": v for (lib, arch), v in med.items()},
                    "times_s": {f"{lib}/{arch}": v for (lib, arch), v in times.items()}}
    rows = []
    for arch, (lib, peer_arch) in PEER_ARCHS.items():
        ours = med[("ours", arch)]
        rows.append([arch, f"SAELens {peer_arch}", ours, med[(lib, peer_arch)], B / ours, B / med[(lib, peer_arch)],
                     ok(ours / med[(lib, peer_arch)], TARGETS["saelens"])])
        if arch == "topk_crosscoder":
            rows.append([arch, "sparsify TopK", ours, med[("sparsify", "topk")], B / ours,
                         B / med[("sparsify", "topk")], ok(ours / med[("sparsify", "topk")], TARGETS["sparsify"])])
    return ("### Peers: single layer (1-in/1-out = an SAE), d_in 512, d_sae 16384, batch 4096, k 32, fp32\n\n"
            f"Versions: {', '.join(versions.values())}. Step = loss forward + backward + Adam + zero_grad; "
            f"{a.rounds} round(s) interleaving the libraries, {a.reps} timed steps each, median of all.\n\n"
            + table(["ours", "peer", "ours s", "peer s", "ours tok/s", "peer tok/s", "ours / peer (target)"], rows))


def run_decode(a, tmp: Path, out: dict) -> str:
    res = worker(sys.executable, "decode.py", "--reps", a.reps)["results"]
    out["decode"] = res
    rows = []
    for d_out, r in res.items():
        for kind in ("forward", "forward_backward"):
            speedup = r[f"dense_{kind}"] / r[f"sparse_{kind}"]
            rows.append([d_out, kind, r[f"dense_{kind}"], r[f"sparse_{kind}"],
                         ok(speedup, TARGETS["decode"], lower_is_better=False)])
    return ("### TopK decode: sparse (embedding_bag + sparse backward) vs dense, k 32, d_sae 16384, batch 4096\n\n"
            + table(["d_out", "pass", "dense s", "sparse s", "speed-up (target >= 3)"], rows))


def memory_formula(arch: str, d_in: int, d_out: int, d_sae: int) -> tuple[float, str]:
    """params (+ grads + Adam's 2 moments: 4 x params) + the [batch, d_sae] tensors one step needs live."""
    params = 2 * d_in * d_sae + d_sae + d_out + (d_in * d_out if arch == "skip_crosscoder" else 0) + \
        (d_sae if arch == "jumprelu_crosscoder" else 0)
    live = 3 if arch == "jumprelu_crosscoder" else 2
    return 4.0 * (4 * params + live * B * d_sae), f"16 P + {live} x 4 B d_sae"


def run_memory(a, tmp: Path, out: dict) -> str:
    acts = save_acts(tmp / "acts1536.safetensors", 1536)
    d_sae = 8192 if a.quick else 16384
    rows, raw = [], {}
    for arch in ARCHS:
        args = (acts, "--hooks", 3, "--separate-out", "--d-sae", d_sae, "--reps", 2, "--archs", arch)
        r = worker(sys.executable, "ours.py", *args)
        fixed = worker(sys.executable, "ours.py", *args, env={"MALLOC_MMAP_THRESHOLD_": str(GLIBC_MMAP)})
        used, used_fixed = (v["peak_rss_bytes"] - v["rss_before_bytes"] for v in (r, fixed))
        formula, text = memory_formula(arch, 1536, 1536, d_sae)
        raw[arch] = {"default": r, "fixed_mmap_threshold": fixed, "used_bytes": used,
                     "used_fixed_bytes": used_fixed, "formula_bytes": formula}
        rows.append([arch, d_sae, text, formula / 2**20, used / 2**20, ok(used / formula, TARGETS["memory"]),
                     used_fixed / 2**20, ok(used_fixed / formula, TARGETS["memory"])])
    out["memory"] = raw
    return ("### Peak memory of training steps (RSS above the process's RSS before the model existed)\n\n"
            "P = parameters; 16 P = weights + grads + Adam's two moments (fp32). Live [batch, d_sae] tensors "
            "the math needs: ReLU 2 (f, dL/dh); JumpReLU 3 (h, f, dL/dh); TopK/BatchTopK 2 (pre-activations "
            "to rank, the dense feature_acts output). No activation buffer in this isolated step (the "
            "store's buffer is n_batches_in_buffer x batch x (d_in + d_out) x 4 bytes on top).\n\n"
            + "The last two columns rerun the step with MALLOC_MMAP_THRESHOLD_=" + str(GLIBC_MMAP) + ": glibc then "
            "returns freed blocks to the kernel at once instead of keeping them in its heap (its default "
            "raises the mmap threshold up to 32 MiB as blocks are freed, so [batch, d_model]-sized blocks stay "
            "mapped, fragmented).\n\n"
            + table(["architecture", "d_sae", "formula", "formula MiB", "peak MiB", "peak / formula (target)",
                     "peak MiB, glibc fixed threshold", "ratio"], rows))


def run_harvest(a, tmp: Path, out: dict) -> str:
    if not (ROOT / "src/hf_crosscoder/activations.py").exists():
        return "### Harvest\n\npending: src/hf_crosscoder/activations.py does not exist yet"
    res = worker(sys.executable, "harvest.py", "--reps", a.reps)
    out["harvest"] = res
    r = res["results"]
    rows = [[name, v["s"], v["tokens_per_s"]] for name, v in r.items()]
    return ("### Harvest: pythia-70m-shaped GPT-NeoX (random weights), 32 x 128 tokens per call, "
            "hooks layers 0-2 -> 3-5\n\n" + table(["what", "s per call", "tokens/s"], rows) +
            f"\n\nharvest / bare truncated forward: {r['harvest']['tokens_per_s'] / r['bare_truncated']['tokens_per_s']:.2f}"
            f"; early-stopped harvest vs full forward (with LM head): "
            f"{r['harvest']['tokens_per_s'] / r['full_forward']['tokens_per_s']:.2f}x the tokens/s")


def run_e2e(a, tmp: Path, out: dict) -> str:
    try:
        e2e = e2e_launch("8" if a.quick else "16", 2)
    except RuntimeError as err:
        return f"### End to end\n\npending: the runner does not run yet ({str(err).splitlines()[-1][:200]})"
    acts = save_acts(tmp / "acts1536.safetensors", 1536)
    train = worker(sys.executable, "ours.py", acts, "--hooks", 3, "--separate-out", "--d-sae", 4096,
                   "--reps", a.reps, "--archs", "crosscoder", "--mode", "trainer")["results"]["crosscoder"]["median_s"]
    harvest = worker(sys.executable, "harvest.py", "--reps", a.reps)["results"]["harvest"]["tokens_per_s"]
    serial = 1 / (1 / harvest + train / B)
    out["e2e"] = {"runner": e2e, "train_step_s": train, "harvest_tokens_per_s": harvest, "serial_bound": serial}
    rows = [["runner .run(), steady state (steps 5 to the last)", e2e["tokens_per_s"]],
            ["harvest alone", harvest], ["train_step alone", B / train],
            ["harvest then train, no overlap (1 / (1/h + 1/t))", serial]]
    return ("### End to end: LanguageModelCrosscoderTrainingRunner(cfg).run(), crosscoder d_sae 4096, "
            "layers 0-2 -> 3-5, batch 4096\n\n" + table(["what", "tokens/s"], rows) +
            f"\n\nrunner / (harvest then train): {e2e['tokens_per_s'] / serial:.2f}")


def run_overlap(a, tmp: Path, out: dict) -> str:
    res = worker(sys.executable, "overlap.py")
    out["overlap"] = res
    al, both = res["alone"], res["concurrent_1_thread_each"]
    rows = [[stage, al[f"{stage}_2_threads"], al[f"{stage}_1_threads"],
             al[f"{stage}_2_threads"] / al[f"{stage}_1_threads"], both[stage]] for stage in ("harvest", "train")]
    return ("### Overlapping harvest and training on this CPU: e2e shape (harvest 32 x 128 tokens, train "
            "d_sae 4096, batch 4096)\n\n" + table(["stage", "tok/s, 2 threads", "tok/s, 1 thread",
                                                   "thread scaling", "tok/s, both at once (1 thread each)"], rows)
            + f"\n\nboth at once, as a pipeline (the slower of the two): {res['pipeline_concurrent']:.3g} tok/s; "
            f"one after the other with 2 threads (1 / (1/h + 1/t)): {res['sequential_2_threads']:.3g} tok/s; "
            f"the slower stage alone: {res['slower_alone']:.3g} tok/s")


def accelerate_launcher(config: str) -> tuple:
    """`python -m accelerate.commands.launch` arguments for `worker` (a free port per launch)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return ("-m", "accelerate.commands.launch", "--config_file", ROOT / config, "--main_process_port", port)


def e2e_launch(steps: str, threads: int, env: dict | None = None, launcher: tuple = (),
               root: Path | None = None) -> dict:
    """Steady-state tokens/s of one runner launch (e2e.py reads it off the training log)."""
    extra = ("--root", root) if root else ()
    return worker(sys.executable, "e2e.py", "--steps", steps, "--threads", threads, *extra, env=env,
                  launcher=launcher)


def run_distributed(a, tmp: Path, out: dict) -> str:
    """Data-parallel scaling of the whole runner: 2 processes x 1 thread vs 1 process x 1 thread (one core
    each), and 1 process x 2 threads (the same two cores, shared by threads instead)."""
    steps = "8" if a.quick else "16"
    one = {"OMP_NUM_THREADS": "1"}
    ddp = accelerate_launcher("accelerate_configs/cpu_2proc.yaml")
    runs = {"1 process x 1 thread": e2e_launch(steps, 1, one),
            "2 processes x 1 thread (DDP, gloo)": e2e_launch(steps, 1, {**one, "ACCELERATE_USE_CPU": "1"}, ddp,
                                                               tmp / "e2e_ddp"),
            "1 process x 2 threads": e2e_launch(steps, 2)}
    out["distributed"] = runs
    base = runs["1 process x 1 thread"]["tokens_per_s"]
    rows = [[name, r["processes"], r["threads"], r["tokens_per_s"], r["tokens_per_s"] / base] for name, r in runs.items()]
    scaling = runs["2 processes x 1 thread (DDP, gloo)"]["tokens_per_s"] / base
    return ("### Data parallel end to end on CPU: the runner (as in End to end), global batch 4096\n\n"
            "Each row: one launch of 16 steps (8 with --quick); tokens/s from steps 5 to the last, off the "
            "training log (steady state, harvest refills included).\n\n"
            + table(["run", "processes", "threads each", "tokens/s", "vs 1 process x 1 thread"], rows)
            + f"\n\n2 processes / 1 process (one core each): {ok(scaling, TARGETS['scaling'], lower_is_better=False)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="d_sae 8192 only for the architecture table, "
                   "fewer repetitions and one peer round")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--out", default=str(HERE / "results.json"))
    a = p.parse_args()
    a.reps = a.reps or (2 if a.quick else 5)
    a.rounds = a.rounds or (1 if a.quick else 2)
    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    meta = {"command": "python " + " ".join(["bench/run.py", *sys.argv[1:]]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu,
            "threads": 2, "torch": torch.__version__, "python": platform.python_version()}
    out: dict = {"meta": meta}
    print(f"## hf_crosscoder benchmarks\n\n`{meta['command']}`; {meta['date']}; {cpu}, 2 threads; "
          f"torch {meta['torch']}\n")
    with tempfile.TemporaryDirectory(prefix="hf_crosscoder_bench_") as tmp:
        for name in a.sections.split(","):
            try:
                md = globals()[f"run_{name}"](a, Path(tmp), out)
            except Exception as err:  # a failing section must not lose the others' numbers
                md = f"### {name}\n\nFAILED: {str(err)[-1500:]}"
            out.setdefault("markdown", {})[name] = md
            print(md + "\n", flush=True)
            Path(a.out).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
