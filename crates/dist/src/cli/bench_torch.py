"""The torch.distributed peer of `dist bench --peer torch`: the same collectives on the same sizes,
ranks and element type, through torch's gloo (host tensors) or NCCL (one GPU per rank), each
result checked against a recomputation from every rank's input. One JSON object per line on
stdout (rank 0); ops torch's backend lacks are reported with "unsupported".

Run by `dist bench`; by hand:
    python3 bench_torch.py --backend gloo --world 4 --sizes 4096,1048576 --ops all_reduce --dtype float32
"""
import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bus_factor(op, n):
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("broadcast", "sendrecv"):
        return 1.0
    return (n - 1) / n


def data(rank, count, dtype, seed, dev):
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    if dtype.is_floating_point:
        x = torch.randn(count, generator=g, dtype=torch.float32).to(dtype)
    else:
        x = torch.randint(-50, 50, (count,), generator=g).to(dtype)
    return x.to(dev)


def one_op(op, rank, n, size, dtype, dev, iters, warmup):
    es = torch.tensor([], dtype=dtype).element_size()
    count = max(n, size // es // n * n)
    per = count // n
    seed = (sum(ord(c) for c in op) * 7919 + size) % 1000003
    xs = None  # every rank's input, for the check
    if op == "all_reduce":
        x = data(rank, count, dtype, seed, dev)
        want = sum(data(q, count, dtype, seed, dev).to(torch.float64) for q in range(n))
        out = x.clone()

        def call():
            out.copy_(x)
            dist.all_reduce(out)

        def result():
            return out
    elif op == "all_gather":
        x = data(rank, per, dtype, seed, dev)
        want = torch.cat([data(q, per, dtype, seed, dev) for q in range(n)])
        out = torch.empty(count, dtype=dtype, device=dev)

        def call():
            dist.all_gather_into_tensor(out, x)

        def result():
            return out
    elif op == "reduce_scatter":
        x = data(rank, count, dtype, seed, dev)
        full = sum(data(q, count, dtype, seed, dev).to(torch.float64) for q in range(n))
        want = full[rank * per:(rank + 1) * per]
        out = torch.empty(per, dtype=dtype, device=dev)

        def call():
            dist.reduce_scatter_tensor(out, x)

        def result():
            return out
    elif op == "broadcast":
        x = data(rank, count, dtype, seed, dev)
        want = data(0, count, dtype, seed, dev)
        out = x.clone()

        def call():
            dist.broadcast(out, 0)

        def result():
            return out
    elif op == "gather":
        x = data(rank, per, dtype, seed, dev)
        want = [data(q, per, dtype, seed, dev) for q in range(n)] if rank == 0 else None
        outs = [torch.empty(per, dtype=dtype, device=dev) for _ in range(n)] if rank == 0 else None

        def call():
            dist.gather(x, outs, dst=0)

        def result():
            return torch.cat(outs) if rank == 0 else None
        want = torch.cat(want) if rank == 0 else None
    elif op == "sendrecv":
        x = data(rank, count, dtype, seed, dev)
        want = data((rank + n - 1) % n, count, dtype, seed, dev)
        out = torch.empty(count, dtype=dtype, device=dev)

        def call():
            ops = [dist.P2POp(dist.isend, x, (rank + 1) % n), dist.P2POp(dist.irecv, out, (rank + n - 1) % n)]
            for r in dist.batch_isend_irecv(ops):
                r.wait()

        def result():
            return out
    elif op == "all_to_all_v":
        x = data(rank, count, dtype, seed, dev)
        out = torch.empty(count, dtype=dtype, device=dev)
        want = torch.cat([data(q, count, dtype, seed, dev)[rank * per:(rank + 1) * per] for q in range(n)])

        def call():
            dist.all_to_all_single(out, x, [per] * n, [per] * n)

        def result():
            return out
    else:
        return {"op": op, "bytes": size, "unsupported": f"no such op in the peer: {op}"}
    try:
        call()
    except Exception as e:  # the backend lacks the op
        return {"op": op, "bytes": count * es, "unsupported": str(e).splitlines()[0][:160]}
    got = result()
    wrong = 0
    if got is not None:
        if want.dtype == torch.float64 and dtype.is_floating_point:
            tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
            d = (got.to(torch.float64) - want).abs()
            wrong = int(((d > tol * (1 + want.abs())) | d.isnan()).sum())
        else:
            wrong = int((got.to(want.dtype) != want).sum())
    # As many timed calls as fit in about half a second (from the check call's time), 3 to `iters`.
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    call()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    one = torch.tensor([time.perf_counter() - t1], dtype=torch.float64, device=dev)
    dist.all_reduce(one, op=dist.ReduceOp.MAX)
    iters = int(max(3, min(iters, 0.5 / max(one.item(), 1e-7))))
    for _ in range(warmup):
        call()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        call()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    mine = (time.perf_counter() - t0) / iters
    s = torch.tensor([mine, float(wrong)], dtype=torch.float64, device=dev)
    dist.all_reduce(s, op=dist.ReduceOp.MAX)
    secs, wrong = s[0].item(), int(s[1].item())
    nbytes = count * es
    algbw = nbytes / secs / 1e9
    return {"op": op, "bytes": nbytes, "count": count, "time_us": secs * 1e6, "algbw": algbw,
            "busbw": algbw * bus_factor(op, n), "wrong": wrong}


def rank_main(rank, a, port):
    # gloo reduces on one thread; torch's intra-op pool would only oversubscribe the cores.
    torch.set_num_threads(1)
    backend = a.backend
    dev = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=a.world)
    dtype = getattr(torch, a.dtype)
    for op in a.ops.split(","):
        for size in [int(s) for s in a.sizes.split(",")]:
            iters = a.iters or max(5, min(1000, (256 << 20) // max(size, 1)))
            row = one_op(op, rank, a.world, size, dtype, dev, iters, 2)
            if rank == 0:
                row["peer"] = f"torch {torch.__version__} {backend}"
                print(json.dumps(row), flush=True)
            if "unsupported" in row:
                break
        dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--backend", default="gloo")
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--sizes", required=True)
    p.add_argument("--ops", required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--iters", type=int, default=0)
    a = p.parse_args()
    mp.spawn(rank_main, args=(a, free_port()), nprocs=a.world, join=True)


if __name__ == "__main__":
    sys.exit(main())
