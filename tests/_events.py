"""Reading TensorBoard event files back without TensorFlow or tensorboard: the TFRecord framing (length, masked
CRC-32C of the length, payload, masked CRC-32C of the payload; both CRCs checked) around tensorboardX's
``Event`` protos, and the view TensorBoard gives of them."""

import os
import struct

import numpy as np
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c


def read_events(tb_dir, truncated_tail_ok=False):
    """Every Event of every file in ``tb_dir``, files in name order (TensorBoard's order). With
    ``truncated_tail_ok`` a file may end inside a record (a process killed while writing), as TensorBoard
    allows; the records before it are still checked."""
    events = []
    for name in sorted(os.listdir(tb_dir)):
        with open(os.path.join(tb_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            if truncated_tail_ok and (pos + 12 > len(data)
                                      or pos + 16 + struct.unpack("<Q", data[pos:pos + 8])[0] > len(data)):
                break
            header = data[pos:pos + 8]
            (n,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header), (name, pos)
            body = data[pos + 12:pos + 12 + n]
            assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(body), (name, pos)
            events.append(event_pb2.Event.FromString(body))
            pos += 16 + n
        assert truncated_tail_ok or pos == len(data), name
    return events


def scalars_and_texts(events):
    """``{(tag, step): value}`` as TensorBoard shows it: a session START at step s hides earlier events at steps
    >= s; a later event of the same (tag, step) wins."""
    scalars, texts = {}, {}
    for ev in events:
        if ev.HasField("session_log") and ev.session_log.status == event_pb2.SessionLog.START:
            scalars = {k: v for k, v in scalars.items() if k[1] < ev.step}
        if not ev.HasField("summary"):
            continue
        for v in ev.summary.value:
            if v.HasField("simple_value"):
                scalars[(v.tag, ev.step)] = v.simple_value
            elif v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "text":
                texts[(v.tag, ev.step)] = v.tensor.string_val[0].decode()
    return scalars, texts


def expected_scalars(rows):
    """What metrics.jsonl's rows (last row per (kind, step)) put in TensorBoard, float32 as it is stored."""
    last = {(r["kind"], r["step"]): r for r in rows}
    return {(f"{kind}/{k}", step): float(np.float32(v)) for (kind, step), r in last.items() for k, v in r.items()
            if k not in ("kind", "step") and v is not None}
