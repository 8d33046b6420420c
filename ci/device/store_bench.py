#!/usr/bin/env python3
"""`dist bench store` beside PyTorch's TCPStore, in one run, on one machine.

Usage: python3 ci/device/store_bench.py BIN_DIR [--duration S] [--clients 8,64] [--rendezvous 128,1024]
                                          [--big-rendezvous 1000,5000,10000]
  BIN_DIR holds a release build of the `dist` binary.

Four pairings of server and client:
  ours/ours    `dist bench store` (our server a `dist store serve` child, our client processes)
  torch/torch  PyTorch's TCPStore master (libuv) and PyTorch client processes
  torch/ours   our client processes against PyTorch's master (`dist bench store --addr`)
  ours/torch   PyTorch client processes against `dist store serve`
Throughput: set+get pairs per second (one set, one get; PyTorch's get is WAIT then GET) with N
client processes for `--duration` seconds after a common start. Rendezvous: N clients (threads,
each its own connection) each set a key, then wait for all N keys; best and median of 3.
Prints a table, then runs `dist bench store`'s own rendezvous benchmark at `--big-rendezvous`
sizes (the barrier and the all-keys patterns, with its PyTorch peers: torch's master with our
client, and torch's master with torch's clients).
"""
import os
import re
import subprocess
import sys
import threading
import time
from datetime import timedelta


def arg(name, default):
    if name in sys.argv:
        return sys.argv[sys.argv.index(name) + 1]
    return default


def torch_store(port, master=False, timeout=120):
    import torch.distributed as dist
    return dist.TCPStore("127.0.0.1", port, is_master=master, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)


def worker(port, tag, w, duration):
    s = torch_store(port)
    key = f"{tag}/k/{w}"
    val = b"v" * 64
    s.set(f"{tag}/ready/{w}", "1")
    s.wait([f"{tag}/go"], timedelta(seconds=120))
    end = time.perf_counter() + duration
    pairs = 0
    while time.perf_counter() < end:
        for _ in range(16):
            s.set(key, val)
            v = s.get(key)
            assert len(v) == 64
            pairs += 1
    s.add(f"{tag}/pairs", pairs)
    s.set(f"{tag}/done/{w}", "1")


def torch_clients_throughput(port, n, duration, tag):
    ctl = torch_store(port)
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(port), tag, str(w),
                               str(duration)]) for w in range(n)]
    try:
        ctl.wait([f"{tag}/ready/{w}" for w in range(n)], timedelta(seconds=180))
        ctl.set(f"{tag}/go", "1")
        ctl.wait([f"{tag}/done/{w}" for w in range(n)], timedelta(seconds=duration + 120))
        total = int(ctl.get(f"{tag}/pairs"))
    finally:
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
    return total / duration


def torch_clients_rendezvous(port, n, tag):
    stores = [torch_store(port) for _ in range(n)]
    keys = [f"{tag}/{i}" for i in range(n)]
    go = threading.Barrier(n + 1)
    ends = [0.0] * n
    starts = [0.0] * n
    errs = []

    def f(i):
        go.wait()
        starts[i] = time.perf_counter()
        try:
            stores[i].set(keys[i], "1")
            stores[i].wait(keys, timedelta(seconds=120))
            ends[i] = time.perf_counter()
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    ths = [threading.Thread(target=f, args=(i,), daemon=True) for i in range(n)]
    for t in ths:
        t.start()
    go.wait()
    for t in ths:
        t.join(180)
    if errs:
        raise errs[0]
    # First client's start to last client's return.
    return (max(ends) - min(starts)) * 1e3


def parse_results(out):
    res = {}
    for m in re.finditer(r"RESULT kind=(\w+) (?:server=\w+ )?(?:pattern=keys )?clients=(\d+) (\w+)=([\d.]+)"
                         r"(?: median_ms=([\d.]+))?", out):
        kind, n, _, v, med = m.groups()
        res[(kind, int(n))] = (float(v), float(med) if med else None)
    return res


def rust_bench(bin_dir, args, timeout=600):
    p = subprocess.run([os.path.join(bin_dir, "dist"), "bench", "store", "--no-torch", "--patterns", "keys"] + args,
                       capture_output=True, text=True,
                       timeout=timeout)
    print(p.stdout, p.stderr[-2000:], flush=True)
    return parse_results(p.stdout)


def main():
    if sys.argv[1] == "--worker":
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]))
        return
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    bin_dir = sys.argv[1]
    duration = float(arg("--duration", "2"))
    clients = [int(x) for x in arg("--clients", "8,64").split(",")]
    rdv = [int(x) for x in arg("--rendezvous", "128,1024").split(",")]
    import torch
    print(f"torch {torch.__version__}; {os.cpu_count()} CPUs", flush=True)
    table = {}  # (pairing, kind, n) -> value

    common = ["--duration", str(duration), "--clients", ",".join(map(str, clients)),
              "--rendezvous", ",".join(map(str, rdv)), "--repeat", "3"]
    # ours/ours, with one event-loop thread and with the default (4 here)
    for (kind, n), (v, med) in rust_bench(bin_dir, common + ["--server-threads", "1"]).items():
        table[("ours(1 thread)/ours", kind, n)] = (v, med)
    for (kind, n), (v, med) in rust_bench(bin_dir, common).items():
        table[("ours/ours", kind, n)] = (v, med)
    # torch master for torch/torch and torch/ours
    master = torch_store(0, master=True)
    port = master.port
    for n in clients:
        try:
            table[("torch/torch", "setget", n)] = (torch_clients_throughput(port, n, duration, f"tt{n}"), None)
        except Exception as e:  # noqa: BLE001
            print(f"torch/torch setget {n}: {e!r}")
    for n in rdv:
        try:
            times = sorted(torch_clients_rendezvous(port, n, f"ttr{n}/{r}") for r in range(3))
            table[("torch/torch", "rendezvous", n)] = (times[0], times[1])
        except Exception as e:  # noqa: BLE001
            print(f"torch/torch rendezvous {n}: {e!r}")
    for (kind, n), (v, med) in rust_bench(bin_dir, common + ["--addr", f"127.0.0.1:{port}"]).items():
        table[("torch/ours", kind, n)] = (v, med)
    # ours/torch: torch clients against `dist store serve`
    srv = subprocess.Popen([os.path.join(bin_dir, "dist"), "store", "serve", "--host", "127.0.0.1", "--port", "0"],
                           stdout=subprocess.PIPE, text=True)
    try:
        oport = int(srv.stdout.readline().strip().rsplit(":", 1)[1])
        for n in clients:
            try:
                table[("ours/torch", "setget", n)] = (torch_clients_throughput(oport, n, duration, f"ot{n}"), None)
            except Exception as e:  # noqa: BLE001
                print(f"ours/torch setget {n}: {e!r}")
        for n in rdv:
            try:
                times = sorted(torch_clients_rendezvous(oport, n, f"otr{n}/{r}") for r in range(3))
                table[("ours/torch", "rendezvous", n)] = (times[0], times[1])
            except Exception as e:  # noqa: BLE001
                print(f"ours/torch rendezvous {n}: {e!r}")
    finally:
        srv.terminate()
        srv.wait(10)

    pairings = ["ours/ours", "ours(1 thread)/ours", "torch/torch", "torch/ours", "ours/torch"]
    print("\n| server/client | " + " | ".join(
        [f"set+get/s, {n} procs" for n in clients] + [f"rendezvous {n} (best/median ms)" for n in rdv]) + " |")
    print("|---|" + "---|" * (len(clients) + len(rdv)))
    for pr in pairings:
        cells = []
        for n in clients:
            v = table.get((pr, "setget", n))
            cells.append(f"{v[0]:,.0f}" if v else "n/a")
        for n in rdv:
            v = table.get((pr, "rendezvous", n))
            cells.append(f"{v[0]:.1f} / {v[1]:.1f}" if v else "n/a")
        print(f"| {pr} | " + " | ".join(cells) + " |")
    for n in clients:
        a, b = table.get(("ours/ours", "setget", n)), table.get(("torch/torch", "setget", n))
        if a and b:
            print(f"set+get, {n} clients: ours/ours is {a[0] / b[0]:.2f}x torch/torch "
                  f"({2 * a[0]:,.0f} vs {2 * b[0]:,.0f} ops/s counting set and get apart)")
    big = arg("--big-rendezvous", "1000,5000,10000")
    if big:
        p = subprocess.run([os.path.join(bin_dir, "dist"), "bench", "store", "--clients", "0", "--rendezvous", big,
                            "--patterns", "barrier,keys", "--repeat", "3", "--torch-python", sys.executable],
                           capture_output=True, text=True, timeout=7200)
        print(p.stdout, p.stderr[-2000:], flush=True)


if __name__ == "__main__":
    main()
