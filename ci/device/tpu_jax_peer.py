"""Peer figures for dist-tpu's pjrt_check: JAX driving the same CUDA PJRT plugin, one device,
an all-reduce (psum over a 1-device pmap axis) of f32 [1Mi] and [1], timed per call with
block_until_ready (dist-tpu waits for the completion event the same way).

Not yet run successfully: its first version (device_put_sharded) failed on the GPU machine
with JAX 0.11.2, stderr not kept. This version feeds the program its own output (psum over one
device is the identity), so the input is already on the device in the program's sharding."""
import sys
import time

import jax
import numpy as np

devs = jax.devices()[:1]
f = jax.pmap(lambda x: jax.lax.psum(x, "i"), axis_name="i", devices=devs)
print("jax", jax.__version__, devs[0], flush=True)
for n in (1 << 20, 1):
    t = time.perf_counter()
    x = f(np.random.rand(1, n).astype(np.float32))
    x.block_until_ready()
    first = time.perf_counter() - t
    reps = 1000
    t = time.perf_counter()
    for _ in range(reps):
        x = f(x)
        x.block_until_ready()
    per = (time.perf_counter() - t) / reps
    print(f"jax psum f32 [{n}]: first call {first * 1e3:.1f} ms (transfer + compile + run), "
          f"then {per * 1e6:.1f} us per call", flush=True)
sys.exit(0)
