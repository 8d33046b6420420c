#!/usr/bin/env python3
"""vLLM's own MessageQueue, measured the way `dist bench mq` measures ours.

Loads `vllm/distributed/device_communicators/shm_broadcast.py` from a vLLM source tree (--vllm-src
or VLLM_SRC; only that file is read) with small stand-ins for the vLLM modules it imports, so it
runs with torch and pyzmq alone (no vllm package, no network). 1 writer (this process) and N
readers, each a process (spawned), on one node: the ring for every reader, as vLLM builds it for
local readers.

For each reader count and size, as `dist bench mq` does (crates/dist/src/cli/mq.rs):
- paced: the writer stamps time.time_ns() into a bytearray message, enqueue()s it, waits until
  every reader has read it (the ring's read flags of that chunk), pauses --pace-us, sends the next;
  a message's latency is from just before enqueue() to the last reader's return from dequeue();
- burst: messages back to back, from the first enqueue() to the last reader's last dequeue();
- ring: chunks of max(size, 4096) bytes (plus 4 KiB for vLLM's pickle framing, so every message
  stays in the ring instead of going through its overflow socket), clamp(64 MiB / chunk, 8, 256)
  chunks; a burst of min(--burst, max(512 MiB / size, 200)) messages.

Prints `# ...` lines about the run and one `ROW readers bytes p50_ns p99_ns burst_msgs msgs_per_s`
line per point.
"""

import argparse
import importlib.util
import ipaddress
import logging
import multiprocessing as mp
import os
import pickle
import sys
import tempfile
import time
import types
import uuid

SHM_BROADCAST = os.path.join("vllm", "distributed", "device_communicators", "shm_broadcast.py")
STEP_TIMEOUT_S = 120.0


def _module(name, **attrs):
    m = types.ModuleType(name)
    m.__dict__.update(attrs)
    m.__path__ = []  # a package: submodules can be registered under it
    sys.modules[name] = m
    return m


def _sched_yield():
    # vLLM yields with os.sched_yield() from Python 3.11.1 on, time.sleep(0) before.
    if sys.version_info[:3] >= (3, 11, 1):
        os.sched_yield()
    else:
        time.sleep(0)


def _stand_ins():
    """The names shm_broadcast.py imports from vLLM (this and older layouts), as small stand-ins
    with the behaviour the queue relies on; nothing here is vLLM's code."""
    _module("vllm")
    _module(
        "vllm.envs",
        VLLM_USE_SPINLOOP_EXT=False,
        VLLM_RINGBUFFER_WARNING_INTERVAL=60,
        VLLM_RPC_BASE_PATH=tempfile.gettempdir(),
        VLLM_HOST_IP="",
    )
    sys.modules["vllm"].envs = sys.modules["vllm.envs"]
    _module("vllm.logger", init_logger=logging.getLogger)

    class _Platform:
        @staticmethod
        def device_count():
            return 1

    _module("vllm.platforms", current_platform=_Platform())

    def ipc_path():
        return f"ipc://{tempfile.gettempdir()}/{uuid.uuid4()}"

    def is_valid_ipv6_address(a):
        try:
            ipaddress.IPv6Address(a.split("%")[0])
            return True
        except ValueError:
            return False

    net = dict(
        get_ip=lambda: "127.0.0.1",
        get_open_port=lambda: 0,
        get_open_zmq_ipc_path=ipc_path,
        get_open_zmq_inproc_path=lambda: f"inproc://{uuid.uuid4()}",
        is_valid_ipv6_address=is_valid_ipv6_address,
    )
    _module("vllm.utils", **net)
    _module("vllm.utils.network_utils", **net)
    _module("vllm.utils.cpu_resource_utils", check_cgroup_memory_available=lambda *a, **k: None)

    class StatelessProcessGroup:  # only named in type hints here
        pass

    _module("vllm.distributed")
    _module(
        "vllm.distributed.utils",
        StatelessProcessGroup=StatelessProcessGroup,
        sched_yield=_sched_yield,
    )
    _module("vllm.distributed.device_communicators")


def load(vllm_src):
    """vLLM's shm_broadcast module from `vllm_src`."""
    name = "vllm.distributed.device_communicators.shm_broadcast"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(vllm_src, SHM_BROADCAST)
    if not os.path.isfile(path):
        sys.exit(f"mq_vllm_peer: no {SHM_BROADCAST} under {vllm_src}")
    _stand_ins()
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def ring_for(size):
    chunk = max(size, 4096)
    return chunk, min(max((64 << 20) // chunk, 8), 256)


def burst_for(size, burst):
    return min(burst, max((512 << 20) // size, 200))


def percentile(sorted_vals, p):
    if not sorted_vals:
        return 0
    i = round((len(sorted_vals) - 1) * p)
    return sorted_vals[min(i, len(sorted_vals) - 1)]


def reader_main(vllm_src, rank, conn):
    """One reader process: for each point it is sent (handle, size, paced, burst), it reads and
    sends back (latencies, end time)."""
    sb = load(vllm_src)
    while True:
        job = conn.recv()
        if job is None:
            return
        handle_bytes, size, paced, burst = job
        mq = sb.MessageQueue.create_from_handle(pickle.loads(handle_bytes), rank)
        mq.wait_until_ready()
        lat = []
        for _ in range(paced):
            m = mq.dequeue(timeout=STEP_TIMEOUT_S)
            now = time.time_ns()
            lat.append(now - int.from_bytes(m[:8], "little"))
        for _ in range(burst):
            m = mq.dequeue(timeout=STEP_TIMEOUT_S)
            if len(m) != size:
                raise RuntimeError(f"reader {rank}: got {len(m)} bytes, sent {size}")
        end = time.time_ns()
        conn.send((lat, end))
        del mq


def all_read(mq, n, chunks):
    """True once every reader has read the chunk last written (its read flags)."""
    idx = (mq.current_idx - 1) % chunks
    with mq.buffer.get_metadata(idx) as md:
        return all(md[1 : n + 1])


def point(sb, conns, n, size, paced, burst_msgs, pace_s):
    chunk, chunks = ring_for(size)
    burst = burst_for(size, burst_msgs)
    mq = sb.MessageQueue(
        n_reader=n,
        n_local_reader=n,
        local_reader_ranks=list(range(n)),
        max_chunk_bytes=chunk + 4096,
        max_chunks=chunks,
    )
    hb = pickle.dumps(mq.export_handle())
    for c in conns:
        c.send((hb, size, paced, burst))
    mq.wait_until_ready()
    msg = bytearray(size)
    for _ in range(paced):
        msg[:8] = time.time_ns().to_bytes(8, "little")
        mq.enqueue(msg, timeout=STEP_TIMEOUT_S)
        t = time.monotonic()
        while not all_read(mq, n, chunks):
            if time.monotonic() - t > STEP_TIMEOUT_S:
                raise TimeoutError("paced message not read by every reader")
            os.sched_yield()
        gap = time.perf_counter()
        while time.perf_counter() - gap < pace_s:
            os.sched_yield()
    start = time.time_ns()
    for _ in range(burst):
        mq.enqueue(msg, timeout=STEP_TIMEOUT_S)
    results = []
    for c in conns:
        if not c.poll(STEP_TIMEOUT_S * 2):
            raise TimeoutError("a reader did not report")
        results.append(c.recv())
    del mq
    lat = sorted(max(r[0][i] for r in results) for i in range(paced))
    end = max(r[1] for r in results)
    secs = max((end - start) / 1e9, 1e-9)
    return percentile(lat, 0.5), percentile(lat, 0.99), burst, burst / secs


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-src", default=os.environ.get("VLLM_SRC"))
    ap.add_argument("--readers", default="1,3,7")
    ap.add_argument("--sizes", default="64,1024,65536,1048576")
    ap.add_argument("--paced", type=int, default=2000)
    ap.add_argument("--burst", type=int, default=20000)
    ap.add_argument("--pace-us", type=int, default=100)
    a = ap.parse_args()
    if not a.vllm_src:
        sys.exit("mq_vllm_peer: give --vllm-src DIR (or VLLM_SRC): a vLLM source tree")
    readers = [int(x) for x in a.readers.split(",") if x]
    sizes = [max(int(x), 8) for x in a.sizes.split(",") if x]
    sb = load(a.vllm_src)
    import torch
    import zmq

    spin = getattr(sb, "SpinCondition", None)
    busy = spin.__init__.__defaults__ if spin is not None else None
    print(
        f"# vLLM MessageQueue: {os.path.join(a.vllm_src, SHM_BROADCAST)}; python {sys.version.split()[0]}, "
        f"torch {torch.__version__}, pyzmq {zmq.__version__}; readers as processes (spawn); "
        f"SpinCondition defaults {busy}",
        flush=True,
    )
    ctx = mp.get_context("spawn")
    for n in readers:
        pipes = [ctx.Pipe() for _ in range(n)]
        procs = [ctx.Process(target=reader_main, args=(a.vllm_src, r, pipes[r][1]), daemon=True) for r in range(n)]
        for p in procs:
            p.start()
        conns = [p[0] for p in pipes]
        try:
            for size in sizes:
                p50, p99, burst, rate = point(sb, conns, n, size, a.paced, a.burst, a.pace_us / 1e6)
                print(f"ROW {n} {size} {p50} {p99} {burst} {rate}", flush=True)
            for c in conns:
                c.send(None)
            for p in procs:
                p.join(30)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                    p.join()
        if any(p.exitcode not in (0, None) for p in procs):
            sys.exit(f"mq_vllm_peer: a reader failed ({[p.exitcode for p in procs]})")


if __name__ == "__main__":
    main()
