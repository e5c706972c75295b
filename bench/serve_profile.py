"""Where a request's CPU goes, per service process and thread, under load: one endpoint, N clients.

    python -m bench.serve_profile --endpoint embed --seconds 15 [--py-spy OUT_DIR] [--env CORINFOMAX_X=1]
    python -m bench.serve_profile --endpoint search --per-request 1

Prints each thread group's CPU per request (from /proc: the event loop, decode threads, the model thread, the
index worker), which is robust to other load on the machine, unlike wall-clock rates. With ``--py-spy`` it also
samples every worker with py-spy (``pip install py-spy``) and prints the CPU per request of the landmarks below
(sample share x the process's measured CPU), plus the top frames by self time; the raw stacks stay in OUT_DIR for
a flame graph (``py-spy``'s raw format, one stack per line).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile
from pathlib import Path

import httpx
import psutil

from bench.launcher import Server
from bench.loadgen import image_shots, run_load

REPO = Path(__file__).resolve().parents[1]
# Landmarks of a request's path: (name, regular expression over one frame of a stack).
LANDMARKS = [
    ("HTTP I/O (uvicorn, socket writes)", r"RequestResponseCycle\.send|HttpToolsProtocol|H11Protocol"),
    ("form parsing (python-multipart)", r"MultiPartParser\.parse|Request\._get_form"),
    ("upload temp files (BentoML)", r"NamedTemporaryFile|TempfilePool|_mkstemp_inner|Path\.unlink"),
    ("input validation (pydantic)", r"BaseModel\.model_validate|FileSchema\.decode"),
    ("response JSON schema + serialise", r"IOMixin\.to_http_response"),
    ("tracing (OpenTelemetry)", r"OpenTelemetryMiddleware\.__call__ \(|Tracer\.start"),
    ("access log", r"AccessLogMiddleware\.__call__ \(|Logger\._log"),
    ("thread hand-offs (submit, wake-up)", r"self:ThreadPoolExecutor\.submit|_worker \(concurrent"),
    ("image decode + resize", r"ImageInputs\.pixels|Embedder\.preprocess|decode_pixels"),
    ("model (onnxruntime)", r"Session\.run"),
    ("internal hop to IndexOwner (client side)", r"proxy2|ClientSession|aiohttp"),
    ("index search (IndexOwner)", r"IndexStore\.search|MilvusStore\.search"),
]


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def workers(server: Server) -> dict[str, psutil.Process]:
    """The service's worker processes by service name."""
    assert server.proc is not None
    found = {}
    for proc in psutil.Process(server.proc.pid).children(recursive=True):
        line = proc.cmdline()
        if "--service-name" in line:
            found[line[line.index("--service-name") + 1]] = proc
    return found


def _matches(pattern: str, frames: list[str]) -> bool:
    """A landmark's pattern against a stack: any frame, or the innermost Python frame only (``self:``)."""
    if pattern.startswith("self:"):
        return re.search(pattern[5:], frames[-1]) is not None
    return any(re.search(pattern, frame) for frame in frames)


def landmarks(raw: Path, cpu_ms: float) -> list[str]:
    """CPU ms per request by thread, by landmark and by top self frames, from a py-spy raw file (``--threads``)."""
    inclusive: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        thread, *frames = stack.split(";")
        n = int(count)
        if not frames:  # a thread caught between Python frames
            frames = ["(no Python frame)"]
        total += n
        threads[re.sub(r"^thread \(\d+\): |[_\d]+$", "", thread)] += n
        own[re.sub(r":\d+\)$", ")", frames[-1])] += n
        for name, pattern in LANDMARKS:
            if _matches(pattern, frames):
                inclusive[name] += n
    if not total:
        return ["  (no samples)"]
    lines = [f"  {cpu_ms * n / total:6.3f} ms  thread {name}" for name, n in threads.most_common()]
    lines += [f"  {cpu_ms * inclusive[name] / total:6.3f} ms  {name}" for name, _ in LANDMARKS if inclusive[name]]
    lines.append("  top frames by own time:")
    lines += [f"  {cpu_ms * n / total:6.3f} ms  {frame[:110]}" for frame, n in own.most_common(12)]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models" / "default")
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared" / "datasets" / "cifar10" / "test")
    parser.add_argument("--endpoint", choices=["embed", "search", "classify"], default="embed")
    parser.add_argument("--per-request", type=int, default=1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--py-spy", type=Path, default=None, metavar="OUT_DIR")
    parser.add_argument("--checkout", type=Path, default=None,
                        help="serve another checkout's code (a `git archive` of an earlier commit): before/after")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    jpegs = [p.read_bytes() for p in sorted(args.images.rglob("*.jpg"))[:256]]
    data = {"k": "5"} if args.endpoint == "search" else None
    shots = image_shots(f"/{args.endpoint}", jpegs, args.per_request, data)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "CORINFOMAX_MODEL": str(args.bundle), "CORINFOMAX_DEMO_DIR": "",
               "CORINFOMAX_INDEX": f"{tmp}/index", "CORINFOMAX_WORKERS": str(args.workers),
               "BENTOML_HOME": f"{tmp}/bentoml", "BENTOML_DO_NOT_TRACK": "True",
               **dict(kv.split("=", 1) for kv in args.env),
               **({"PYTHONPATH": str(args.checkout.resolve())} if args.checkout else {})}
        server = Server(env, Path(tmp) / "server.log", cwd=args.checkout).start()
        try:
            for start in range(0, 64, 16):  # something to find
                parts = [("images", ("x.jpg", j, "image/jpeg")) for j in jpegs[start:start + 16]]
                httpx.post(f"{server.url}/add", files=parts, timeout=60).raise_for_status()
            run_load(server.url, shots[:16], args.clients, 3)  # warm-up
            procs = workers(server)
            spies = []
            if args.py_spy:
                args.py_spy.mkdir(parents=True, exist_ok=True)
                spies = [subprocess.Popen(["py-spy", "record", "-p", str(proc.pid), "-d", str(int(args.seconds)),
                                           "-r", "200", "--threads", "-f", "raw", "--nonblocking", "-o",
                                           str(args.py_spy / f"{name}.txt")],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                         for name, proc in procs.items()]
            before = {name: cpu_seconds(proc) for name, proc in procs.items()}
            result = run_load(server.url, shots, args.clients, args.seconds)
            after = {name: cpu_seconds(proc) for name, proc in procs.items()}
            for spy in spies:
                spy.wait()
        finally:
            server.stop()
    requests = max(1, len(result.ok()))
    print(f"/{args.endpoint}, {args.per_request} image(s) per request, {args.clients} clients, {args.seconds:.0f} s, "
          f"env {args.env}: {requests / result.seconds:.1f} requests/s, errors {len(result.errors)}, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name in procs:
        total = (after[name] - before[name]) / requests * 1000
        print(f"{name}: {total:.3f} ms CPU per request")
        if args.py_spy:
            print("\n".join(landmarks(args.py_spy / f"{name}.txt", total)))


if __name__ == "__main__":
    main()
