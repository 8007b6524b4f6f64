"""Where embeddings go: the ZeroMQ publisher (protocol v1) and an in-memory sink for tests."""

from sinks.protocol import EmbeddingRecord
from sinks.base import SinkBase
from sinks.memory import ListSink
from sinks.zmq_publisher import PUBLISH_MODES, Publisher

__all__ = ["EmbeddingRecord", "ListSink", "SinkBase", "Publisher", "PUBLISH_MODES"]
