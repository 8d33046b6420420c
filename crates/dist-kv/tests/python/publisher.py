"""A vLLM-style publisher (pyzmq + msgspec) whose batches the Rust subscriber decodes.

Binds PUB and ROUTER on loopback ports libzmq picks, prints `ENDPOINT <pub> <replay>`, waits for a
`GO` line on stdin and for a subscription, publishes --count sample batches as `[topic, seq, payload]` (what vLLM's
ZmqEventPublisher sends), then answers replay requests the way vLLM's `_service_replay` does until
a `DONE` line arrives on stdin (or --timeout passes).
"""

import argparse
import select
import sys
import time

import zmq

from kv_events_vllm import END_SEQ, sample_batch, types_for


def wait_line(want: str, timeout: float) -> None:
    r, _, _ = select.select([sys.stdin], [], [], timeout)
    if not r:
        raise SystemExit(f"no {want} on stdin within {timeout} s")
    line = sys.stdin.readline().strip()
    if line != want:
        raise SystemExit(f"expected {want}, got {line!r}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--topic", default="")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--format", choices=["array", "map"], default="array")
    ap.add_argument("--dp-rank", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=20.0)
    a = ap.parse_args()
    T = types_for(a.format)

    ctx = zmq.Context.instance()
    # An XPUB is a PUB to its subscribers; it also lets this script see the subscription arrive,
    # so the first batch is not dropped on a loaded machine (vLLM's tests sleep instead).
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.XPUB_VERBOSE, 1)
    pub.setsockopt(zmq.LINGER, 1000)
    pub.bind("tcp://127.0.0.1:*")
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 1000)
    router.bind("tcp://127.0.0.1:*")
    print(
        "ENDPOINT",
        pub.getsockopt(zmq.LAST_ENDPOINT).decode(),
        router.getsockopt(zmq.LAST_ENDPOINT).decode(),
        flush=True,
    )
    wait_line("GO", a.timeout)
    if not pub.poll(int(a.timeout * 1000)):
        raise SystemExit("no subscription arrived")
    sub_msg = pub.recv()
    assert sub_msg[:1] == b"\x01", sub_msg

    buffer = []
    for seq in range(a.count):
        payload = T.encoder.encode(sample_batch(T, seq, a.dp_rank))
        pub.send_multipart((a.topic.encode(), seq.to_bytes(8, "big"), payload))
        buffer.append((seq, payload))

    deadline = time.monotonic() + a.timeout
    poller = zmq.Poller()
    poller.register(router, zmq.POLLIN)
    while time.monotonic() < deadline:
        r, _, _ = select.select([sys.stdin], [], [], 0)
        if r:
            line = sys.stdin.readline().strip()
            if line == "DONE":
                return 0
        if not dict(poller.poll(50)):
            continue
        frame = router.recv_multipart()
        if len(frame) != 3:
            continue
        client_id, _, start_seq_bytes = frame
        start_seq = int.from_bytes(start_seq_bytes, "big")
        for seq, buf in buffer:
            if seq >= start_seq:
                router.send_multipart((client_id, b"", seq.to_bytes(8, "big"), buf))
        router.send_multipart((client_id, b"", END_SEQ, b""))
    raise SystemExit("no DONE within the timeout")


if __name__ == "__main__":
    sys.exit(main())
