#!/usr/bin/env python3
"""Peer figures for `dist-cpu`'s bench_cpu: torch.distributed's gloo all-reduce of f32 on the host.

Usage: python3 ci/device/cpu_bench_torch.py [--world 2,4,8] [--min 4096] [--max 67108864]
Prints nccl-tests columns (size, count, type, redop, time(us), algbw, busbw, #wrong) per world
size; time is the slowest rank's mean over a timed loop after warm-up, busbw = algbw*2(n-1)/n.
"""
import argparse
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank, world, port, lo, hi):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if rank == 0:
        print(f"# torch {torch.__version__} gloo all_reduce, {world} ranks, torch threads {torch.get_num_threads()}")
        print(f"{'size(B)':>12} {'count':>12} {'type':>6} {'redop':>6} {'time(us)':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>7}")
    size = lo
    while size <= hi:
        count = size // 4
        idx = torch.arange(count, dtype=torch.int64)
        x = ((idx * 7 + rank * 13) % 1000).to(torch.float32)
        dist.all_reduce(x)
        want = sum(((idx * 7 + q * 13) % 1000) for q in range(world)).to(torch.float32)
        wrong = int((x != want).sum())
        t = torch.zeros(count, dtype=torch.float32)
        iters = max(3, min(500, (64 << 20) // size))
        for _ in range(max(2, iters // 10)):
            dist.all_reduce(t)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(t)
        mine = (time.perf_counter() - start) / iters
        s = torch.tensor([mine, float(wrong)], dtype=torch.float64)
        dist.all_reduce(s, op=dist.ReduceOp.MAX)
        secs, wrong = s[0].item(), int(s[1].item())
        algbw = size / secs / 1e9
        busbw = algbw * 2 * (world - 1) / world
        if rank == 0:
            print(f"{size:>12} {count:>12} {'float':>6} {'sum':>6} {secs * 1e6:>10.2f} {algbw:>8.3f} {busbw:>8.3f} {wrong:>7}", flush=True)
        size *= 2
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--world", default="2,4,8")
    p.add_argument("--min", type=int, default=4096)
    p.add_argument("--max", type=int, default=64 << 20)
    a = p.parse_args()
    for w in [int(x) for x in a.world.split(",")]:
        mp.spawn(rank_main, args=(w, free_port(), a.min, a.max), nprocs=w, join=True)


if __name__ == "__main__":
    main()
