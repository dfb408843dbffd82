"""The streamed, sharded teacher-logit store (DESIGN.md section 2, "Streaming, not
precomputing" and "Shards"). Producers and the student share only files:

    <store>/manifest.json                  what the logits were computed from (manifest.py)
    <store>/progress.json                  the student's position and last checkpoint (progress.py)
    <store>/<teacher>/shard_NNNNNN.safetensors   one teacher's logits for one shard (shards.py)
    <store>/<teacher>/heartbeat.json       the producer's last sign of life (progress.py)

order.py fixes shard contents and each epoch's shard order; writer.py (Producer) writes shards a
bounded look-ahead ahead of the student; reader.py is the student's side.
"""
from dist_xqa.logits.manifest import Manifest, StoreMismatchError, hash_checkpoint, hash_features, prepare_store, read_manifest
from dist_xqa.logits.order import ShardPlan, rank_rows
from dist_xqa.logits.writer import Producer
from dist_xqa.logits.progress import StoreTimeout
from dist_xqa.logits.reader import ShardLogits, StoreReader, StreamStats
from dist_xqa.logits.shards import ShardData, ShardError, read_shard, shard_path, write_shard

__all__ = [
    "Manifest",
    "Producer",
    "ShardData",
    "ShardError",
    "ShardLogits",
    "ShardPlan",
    "StoreMismatchError",
    "StoreReader",
    "StoreTimeout",
    "StreamStats",
    "hash_checkpoint",
    "hash_features",
    "prepare_store",
    "rank_rows",
    "read_manifest",
    "read_shard",
    "shard_path",
    "write_shard",
]
