"""Where a whole `ddpo train` process spends its time: start-up, the epochs, and the work around them.

    pip install py-spy                                   # the sampling profiler this script runs
    python benchmarks/profile_train.py                   # the peer benchmark's tiny 64 px work, 4 epochs
    python benchmarks/profile_train.py --set train.timestep_chunk=5 --raw /tmp/train.pyspy

It runs `ddpo train` on the same work as `benchmarks/peers.py` (the same command line, `--set` overrides added)
under `py-spy record --idle --threads` (wall-clock samples of every Python thread, waiting included) and
attributes each sample of the main thread to the innermost phase on its stack:

| phase | frames |
| --- | --- |
| imports | module imports outside the phases below (`ddpo train`'s own, before the Trainer exists) |
| model load + LoRA | `Trainer.__init__` |
| grid | `Recorder.save_sample_grid`: the fixed-seed grid (`log.grid_every`) |
| epoch: sampling / advantages / update | `Trainer.sample_epoch`, `Trainer.advantages`, `Trainer.update` |
| checkpoint | `gather_checkpoint_state`, `RunDirectory.write_checkpoint` |
| report.html, before-after.png | `write_report`, `Recorder.save_before_after` |
| evaluation | `Recorder.evaluate` (`log.eval_every`) |
| checkpoint wait | `Checkpoints.wait`: the main thread waiting for the background checkpoint writer |
| tracker | `Accelerator.log`, `Accelerator.end_training` (TensorBoard writes and flushes) |

The main thread's samples add up to the process's wall time (py-spy samples at `--rate` per second). Output lines
are time-stamped as they arrive, which gives the start-up time to the first sampling step (the line ddpo prints
just before it samples the epoch-0 grid). Last, `python -X importtime -c "import ddpo.cli, ddpo.training.loop"` (what
`ddpo train` imports before it starts) in a separate process: the slowest imports and what pulls them in.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers  # noqa: E402  (the same work and command line)

PHASES = [  # (name, frame substring): the first one found on a stack, innermost first, names the sample
    ("grid", "Recorder.save_sample_grid"),
    ("before-after.png", "Recorder.save_before_after"),
    ("report.html", "write_report"),
    ("checkpoint", "gather_checkpoint_state"),
    ("checkpoint", "write_checkpoint"),
    ("tracker", "Accelerator.log "),
    ("tracker", "Accelerator.end_training"),
    ("evaluation", "Recorder.evaluate"),
    ("checkpoint wait", "Checkpoints.wait"),
    ("epoch: sampling", "Trainer.sample_epoch"),
    ("epoch: advantages", "Trainer.advantages"),
    ("epoch: update", "Trainer.update"),
    ("model load + LoRA", "Trainer.__init__"),
    ("imports", "_find_and_load"),
]


def attribute(raw: Path, rate: float) -> tuple[float, collections.Counter]:
    """(main-thread seconds, seconds per phase) of py-spy's raw (collapsed-stack) output."""
    seconds: collections.Counter = collections.Counter()
    total = 0.0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if "MainThread" not in frames[0]:
            continue
        value = int(count) / rate
        total += value
        for frame in reversed(frames):  # the innermost matching phase wins: a lazy import counts as an import
            names = [name for name, needle in PHASES if needle in frame + " "]
            if names:
                seconds[names[0]] += value
                break
        else:
            seconds["other"] += value
    return total, seconds


def import_times(env: dict[str, str]) -> list[tuple[float, str, str]]:
    """(cumulative seconds, module, chain of importers) of the slowest imports of `import ddpo.cli, ddpo.training.loop`."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-c", "import ddpo.cli, ddpo.training.loop"], env=env, capture_output=True, text=True)
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:"):].split("|")
        rows.append((int(cumulative) / 1e6, (len(name) - len(name.lstrip()) - 1) // 2, name.strip()))

    def importer(i: int) -> int | None:  # importtime prints a module after everything it imported, one level deeper
        return next((j for j in range(i + 1, len(rows)) if rows[j][1] < rows[i][1]), None)

    total = sum(seconds for seconds, depth, _ in rows if depth == 0)
    out = [(total, "(all)", "")]
    for i, (seconds, depth, name) in enumerate(rows):
        parent = importer(i)
        # third-party modules imported by ddpo itself: what ddpo could import later or not at all
        if parent is not None and rows[parent][2].startswith("ddpo") and not name.startswith("ddpo"):
            out.append((seconds, name, rows[parent][2]))
    return sorted(out, reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image side of the tiny model in px (default 64)")
    parser.add_argument("--epochs", type=int, default=peers.Work.epochs)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra `ddpo train --set` override")
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second (default 50)")
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw collapsed stacks in this file")
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        peers.fail("py-spy is not installed: pip install py-spy")

    scratch = Path(tempfile.mkdtemp(prefix="ddpo-profile-"))
    try:
        model = peers.tiny_model(scratch / "tiny-sd", args.size)
        command = peers.ddpo_command(model, args.size, peers.Work(epochs=args.epochs), scratch / "run", args.overrides)
        raw = args.raw or scratch / "pyspy.txt"
        env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
        print(f"profile: {' '.join(command)}", flush=True)
        print(f"profile: load average {peers.load_average()} ({os.cpu_count()} CPUs)", flush=True)
        started = time.perf_counter()
        process = subprocess.Popen([py_spy, "record", "--idle", "--threads", "--rate", str(args.rate), "--format", "raw", "-o", str(raw), "--", *command],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)  # fmt: skip
        first_sampling, tail = None, collections.deque(maxlen=20)
        for line in process.stdout:
            tail.append(line)
            at = time.perf_counter() - started
            if first_sampling is None and line.startswith("ddpo: ") and " samples/epoch" in line:
                first_sampling = at  # printed by Recorder.describe, right before the epoch-0 grid is sampled
            if line.startswith(("ddpo:", "epoch ", "run directory")):
                print(f"  [{at:6.1f}s] {line.rstrip()[:150]}", flush=True)
        if process.wait() != 0:
            sys.stderr.writelines(tail)
            peers.fail(f"py-spy / ddpo train exited with status {process.returncode} (its last lines above)")
        wall = time.perf_counter() - started
        total, seconds = attribute(raw, args.rate)
        print(f"\nwall {wall:.1f} s; main thread sampled {total:.1f} s; start-up to the first sampling step {first_sampling or float('nan'):.1f} s")
        print("\n| phase | seconds | share of the process |\n|---|---|---|")
        for name, value in seconds.most_common():
            print(f"| {name} | {value:.1f} | {100 * value / total:.1f}% |")
        print("\n| import (`import ddpo.cli, ddpo.training.loop`) | cumulative s | imported by |\n|---|---|---|")
        for value, name, parent in import_times(env)[:12]:
            print(f"| {name} | {value:.2f} | {parent} |")
        print(f"\nload average after: {peers.load_average()}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
