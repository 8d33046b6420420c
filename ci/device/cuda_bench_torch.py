#!/usr/bin/env python3
"""Torch's NCCL all-reduce at world size 1, CUDA-event timed, in the table format of
dist-cuda's `cuda_bench` example (same sizes, warm-up and iteration counts), so the two can be
compared in one device run.

gpu_us = event time / iters; host_us = wall time to enqueue one call; algbw = bytes / gpu time;
busbw = algbw * 2(n-1)/n (0 at n = 1).

Usage: python3 ci/device/cuda_bench_torch.py [--max-bytes N]
"""
import argparse
import os
import time

import torch
import torch.distributed as dist


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--max-bytes", type=int, default=512 << 20)
    a = p.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda:0"))
    world = dist.get_world_size()
    print(f"# torch {torch.__version__} NCCL {'.'.join(map(str, torch.cuda.nccl.version()))} all_reduce (in place), world {world}, fp32")
    print(f"{'bytes':>12} {'gpu_us':>10} {'host_us':>10} {'algbw_GBs':>10} {'busbw_GBs':>10}")
    stream = torch.cuda.current_stream()
    b = 8
    while b <= a.max_bytes:
        t = torch.zeros(b // 4, dtype=torch.float32, device="cuda")
        iters = max(20, min(200, 2_000_000_000 // b))
        for _ in range(5):
            dist.all_reduce(t)
        torch.cuda.synchronize()
        e0 = torch.cuda.Event(enable_timing=True)
        e1 = torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        e0.record(stream)
        for _ in range(iters):
            dist.all_reduce(t)
        e1.record(stream)
        host = time.perf_counter() - h0
        e1.synchronize()
        gpu_us = e0.elapsed_time(e1) * 1000.0 / iters
        host_us = host * 1e6 / iters
        algbw = b / (gpu_us * 1e-6) / 1e9
        busbw = algbw * 2.0 * (world - 1) / world
        print(f"{b:>12} {gpu_us:>10.2f} {host_us:>10.2f} {algbw:>10.3f} {busbw:>10.3f}")
        b *= 4
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
