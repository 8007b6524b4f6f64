"""Minimal bindstream subscriber: pyzmq + msgpack + numpy, no bindstream import (protocol v1).

Run a pipeline, then: python examples/subscriber.py [tcp://127.0.0.1:5555]
Stops at the first session's ``end``. sinks.protocol.decode also validates every field.
"""
import sys

import msgpack
import numpy as np
import zmq

sock = zmq.Context().socket(zmq.SUB)
sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # refuse oversized frames before allocating them
sock.setsockopt(zmq.SUBSCRIBE, b"")  # or b"emb/<session>/" for one session's embeddings
sock.connect(sys.argv[1] if len(sys.argv) > 1 else "tcp://127.0.0.1:5555")
while True:
    topic, payload = sock.recv_multipart()
    msg = msgpack.unpackb(payload, raw=False, max_bin_len=1 << 20, max_str_len=4096,
                          max_array_len=4096, max_map_len=4096, max_ext_len=0)
    if topic.startswith(b"emb/"):
        vec = np.frombuffer(msg["embedding"], dtype="<f4" if msg["dtype"] == "float32" else "<f2")
        print(topic.decode(), msg["seq"], msg["stream"], msg["t_start"], msg["t_end"], vec[:4])
    else:
        print(topic.decode(), msg["event"], {k: v for k, v in msg.items() if k not in ("v", "event")})
        if msg["event"] == "end":
            break
