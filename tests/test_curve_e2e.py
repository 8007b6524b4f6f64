"""The output side through the whole graph: CurveZMQ from the run config, and a stalled subscriber
in replay mode (NODROP: the replay slows down, nothing is lost).

Real Ray actors, real sockets on 127.0.0.1, CurveZMQ keys written by ``sinks.keys``.
"""

from __future__ import annotations

import collections
import threading
import time

import pytest
import zmq

from pipeline.config import parse_config
from sources.demo import write_demo_session
from sources.errors import ConfigError
from sinks.keys import CurveClientConfig, generate_keys
from sinks.protocol import decode
from test_pipeline_e2e import _config, _expected_windows

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.skipif(not zmq.has("curve"), reason="this libzmq lacks CURVE"),
              pytest.mark.usefixtures("ray_cluster")]  # one Ray per module: tests/conftest.py


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory):
    return write_demo_session(tmp_path_factory.mktemp("out") / "s", seconds=3.0, seed=5, name="out-s")


class _Collector:
    """A SUB socket (optionally a CurveZMQ client) collecting messages in a thread until
    ``stop`` is set, or until it saw the session's ``end``."""

    def __init__(self, endpoint: str, curve: CurveClientConfig | None = None, delay_s: float = 0.0,
                 rcvhwm: int | None = None) -> None:
        self.messages = []
        self.stop = threading.Event()
        self.ended = threading.Event()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(endpoint, curve, delay_s, rcvhwm), daemon=True)
        self.thread.start()
        self._ready.wait(10)

    def _run(self, endpoint, curve, delay_s, rcvhwm) -> None:
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.linger = 0
        if rcvhwm is not None:
            sock.rcvhwm = rcvhwm
            sock.setsockopt(zmq.RCVBUF, 4096)
        if curve is not None:
            curve.apply(sock)
        sock.subscribe(b"")
        sock.connect(endpoint)
        self._ready.set()
        try:
            while not self.stop.is_set():
                if not sock.poll(50):
                    continue
                msg = decode(sock.recv_multipart())
                self.messages.append(msg)
                if msg.topic.startswith("ctl/") and msg.payload["event"] == "end":
                    self.ended.set()
                    return
                if delay_s:
                    time.sleep(delay_s)
        finally:
            sock.close(linger=0)


def _embedding_keys(messages):
    return [(m.payload["session"], m.payload["modality"], m.payload["window"])
            for m in messages if m.topic.startswith("emb/")]


def test_curve_publisher_from_the_run_config_lets_only_the_allowed_subscriber_read(session_dir, tmp_path):
    from pipeline.run import run

    keys = tmp_path / "keys"
    generate_keys(keys, ["allowed"])
    stranger = generate_keys(tmp_path / "other", ["stranger"])  # a valid key pair nobody authorised
    allowed = CurveClientConfig.from_files(keys / "server.key", keys / "allowed.key_secret")
    unknown = CurveClientConfig.from_files(keys / "server.key", stranger["stranger"])
    cfg = _config([session_dir], publish={"curve": {"server_secret_key": str(keys / "server.key_secret"),
                                                    "authorized_clients": str(keys / "authorized_clients")}})
    subs = {}

    def on_ready(endpoint):
        subs["plain"] = _Collector(endpoint)
        subs["unknown"] = _Collector(endpoint, unknown)
        subs["allowed"] = _Collector(endpoint, allowed)

    result = run(cfg, on_ready=on_ready)
    assert subs["allowed"].ended.wait(60), "the allowed subscriber never saw the end"
    time.sleep(0.3)
    for s in subs.values():
        s.stop.set()
        s.thread.join(10)
    assert result.exit_code == 0
    spec, windows = _expected_windows(session_dir, cfg)
    expected = {(spec.name, it.modality, it.window) for w in windows for it in w.items}
    assert sorted(_embedding_keys(subs["allowed"].messages)) == sorted(expected)
    assert subs["unknown"].messages == [], "a subscriber with an unknown key received data"
    assert subs["plain"].messages == [], "a plain (unencrypted) subscriber received data"


def test_curve_config_errors_name_the_key_before_anything_starts(session_dir, tmp_path):
    from pipeline.run import run

    with pytest.raises(ConfigError, match="publish.curve.authorized_clients"):
        parse_config({"sessions": ["x"], "publish": {"curve": {"server_secret_key": "k"}}})
    with pytest.raises(ConfigError, match="unknown config key 'publish.curve.secret'"):
        parse_config({"sessions": ["x"], "publish": {"curve": {"secret": "k"}}})
    cfg = _config([session_dir], publish={"curve": {"server_secret_key": str(tmp_path / "none.key_secret"),
                                                    "authorized_clients": str(tmp_path)}})
    with pytest.raises(ConfigError, match="publish.curve.*none.key_secret"):
        run(cfg)
    assert not ray.util.list_named_actors(), "an actor was started before the config error"


def test_stalled_subscriber_slows_the_replay_and_loses_nothing(session_dir):
    from pipeline.run import run

    # A one-message send queue and a subscriber that reads one message every 20 ms: the
    # publisher blocks (replay is NODROP) instead of dropping.
    cfg = _config([session_dir], publish={"hwm": 1})
    subs = {}

    def on_ready(endpoint):
        subs["slow"] = _Collector(endpoint, delay_s=0.02, rcvhwm=1)

    result = run(cfg, on_ready=on_ready)
    slow = subs["slow"]
    assert slow.ended.wait(60)
    slow.thread.join(10)
    spec, windows = _expected_windows(session_dir, cfg)
    expected = {(spec.name, it.modality, it.window) for w in windows for it in w.items}
    got = _embedding_keys(slow.messages)
    assert sorted(got) == sorted(expected), "a stalled subscriber lost windows in replay mode"
    seqs = collections.defaultdict(list)
    for m in slow.messages:
        if m.topic.startswith("emb/"):
            seqs[m.topic].append(m.payload["seq"])
    assert all(s == list(range(len(s))) for s in seqs.values()), "seq gaps in replay mode"
    (summary,) = result.sessions
    assert result.exit_code == 0 and not any("hwm" in k for k in summary["dropped"])
