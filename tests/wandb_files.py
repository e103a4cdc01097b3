"""Read a W&B offline run file (run-<id>.wandb) to check what was logged, not just that a folder exists.

The file is W&B's record log: a 7-byte header (":W&B", magic 0xBEE1, a version byte), then LevelDB-log framing
(32 KiB blocks; each record chunk has a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST) around
protobuf `Record` messages. wandb 0.31 moved its own reader to the Go core, so the test reads the framing itself.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = data[:4], struct.unpack("<H", data[4:6])[0], data[6]
    assert ident == b":W&B" and magic == 0xBEE1 and version in (0, 1), f"not a W&B run file: {data[:7]!r}"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7: pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        if kind == FULL:
            pending = chunk
        elif kind == FIRST:
            pending = chunk
            continue
        elif kind == MIDDLE:
            pending += chunk
            continue
        elif kind == LAST:
            pending += chunk
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def summary(path) -> dict:
    """Last value of every summary key, and the history rows, and the run's identity."""
    info = {"history": [], "summary": {}, "config": {}, "run": None}
    for rec in records(path):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            info["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                    for i in rec.history.item})
        elif kind == "summary":
            for i in rec.summary.update:
                info["summary"][i.key or "/".join(i.nested_key)] = json.loads(i.value_json)
        elif kind == "config":
            for i in rec.config.update:
                info["config"][i.key] = json.loads(i.value_json)
        elif kind == "run":
            for i in rec.run.config.update:
                info["config"][i.key] = json.loads(i.value_json)
            info["run"] = {"id": rec.run.run_id, "group": rec.run.run_group, "name": rec.run.display_name,
                           "project": rec.run.project}
    return info
