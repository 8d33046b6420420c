"""msgspec Struct classes mirroring vLLM's ``vllm/distributed/kv_events.py``, and the sample batches.

Two sets of classes: ``ARRAY`` has vLLM's ``array_like=True`` events (the form
vLLM used until 2026); ``MAP`` drops ``array_like`` from the events as vLLM PR #42892 did (the batch
stays an array). Field names, order and defaults are vLLM's.

``sample_batch`` must build exactly what ``dist_kv::events::sample_batch`` builds in Rust
(``crates/dist-kv/src/events/sample.rs``); change both together.
"""

from types import SimpleNamespace
from typing import Any

import msgspec


def _make(array_like: bool) -> SimpleNamespace:
    # No `from __future__ import annotations`: the annotations below are evaluated here, so the
    # local classes resolve.
    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class KVCacheEvent(
        msgspec.Struct, array_like=array_like, omit_defaults=True, gc=False, tag=True
    ):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[bytes | int]
        parent_block_hash: bytes | int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None
        extra_keys: list[tuple[Any, ...] | None] | None = None
        group_idx: int | None = None
        kv_cache_spec_kind: str | None = None
        kv_cache_spec_sliding_window: int | None = None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[bytes | int]
        medium: str | None
        group_idx: int | None = None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]

    return SimpleNamespace(
        BlockStored=BlockStored,
        BlockRemoved=BlockRemoved,
        AllBlocksCleared=AllBlocksCleared,
        KVEventBatch=KVEventBatch,
        decoder=msgspec.msgpack.Decoder(KVEventBatch),
        encoder=msgspec.msgpack.Encoder(),
    )


ARRAY = _make(True)
MAP = _make(False)
END_SEQ = (-1).to_bytes(8, "big", signed=True)


def types_for(fmt: str) -> SimpleNamespace:
    return {"array": ARRAY, "map": MAP}[fmt]


def sample_batch(T: SimpleNamespace, i: int, dp_rank: int | None):
    odd = i % 2 == 1

    def bytes32(salt: int) -> bytes:
        return bytes((i + j + salt) % 256 for j in range(32))

    full = T.BlockStored(
        block_hashes=[i * 1000 + 1, (2**64 - 1) - i, bytes32(0)],
        parent_block_hash=(-i - 1) if odd else None,
        token_ids=[i * 100 + t for t in range(12)],
        block_size=4,
        lora_id=7 if odd else None,
        medium="GPU",
        lora_name="adapter-a" if odd else None,
        extra_keys=[
            None,
            (f"mm-hash-{i}", 0),
            ("adapter-a", b"\x01\x02\x03", 0.5, [1, None], True),
        ],
        group_idx=i % 3,
        kv_cache_spec_kind="sliding_window" if odd else "full_attention",
        kv_cache_spec_sliding_window=128 if odd else None,
    )
    minimal = T.BlockStored(
        block_hashes=[bytes32(100)],
        parent_block_hash=bytes32(200),
        token_ids=[1, 2, 3, 4],
        block_size=4,
        lora_id=None,
        medium=None,
        lora_name=None,
    )
    group_only = T.BlockStored(
        block_hashes=[bytes32(100)],
        parent_block_hash=bytes32(200),
        token_ids=[1, 2, 3, 4],
        block_size=4,
        lora_id=None,
        medium="CPU",
        lora_name=None,
        group_idx=2,
    )
    events = [
        full,
        minimal,
        group_only,
        T.BlockRemoved(block_hashes=[i * 1000 + 1], medium="GPU", group_idx=i % 3),
        T.BlockRemoved(block_hashes=[bytes32(100)], medium="CPU"),
        T.AllBlocksCleared(),
    ]
    return T.KVEventBatch(
        ts=1_700_000_000.0 + i * 0.25, events=events, data_parallel_rank=dp_rank
    )


def check_batch(T: SimpleNamespace, seq: int, payload: bytes, dp_rank: int | None) -> None:
    """Decodes `payload` with vLLM's classes and checks every field and every byte."""
    got = T.decoder.decode(payload)
    want = sample_batch(T, seq, dp_rank)
    if got != want:
        raise AssertionError(f"seq {seq}: decoded batch differs\n got: {got!r}\nwant: {want!r}")
    for a, b in zip(got.events, want.events):
        for f in a.__struct_fields__:
            if getattr(a, f) != getattr(b, f):
                raise AssertionError(f"seq {seq}: field {f}: {getattr(a, f)!r} != {getattr(b, f)!r}")
    encoded = T.encoder.encode(want)
    if encoded != payload:
        raise AssertionError(
            f"seq {seq}: bytes differ from msgspec's\n ours: {payload.hex()}\n msgspec: {encoded.hex()}"
        )
