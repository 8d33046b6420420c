"""PyTorch's side of `dist bench store`'s rendezvous: the same patterns with PyTorch's TCPStore
master (libuv backend, its own process) and PyTorch clients (threads, one connection each).

`dist bench store` writes this file to a temporary path and runs `python3 FILE bench --clients
1000,5000 --patterns barrier,keys --repeat 3`; `FILE master` is the server process. Prints one line per size:
RESULT kind=rendezvous server=torch pattern=P clients=N best_ms=B median_ms=M server_peak_kib=K server_base_kib=K0
"""
import resource
import subprocess
import sys
import threading
import time
from datetime import timedelta


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def master():
    raise_nofile()
    import torch.distributed as dist
    m = dist.TCPStore("127.0.0.1", 0, is_master=True, use_libuv=True, wait_for_workers=False,
                      timeout=timedelta(seconds=600))
    print(f"PORT {m.port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return None


def barrier(s, prefix, rank, n):
    """The requests of dist_store::group::store_barrier, through PyTorch's client."""
    me = rank.to_bytes(4, "little")
    s.append(prefix + "arrived", me)
    if s.add(prefix + "arrived_count", 1) == n:
        s.set(prefix + "open", "1")
    s.wait([prefix + "open"])
    s.append(prefix + "left", me)
    if s.add(prefix + "left_count", 1) == n:
        s.set(prefix + "closed", "1")
    if rank == 0:
        s.wait([prefix + "closed"])
        for k in ("arrived", "arrived_count", "open", "left", "left_count", "closed"):
            s.delete_key(prefix + k)


def rendezvous(port, n, pattern, prefix):
    import torch.distributed as dist
    stores = [dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False,
                            timeout=timedelta(seconds=600)) for _ in range(n)]
    keys = [f"{prefix}{i}" for i in range(n)]
    go = threading.Barrier(n + 1)
    starts, ends, errs = [0.0] * n, [0.0] * n, []

    def client(i):
        go.wait()
        starts[i] = time.perf_counter()
        try:
            if pattern == "keys":
                stores[i].set(keys[i], "1")
                stores[i].wait(keys)
            else:
                barrier(stores[i], prefix, i, n)
            ends[i] = time.perf_counter()
        except Exception as e:  # noqa: BLE001
            errs.append(e)

    threading.stack_size(256 * 1024)
    ths = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for t in ths:
        t.start()
    go.wait()
    for t in ths:
        t.join()
    if errs:
        raise errs[0]
    del stores
    return (max(ends) - min(starts)) * 1e3


def bench(argv):
    raise_nofile()
    arg = lambda name, d: argv[argv.index(name) + 1] if name in argv else d  # noqa: E731
    sizes = [int(x) for x in arg("--clients", "1000").split(",")]
    patterns = arg("--patterns", "barrier").split(",")
    repeat = int(arg("--repeat", "3"))
    import torch
    print(f"torch: {torch.__version__}, TCPStore master with use_libuv=True in its own process", flush=True)
    for pattern in patterns:
        for n in sizes:
            m = subprocess.Popen([sys.executable, sys.argv[0], "master"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            try:
                port = int(m.stdout.readline().split()[1])
                base = status_kib(m.pid, "VmRSS:")
                times = sorted(rendezvous(port, n, pattern, f"rdv/{pattern}/{n}/{r}/") for r in range(repeat))
                peak = status_kib(m.pid, "VmHWM:")
                print(f"RESULT kind=rendezvous server=torch pattern={pattern} clients={n} "
                      f"best_ms={times[0]:.2f} median_ms={times[len(times) // 2]:.2f} "
                      f"server_peak_kib={peak if peak is not None else 'nan'} "
                      f"server_base_kib={base if base is not None else 'nan'}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"torch: {pattern} rendezvous of {n} failed: {e!r}"[:300], flush=True)
            finally:
                m.kill()
                m.wait()


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "master":
        master()
    else:
        bench(sys.argv[1:])
