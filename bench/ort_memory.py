"""onnxruntime's memory pattern under the service's varying batch sizes: memory held and speed, side by side.

    python bench/ort_memory.py --rounds 3

The service merges concurrent requests into one model call, so every batch size from 1 to the largest
(64) is a new input shape. Memory: for each setting, one child process runs every batch size in shuffled
order ``--rounds`` times and prints the malloc'd bytes in use beyond a batch-1 start after each round (a
plateau is the bound). Speed: both sessions in this process, timed interleaved, median ms per call.
"""

from __future__ import annotations

import argparse
import ctypes
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def malloc_in_use() -> int:
    """Bytes malloc has handed out and not had back (glibc's mallinfo2, all arenas)."""
    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = _MallInfo
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def session(model: Path, pattern: bool) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    options.enable_mem_pattern = pattern
    return ort.InferenceSession(str(model / "model.onnx"), options, providers=["CPUExecutionProvider"])


def batch(model: ort.InferenceSession, rows: int) -> dict[str, np.ndarray]:
    _, height, width, channels = model.get_inputs()[0].shape
    return {"pixels": np.zeros((rows, height, width, channels), np.uint8)}


def memory_rounds(model: Path, pattern: bool, rounds: int, largest: int) -> None:
    """Run in a child process: print the memory held after each round over all batch sizes."""
    sess = session(model, pattern)
    sess.run(None, batch(sess, 1))
    start = malloc_in_use()
    sizes = list(range(1, largest + 1))
    for number in range(rounds):
        random.Random(number).shuffle(sizes)
        for rows in sizes:
            sess.run(None, batch(sess, rows))
        print(f"  round {number + 1}: +{(malloc_in_use() - start) / 2**20:.1f} MiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--largest", type=int, default=64, help="largest batch (the service's CORINFOMAX_BATCH_SIZE)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        memory_rounds(args.bundle, args.child == "on", args.rounds, args.largest)
        return

    for setting in ("on", "off"):
        print(f"memory pattern {setting}: malloc'd memory held beyond batch 1, after each round of batch sizes "
              f"1..{args.largest}", flush=True)
        subprocess.run([sys.executable, __file__, "--bundle", str(args.bundle), "--rounds", str(args.rounds),
                        "--largest", str(args.largest), "--child", setting], check=True)

    sessions = {"on": session(args.bundle, True), "off": session(args.bundle, False)}
    for rows in sorted({1, 4, 16, args.largest}):
        times: dict[str, list[float]] = {name: [] for name in sessions}
        for sess in sessions.values():
            sess.run(None, batch(sess, rows))
        for _ in range(args.repeats):  # interleaved: machine load hits both alike
            for name, sess in sessions.items():
                started = time.perf_counter()
                sess.run(None, batch(sess, rows))
                times[name].append((time.perf_counter() - started) * 1000)
        on, off = (float(np.median(times[name])) for name in ("on", "off"))
        print(f"batch {rows:3d}: pattern on {on:.2f} ms, off {off:.2f} ms (off/on {off / on:.2f})")


if __name__ == "__main__":
    main()
