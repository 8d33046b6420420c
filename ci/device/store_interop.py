#!/usr/bin/env python3
"""Interop of dist-store with PyTorch's TCPStore, both directions, on a machine with torch.

Usage: python3 ci/device/store_interop.py BIN_DIR
  BIN_DIR holds release builds of the `dist` binary and of the examples `store_tool` and
  `mp_stateless_group`.

1. PyTorch client -> our server (`dist store serve`): every TCPStore call, checked.
2. PyTorch's gloo process group over our launcher's store: `dist run --nproc-per-node 2`
   runs this script as two torch ranks that `init_process_group("gloo", init_method="env://")`
   (torch's rank 0 sees TORCHELASTIC_USE_AGENT_STORE and uses our store) and all_reduce.
3. Our client -> PyTorch master (libuv and legacy backends): `store_tool interop`, then torch
   reads what our client wrote.
4. Our StatelessProcessGroup over a PyTorch master: 4 `mp_stateless_group` ranks.
5. Flood: 3,000 malformed connections held open against each server, then the time a fresh
   PyTorch client needs to connect (validate + ping) and set/get.
Prints PASS/FAIL per check and exits non-zero on any failure.
"""
import os
import socket
import subprocess
import sys
import time
from datetime import timedelta

RESULTS = []


def record(name, ok, detail=""):
    RESULTS.append((name, ok, detail))
    print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)


def start_our_server(bin_dir):
    p = subprocess.Popen([os.path.join(bin_dir, "dist"), "store", "serve", "--host", "127.0.0.1", "--port", "0"],
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    port = int(line.strip().rsplit(":", 1)[1].split(",")[0])
    return p, port


def torch_client_against_ours(bin_dir):
    import torch.distributed as dist
    srv, port = start_our_server(bin_dir)
    try:
        s = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10), use_libuv=True)
        s.set("a", "va")
        record("torch->ours set/get", s.get("a") == b"va")
        record("torch->ours add", s.add("n", 3) == 3 and s.add("n", 4) == 7 and s.get("n") == b"7")
        record("torch->ours compare_set", s.compare_set("cs", "", "x") == b"x"
               and s.compare_set("cs", "no", "y") == b"x" and s.compare_set("cs", "x", "y") == b"y"
               and s.compare_set("none", "e", "d") == b"e")
        record("torch->ours check", s.check(["a"]) and not s.check(["none"]))
        s.append("ap", "12")
        s.append("ap", "34")
        record("torch->ours append", s.get("ap") == b"1234")
        s.multi_set(["m1", "m2"], ["1", "2"])
        record("torch->ours multi_get", s.multi_get(["m1", "m2"]) == [b"1", b"2"])
        record("torch->ours delete_key", s.delete_key("m1") and not s.delete_key("m1"))
        record("torch->ours num_keys", s.num_keys() >= 5, f"({s.num_keys()})")
        t0 = time.perf_counter()
        try:
            s.wait(["never"], timedelta(milliseconds=300))
            record("torch->ours wait timeout", False, "no exception")
        except Exception as e:  # noqa: BLE001
            dt = time.perf_counter() - t0
            record("torch->ours wait timeout + CANCEL_WAIT", dt < 3, f"({dt:.2f}s: {str(e)[:60]})")
        record("torch->ours usable after cancel", s.get("a") == b"va")
        s2 = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=10))
        import threading
        got = {}
        th = threading.Thread(target=lambda: got.setdefault("v", s2.get("later")))
        th.start()
        time.sleep(0.2)
        s.set("later", "woken")
        th.join(10)
        record("torch->ours blocking get woken by set", got.get("v") == b"woken")
        try:
            s.queue_push("q", "item")
            record("torch->ours queue", s.queue_len("q") == 1 and s.queue_pop("q") == b"item"
                   and s.queue_len("q") == 0)
        except Exception as e:  # noqa: BLE001
            record("torch->ours queue", False, str(e)[:100])
        ps = dist.PrefixStore("pfx", s)
        ps.set("k", "v")
        record("torch->ours PrefixStore", s.get("pfx/k") == b"v")
    finally:
        srv.terminate()
        srv.wait(10)


def gloo_worker():
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import torch
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=60))
    r = dist.get_rank()
    t = torch.tensor([float(r + 1)])
    dist.all_reduce(t)
    ws = dist.get_world_size()
    want = ws * (ws + 1) / 2
    dist.barrier()
    dist.destroy_process_group()
    if t.item() != want:
        print(f"all_reduce gave {t.item()}, want {want}")
        sys.exit(1)
    print(f"gloo all_reduce ok ({t.item()})")


def gloo_over_our_launcher(bin_dir):
    p = subprocess.run([os.path.join(bin_dir, "dist"), "run", "--nproc-per-node", "2", "--timeout", "90",
                        "--", sys.executable, os.path.abspath(__file__), "--gloo-worker"],
                       capture_output=True, text=True, timeout=120)
    ok = p.returncode == 0 and p.stdout.count("gloo all_reduce ok") == 2
    record("torch gloo process group over our launcher's store", ok,
           "" if ok else (p.stdout[-800:] + p.stderr[-1500:]))
    print(p.stdout.strip())


def ours_against_torch_master(bin_dir, libuv):
    import torch.distributed as dist
    m = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), use_libuv=libuv)
    tag = "libuv" if libuv else "legacy"
    p = subprocess.run([os.path.join(bin_dir, "store_tool"), "interop", "127.0.0.1", str(m.port)]
                       + ([] if libuv else ["--no-queues"]),
                       capture_output=True, text=True, timeout=120)
    print(p.stdout.strip())
    record(f"ours->torch({tag}) every client call", p.returncode == 0, p.stderr.strip()[-500:])
    if p.returncode == 0:
        record(f"ours->torch({tag}) torch reads our writes",
               m.get("rs/from_rust") == b"hello torch" and m.get("rs/n") == b"7" and m.get("rs/ap") == b"1234")
    # Our StatelessProcessGroup over this PyTorch master, 4 ranks as clients.
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(m.port), WORLD_SIZE="4",
               LOCAL_WORLD_SIZE="4", TORCHELASTIC_USE_AGENT_STORE="True")
    procs = [subprocess.Popen([os.path.join(bin_dir, "mp_stateless_group")],
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(4)]
    outs = [pr.communicate(timeout=120)[0] for pr in procs]
    ok = all(pr.returncode == 0 for pr in procs)
    record(f"our StatelessProcessGroup x4 over torch({tag}) master", ok, "" if ok else " | ".join(outs)[-1500:])


def flood(port, n=3000):
    socks = []
    for i in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            # Half a SET claiming an 8 MiB value, or noise; left open.
            if i % 2 == 0:
                s.sendall(b"\x01" + (8 << 20).to_bytes(8, "little") + b"x" * 7)
            else:
                s.sendall(os.urandom(37))
            socks.append(s)
        except OSError:
            break
    return socks


def fresh_client_time(port, limit=20.0):
    import torch.distributed as dist
    t0 = time.perf_counter()
    try:
        s = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=limit))
        s.set("fresh", "ok")
        ok = s.get("fresh") == b"ok"
        return time.perf_counter() - t0, ok
    except Exception as e:  # noqa: BLE001
        return time.perf_counter() - t0, f"error: {str(e)[:80]}"


def flood_both(bin_dir):
    import resource
    import torch.distributed as dist
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    m = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=30), use_libuv=True)
    socks = flood(m.port)
    dt, ok = fresh_client_time(m.port)
    print(f"torch server after {len(socks)} malformed connections: fresh client connect+set+get {dt:.3f}s ({ok})")
    for s in socks:
        s.close()
    srv, port = start_our_server(bin_dir)
    try:
        socks = flood(port)
        dt2, ok2 = fresh_client_time(port)
        print(f"our server after {len(socks)} malformed connections: fresh client connect+set+get {dt2:.3f}s ({ok2})")
        record("flood: our server answers a fresh torch client within 1 s", ok2 is True and dt2 < 1.0,
               f"(ours {dt2:.3f}s, torch {dt:.3f}s)")
        for s in socks:
            s.close()
    finally:
        srv.terminate()
        srv.wait(10)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--gloo-worker":
        gloo_worker()
        return
    bin_dir = sys.argv[1]
    import torch
    print(f"torch {torch.__version__}", flush=True)
    for step in (torch_client_against_ours, gloo_over_our_launcher,
                 lambda b: ours_against_torch_master(b, True), lambda b: ours_against_torch_master(b, False),
                 flood_both):
        try:
            step(bin_dir)
        except Exception as e:  # noqa: BLE001
            record(getattr(step, "__name__", "step"), False, f"exception: {e!r}"[:300])
    failed = [n for n, ok, _ in RESULTS if not ok]
    print(f"interop: {len(RESULTS) - len(failed)} passed, {len(failed)} failed {failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
