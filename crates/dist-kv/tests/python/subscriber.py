"""A vLLM-style subscriber (pyzmq + msgspec) that checks the Rust publisher's batches.

Prints READY once its sockets are connected, then receives --count live batches, checks each one
against `sample_batch` field by field and byte for byte, asks for a replay from --replay-from over a
DEALER socket and checks that too. Exits 0 and prints `OK ...` when everything matched.
"""

import argparse
import sys
import time

import zmq

from kv_events_vllm import END_SEQ, check_batch, types_for


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--replay-endpoint", required=True)
    ap.add_argument("--topic", default="")
    ap.add_argument("--count", type=int, default=5)
    ap.add_argument("--format", choices=["array", "map"], default="array")
    ap.add_argument("--dp-rank", type=int, default=0)
    ap.add_argument("--replay-from", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0)
    a = ap.parse_args()
    T = types_for(a.format)

    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, a.topic.encode())
    sub.connect(a.endpoint)
    replay = ctx.socket(zmq.DEALER)
    replay.setsockopt(zmq.LINGER, 0)
    replay.connect(a.replay_endpoint)
    print("READY", flush=True)

    deadline = time.monotonic() + a.timeout
    for expect in range(a.count):
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if not sub.poll(left_ms):
            raise SystemExit(f"timed out waiting for live batch {expect}")
        topic, seq_b, payload = sub.recv_multipart()
        assert topic == a.topic.encode(), topic
        seq = int.from_bytes(seq_b, "big")
        assert seq == expect, f"seq {seq}, expected {expect}"
        check_batch(T, seq, payload, a.dp_rank)

    replay.send_multipart([b"", a.replay_from.to_bytes(8, "big")])
    got = []
    while True:
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if not replay.poll(left_ms):
            raise SystemExit("timed out waiting for the replay")
        delim, seq_b, payload = replay.recv_multipart()
        assert delim == b""
        if seq_b == END_SEQ:
            assert payload == b""
            break
        seq = int.from_bytes(seq_b, "big")
        check_batch(T, seq, payload, a.dp_rank)
        got.append(seq)
    assert got == list(range(a.replay_from, a.count)), got
    print(f"OK live={a.count} replay={len(got)} format={a.format}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
