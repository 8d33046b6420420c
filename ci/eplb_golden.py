#!/usr/bin/env python3
"""Regenerates crates/dist-core/tests/fixtures/eplb_golden.json from vLLM's own EPLB policy.

    python ci/eplb_golden.py VLLM_CHECKOUT [--out FILE] [--seed N]

VLLM_CHECKOUT is a vLLM source tree (a git checkout, or an unpacked wheel: anything holding
vllm/distributed/eplb/policy/default.py). Only the policy module and its abstract base are
loaded (with numpy and torch), not the vllm package, so no GPU, build or other dependency is
needed.

Each case is a load [layers][logical experts], the sizes (replicas R, groups G, nodes N, ranks
K) and optionally a previous map; its expected output is
DefaultEplbPolicy.rebalance_experts(load, R, G, N, K, old).

Ties: vLLM sorts with np.argsort(-weight), numpy's default unstable sort, whose order among
equal weights depends on the CPU (numpy's AVX-512/AVX2 sorting networks, its scalar introsort
elsewhere). The expected plan is therefore computed with that one call made stable (lower index
first among equals), which is the rule dist follows; every case also records `native_agrees`,
whether unmodified vLLM gave the same plan on the machine that ran this script. For cases
without ties that matter the two are the same, and the script checks that most cases are such.
"""

import argparse
import importlib.util
import json
import platform
import random
import sys
import types
from pathlib import Path

import numpy as np
import torch


def load_policy(checkout: Path):
    base = checkout / "vllm" / "distributed" / "eplb" / "policy"
    if not (base / "default.py").exists():
        sys.exit(f"{base / 'default.py'} not found: pass a vLLM source tree")
    pkg = types.ModuleType("eplb_policy_under_test")
    pkg.__path__ = [str(base)]
    sys.modules[pkg.__name__] = pkg
    mods = {}
    for name in ("abstract", "default"):
        spec = importlib.util.spec_from_file_location(
            f"{pkg.__name__}.{name}", base / f"{name}.py"
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods["default"]


class StableArgsort:
    """numpy, except that argsort's default kind is 'stable'."""

    def __getattr__(self, name):
        return getattr(np, name)

    @staticmethod
    def argsort(a, axis=-1, kind=None, order=None, **kw):
        return np.argsort(a, axis=axis, kind=kind or "stable", order=order, **kw)


def run(mod, stable, load, r, g, n, k, old):
    saved = mod.np
    mod.np = StableArgsort() if stable else np
    try:
        w = torch.tensor(load, dtype=torch.int64)
        o = None if old is None else torch.tensor(old, dtype=torch.int64)
        out = mod.DefaultEplbPolicy.rebalance_experts(w, r, g, n, k, o)
        return out.tolist()
    finally:
        mod.np = saved


def initial_map(e, r):
    # vLLM's EplbState.build_initial_global_physical_to_logical_map
    return list(range(e)) + [i % e for i in range(r - e)]


def loads(rng, layers, experts, kind, groups=1):
    if kind == "permuted":
        # Every group holds the same large values in another order: equal exact sums, so the
        # order of groups comes from how numpy rounds its float32 (pairwise) sums.
        gs = experts // groups
        out = []
        for _ in range(layers):
            vals = [rng.randrange(1 << 24, 1 << 30) for _ in range(gs)]
            row = []
            for _ in range(groups):
                rng.shuffle(vals)
                row += vals
            out.append(row)
        return out
    if kind == "small":  # many ties
        return [[rng.randrange(0, 4) for _ in range(experts)] for _ in range(layers)]
    if kind == "zeros":
        return [[0] * experts for _ in range(layers)]
    if kind == "equal":
        v = rng.randrange(1, 1000)
        return [[v] * experts for _ in range(layers)]
    if kind == "large":  # past 2^24: f32 rounding and numpy's summation order matter
        return [[rng.randrange(1 << 24, 1 << 34) for _ in range(experts)] for _ in range(layers)]
    if kind == "skewed":
        return [
            [int(rng.paretovariate(1.2) * 100) for _ in range(experts)] for _ in range(layers)
        ]
    return [[rng.randrange(0, 1_000_000) for _ in range(experts)] for _ in range(layers)]


def shapes(rng):
    """(E, R, G, N, K) tuples: hierarchical ones and ones where G % N != 0 (global policy)."""
    out = []
    for k in (1, 2, 4, 8, 16):
        for n in (1, 2, 4):
            if k % n:
                continue
            for gpn in (1, 2, 4):
                g = n * gpn
                for gs in (1, 2, 4, 8, 16, 24):
                    e = g * gs
                    for extra in (0, 1, 2, 4):
                        ppr = -(-e // k) + extra
                        out.append((e, k * ppr, g, n, k))
    rng.shuffle(out)
    # G % N != 0: vLLM drops the hierarchy; N need not divide K then. One case in eight.
    flat = [(12, 12, 3, 2, 4), (16, 24, 4, 3, 4), (10, 15, 5, 2, 5), (8, 9, 1, 2, 3), (32, 40, 8, 3, 8)]
    for j in range(0, len(out), 8):
        out.insert(j, flat[(j // 8) % len(flat)])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("vllm", type=Path)
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent
        / "crates/dist-core/tests/fixtures/eplb_golden.json",
    )
    ap.add_argument("--seed", type=int, default=20261204)
    ap.add_argument("--cases", type=int, default=500)
    a = ap.parse_args()
    mod = load_policy(a.vllm)
    rng = random.Random(a.seed)

    cases = []
    # DeepSeek's README example.
    ex = [
        [90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27],
    ]
    todo = [("deepseek_readme", ex, 16, 4, 2, 8, None)]
    kinds = ["random", "random", "random", "skewed", "large", "small", "zeros", "equal"]
    all_shapes = shapes(rng)
    i = 0
    while len(todo) < a.cases:
        e, r, g, n, k = all_shapes[i % len(all_shapes)]
        i += 1
        layers = rng.randrange(1, 4)
        kind = kinds[i % len(kinds)]
        if g > n and e // g >= 8 and rng.random() < 0.5:
            kind = "permuted"
        load = loads(rng, layers, e, kind, g)
        old_kind = rng.choice(["none", "none", "initial", "previous", "shuffled"])
        old = None
        if old_kind == "initial":
            old = [initial_map(e, r) for _ in range(layers)]
        elif old_kind in ("previous", "shuffled"):
            prev = run(mod, True, loads(rng, layers, e, "random"), r, g, n, k, None)
            if old_kind == "shuffled":
                for row in prev:
                    rng.shuffle(row)
            old = prev
        todo.append((f"{kind}_{old_kind}_{i}", load, r, g, n, k, old))

    agree = 0
    for name, load, r, g, n, k, old in todo:
        want = run(mod, True, load, r, g, n, k, old)
        native = run(mod, False, load, r, g, n, k, old)
        agree += native == want
        c = {
            "name": name,
            "load": load,
            "replicas": r,
            "groups": g,
            "nodes": n,
            "ranks": k,
            "phy2log": want,
            "native_agrees": native == want,
        }
        if old is not None:
            c["old"] = old
        cases.append(c)

    doc = {
        "about": "inputs and outputs of vLLM's DefaultEplbPolicy.rebalance_experts; "
        "regenerate with ci/eplb_golden.py VLLM_CHECKOUT",
        "numpy": np.__version__,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cases": cases,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    print(
        f"{len(cases)} cases written to {a.out}; unmodified vLLM agreed on {agree} "
        f"(the rest have ties whose order is the CPU's sort network)"
    )
    if agree < len(cases) // 2:
        sys.exit("too few cases without ties: the generator no longer tests vLLM as it is")


if __name__ == "__main__":
    main()
