#!/usr/bin/env python
"""Load test of `imrnn serve` with locust, headless: N concurrent clients for T seconds.

    python benchmarks/load.py --checkpoint checkpoints/scifact --dataset scifact    # starts the service; 32 users, 60 s
    python benchmarks/load.py --url http://127.0.0.1:8000 --queries queries.txt     # a service that is already running

What it does:
1. starts `imrnn serve --checkpoint CKPT --dataset X --port 0` (unless --url is given) and waits for /health;
2. runs `locust -f benchmarks/load.py --headless` with `--users` clients spawned at once for `--duration` seconds.
   Each client sends requests back to back (no think time): POST /search with one query (k=10) drawn at random
   from the query list, and one time in five POST /rerank of the ids that the client's last search returned
   (a first stage elsewhere, then re-ranking by id). The queries are the dataset's `--split` queries, or the
   lines of `--queries`;
3. reads locust's CSV statistics and prints one JSON object: requests, requests per second, p50/p99 latency (ms,
   as locust buckets them), error count, per route, plus the machine's load (cores, load average before and
   after, CPU use of the whole machine and of the server process during the run);
4. `--output FILE` also writes that JSON; the service it started is stopped and its port freed.

The same file is the locustfile: locust imports it as a module (not `__main__`), which defines the client.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

QUERIES_ENV = "IMRNN_LOAD_QUERIES"  # JSON file with the query list, read by the locust clients
NO_PROXY = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}


if __name__ != "__main__":  # imported by locust as the locustfile
    from locust import task
    from locust.contrib.fasthttp import FastHttpUser

    class SearchClient(FastHttpUser):
        """One client: searches one query at a time; every fifth request re-ranks its last hits by id."""

        queries: list[str] = json.loads(Path(os.environ[QUERIES_ENV]).read_text(encoding="utf-8"))

        def on_start(self) -> None:
            self.last_ids: list[str] = []

        @task(4)
        def search(self) -> None:
            body = {"queries": [random.choice(self.queries)], "k": 10}
            with self.client.post("/search", json=body, catch_response=True) as response:
                if response.status_code == 200:
                    self.last_ids = [hit["id"] for hit in response.json()["results"][0]["hits"]]
                else:
                    response.failure(f"{response.status_code}: {response.text[:200]}")

        @task(1)
        def rerank(self) -> None:
            if not self.last_ids:
                return self.search()
            body = {"queries": [{"query": random.choice(self.queries), "ids": self.last_ids}]}
            with self.client.post("/rerank", json=body, catch_response=True) as response:
                if response.status_code != 200:
                    response.failure(f"{response.status_code}: {response.text[:200]}")


# --------------------------------------------------------------------------- the driver


def _get(url: str, timeout: float = 5.0) -> dict[str, Any]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(url, timeout=timeout) as response:
        return json.loads(response.read())


def start_service(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """`imrnn serve` on a free port (port 0; uvicorn logs the one it bound); returns the process and base URL."""
    command = [sys.executable, "-c", "from imrnn.cli import main; main()", "serve", "--checkpoint", str(args.checkpoint),
               "--port", "0", "--k", str(args.k), "--vocabulary", args.vocabulary]
    for flag, value in (("--dataset", args.dataset), ("--data-dir", args.data_dir), ("--cache-dir", args.cache_dir),
                        ("--threads", args.threads)):
        if value is not None:
            command += [flag, str(value)]
    handle = open(log, "w", encoding="utf-8")
    # access log lines go to stdout (dropped); the start-up lines, with the bound port, go to stderr
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=handle, env={**os.environ, **NO_PROXY})
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", log.read_text(encoding="utf-8", errors="replace"))
        if found:
            return process, found.group(1)
        if process.poll() is not None:
            break
        time.sleep(0.5)
    stop_service(process)
    raise SystemExit(f"imrnn serve did not start within {args.startup_timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_service(process: subprocess.Popen) -> None:
    """SIGTERM (uvicorn shuts down gracefully and closes its socket), then SIGKILL if it lingers."""
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def read_queries(args: argparse.Namespace) -> list[str]:
    if args.queries is not None:
        text = Path(args.queries).read_text(encoding="utf-8")
        queries = json.loads(text) if text.lstrip().startswith("[") else [line for line in text.splitlines() if line.strip()]
    elif args.dataset is not None:
        from imrnn.data import load_dataset

        queries = load_dataset(args.dataset, args.data_dir, args.cache_dir, download=False).split(args.split).texts
    else:
        raise SystemExit("Give --queries FILE (one query per line, or a JSON list) or --dataset NAME.")
    if not queries:
        raise SystemExit("The query list is empty.")
    return queries


def _row(row: dict[str, str]) -> dict[str, Any]:
    return {"requests": int(row["Request Count"]), "errors": int(row["Failure Count"]),
            "rps": round(float(row["Requests/s"]), 2), "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]),
            "mean_ms": round(float(row["Average Response Time"]), 2), "max_ms": float(row["Max Response Time"])}


def run_locust(url: str, queries: list[str], users: int, duration: int, work: Path) -> dict[str, Any]:
    """locust headless against `url`; returns the aggregated and per-route statistics from its CSV."""
    queries_file = work / "queries.json"
    queries_file.write_text(json.dumps(queries), encoding="utf-8")
    prefix = work / "locust"
    command = [sys.executable, "-m", "locust", "-f", str(Path(__file__).resolve()), "--headless", "--users", str(users),
               "--spawn-rate", str(users), "--run-time", f"{duration}s", "--stop-timeout", "10", "--host", url,
               "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 120,
                          env={**os.environ, **NO_PROXY, QUERIES_ENV: str(queries_file)})
    stats = Path(f"{prefix}_stats.csv")
    if done.returncode != 0 or not stats.is_file():
        raise SystemExit(f"locust failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    rows = list(csv.DictReader(stats.open(encoding="utf-8")))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    failures = [dict(r) for r in csv.DictReader(Path(f"{prefix}_failures.csv").open(encoding="utf-8"))]
    return {**_row(total), "routes": {f"{r['Type']} {r['Name']}": _row(r) for r in rows if r["Name"] != "Aggregated"},
            "failures": failures[:10]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="Base URL of a running service (otherwise one is started from --checkpoint).")
    parser.add_argument("--checkpoint", type=Path, help="Checkpoint to serve.")
    parser.add_argument("--dataset", help="Dataset whose corpus the service indexes; its --split queries are sent.")
    parser.add_argument("--split", default="test", help="Queries of this split are sent (default: test).")
    parser.add_argument("--queries", type=Path, help="Queries to send instead: one per line, or a JSON list.")
    parser.add_argument("--data-dir", default=os.environ.get("IMRNN_DATA_DIR"), help="Data path [env: IMRNN_DATA_DIR].")
    parser.add_argument("--cache-dir", default=os.environ.get("IMRNN_CACHE_DIR"), help="Cache [env: IMRNN_CACHE_DIR].")
    parser.add_argument("--k", type=int, default=100, help="First-stage candidates the service re-ranks (default 100).")
    parser.add_argument("--vocabulary", default="encoder", help="Concept vocabulary of the service's /explain.")
    parser.add_argument("--threads", type=int, help="torch threads of the service it starts (default: torch's choice).")
    parser.add_argument("--users", type=int, default=32, help="Concurrent clients (default 32).")
    parser.add_argument("--duration", type=int, default=60, help="Seconds of load (default 60).")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="Seconds to wait for the service to start.")
    parser.add_argument("--output", type=Path, help="Also write the result JSON here.")
    args = parser.parse_args(argv)
    if args.url is None and args.checkpoint is None:
        parser.error("give --url of a running service or --checkpoint to start one")
    import psutil  # a locust dependency

    queries = read_queries(args)
    with tempfile.TemporaryDirectory(prefix="imrnn-load-") as tmp:
        work = Path(tmp)
        process, url = (None, args.url.rstrip("/")) if args.url else start_service(args, work / "serve.log")
        try:
            health = _get(f"{url}/health")
            server = psutil.Process(process.pid) if process is not None else None
            if server is not None:
                server.cpu_percent()
            psutil.cpu_percent()
            load_before = os.getloadavg()
            start = time.perf_counter()
            stats = run_locust(url, queries, args.users, args.duration, work)
            elapsed = time.perf_counter() - start
            machine_cpu = psutil.cpu_percent()
            server_cpu = server.cpu_percent() if server is not None else None
            load_after = os.getloadavg()
        finally:
            if process is not None:
                stop_service(process)
    result = {
        "users": args.users, "duration_s": args.duration, "queries": len(queries), "documents": health["documents"],
        "candidates": health["candidates"], **stats,
        "machine": {"cores": os.cpu_count(), "load_avg_1m_before": round(load_before[0], 2),
                    "load_avg_1m_after": round(load_after[0], 2), "cpu_percent": machine_cpu,
                    "server_cpu_percent": server_cpu, "locust_wall_s": round(elapsed, 1)},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
