"""Service throughput and latency: concurrent clients against a real uvicorn server on 127.0.0.1.

Compares the two ways the service can run the model: a thread pool (each request its own forward pass,
`--workers` of them at once) and a batching worker (one model thread that runs the requests waiting at that
moment as one batch). The model is an untrained `seed` network at input 256 saved as a checkpoint, so the
server loads it the way `hemaseg serve` does; speed does not depend on the weights. Clients send
synthetic scans of each size and ask for the full JSON reply (measurements + inline mask/overlay PNGs).

    python benchmarks/service.py [--clients 8] [--seconds 8] [--sizes 256 512]

Loopback only; every run is bounded by --seconds per cell and stops by itself. The clients run on the
same CPUs as the server, as they would in a one-box deployment. Writes benchmarks/results/service.json.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "service.json"
CONFIGS = {  # name -> (workers, max_batch)
    "threads x1": (1, 1),
    "threads x2": (2, 1),
    "batching <=8": (8, 8),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_checkpoint(folder: Path) -> Path:
    """An untrained `default`-preset network (the seed UNet, input 256) saved the way training saves one."""
    import torch

    from hemaseg import __version__
    from hemaseg.config import resolve_config
    from hemaseg.models import build_model
    from hemaseg.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = resolve_config("", "scratch", device_type="cpu")  # no data: the preset as it stands
    path = folder / "best.pt"
    save_checkpoint(path, {"version": __version__, "config": cfg.to_dict(),
                           "model": build_model(cfg.model).state_dict(), "epoch": 0, "metrics": {},
                           "data_fingerprint": "untrained"})
    return path


def multipart(png: bytes) -> tuple[bytes, str]:
    boundary = "hemasegbench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"scan.png\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + png + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def scan_png(size: int) -> bytes:
    from PIL import Image

    from hemaseg.data.synth import synth_scan

    image, _ = synth_scan(np.random.default_rng(size), size)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def wait_ready(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError("server not ready")


def load(port: int, body: bytes, content_type: str, clients: int, seconds: float) -> dict:
    """`clients` threads, each with one keep-alive connection, posting until the deadline."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            try:
                conn.request("POST", "/v1/segment", body, {"Content-Type": content_type})
                resp = conn.getresponse()
                resp.read()
                ok = resp.status == 200
                err = None if ok else f"HTTP {resp.status}"
            except OSError as e:
                err = f"{type(e).__name__}"
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            with lock:
                if err is None:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors.append(err)
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = [x * 1000 for x in latencies]
    return {"requests": len(lat), "errors": len(errors), "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 2), "latencies_ms": lat,
            "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None}


def serve(args: argparse.Namespace) -> None:
    """The server side, in its own process so its memory can be measured."""
    import uvicorn

    from hemaseg.serve import Settings, create_app

    app = create_app(args.serve, Settings(workers=args.workers, max_batch=args.max_batch, device="cpu"))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    ap.add_argument("--seconds", type=float, default=5.0, help="load time per cell and round (default 5)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all cells, interleaved (default 3)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="scan sizes (default 256 512)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS), help="what to compare")
    ap.add_argument("--serve", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        return serve(args)

    from hemaseg.device import describe_cpu

    cpu = describe_cpu()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(Path(tmp))
        bodies = {size: multipart(scan_png(size)) for size in args.sizes}
        servers = {}
        try:
            for name in args.configs:  # all servers up at once; an idle one costs no CPU
                workers, max_batch = CONFIGS[name]
                port = free_port()
                servers[name] = (port, subprocess.Popen([
                    sys.executable, __file__, "--serve", str(ckpt), "--port", str(port), "--workers", str(workers),
                    "--max-batch", str(max_batch)]))
            for port, proc in servers.values():
                wait_ready(port, proc)
            for name, (port, _) in servers.items():
                for size in args.sizes:  # warm each size's code paths
                    load(port, *bodies[size], args.clients, min(2.0, args.seconds))
            # Rounds interleave the configurations, so a neighbour's load on a shared machine hits all alike.
            cells: dict[tuple[str, int], list[dict]] = {}
            for r in range(args.rounds):
                for name, (port, proc) in servers.items():
                    for size in args.sizes:
                        result = load(port, *bodies[size], args.clients, args.seconds)
                        cells.setdefault((name, size), []).append(result)
                        print(f"round {r + 1}: {name:<13} {size}: {result['throughput_rps']} req/s, "
                              f"p50 {result['p50_ms']} ms", flush=True)
            for (name, size), results in cells.items():
                port, proc = servers[name]
                lat = [x for res in results for x in res.pop("latencies_ms")]
                requests, wall = sum(x["requests"] for x in results), sum(x["wall_s"] for x in results)
                rss, peak = rss_mb(proc.pid)
                rows.append({
                    "config": name, "workers": CONFIGS[name][0], "max_batch": CONFIGS[name][1], "size": size,
                    "requests": requests, "errors": sum(x["errors"] for x in results), "wall_s": round(wall, 1),
                    "throughput_rps": round(requests / wall, 2),
                    "throughput_rps_rounds": [x["throughput_rps"] for x in results],
                    "p50_ms": round(float(np.percentile(lat, 50)), 1) if lat else None,
                    "p99_ms": round(float(np.percentile(lat, 99)), 1) if lat else None,
                    "rss_mb": round(rss), "peak_rss_mb": round(peak),
                })
        finally:
            for _, proc in servers.values():
                proc.terminate()
            for _, proc in servers.values():
                proc.wait(timeout=30)

    header = f"{'config':<13} {'size':>5} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'ok':>5} {'errors':>6} {'RSS MiB':>8}"
    print(f"\n{args.clients} concurrent clients, {args.rounds} x {args.seconds:g} s per cell, untrained seed model (input 256), "
          f"{os.cpu_count()} CPUs ({cpu['model']}; {' '.join(cpu['flags'])})")
    print(header)
    for r in rows:
        print(f"{r['config']:<13} {r['size']:>5} {r['throughput_rps']:>7.2f} {r['p50_ms'] or float('nan'):>8.0f} {r['p99_ms'] or float('nan'):>8.0f} "
              f"{r['requests']:>5} {r['errors']:>6} {r['peak_rss_mb']:>8}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "clients": args.clients, "seconds": args.seconds, "rounds": args.rounds, "model": "untrained seed UNet, input 256, CPU",
        "machine": {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
                    "platform": platform.platform()},
        "rows": rows,
    }, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
