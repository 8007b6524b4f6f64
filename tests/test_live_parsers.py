"""Property tests for the parsers of live network input: whatever a rig or a hostile peer sends,
the zmq sensor decoder and the imagezmq frame decoder either return well-formed samples or refuse
the message (counted as ``bad_message`` by the sources); they never raise anything else."""

from __future__ import annotations

import json
import math

import msgpack
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from sources.clock import SessionClock
from sources.session import session_from_dict
from sources.live import open_live_source
from sources.live.zmq_sensor import DTYPES, decode_sample

_NDIM = {"imu": 1, "depth": 2, "thermal": 2, "vision": 3}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=True),
                    st.text(max_size=8), st.binary(max_size=64))
maps = st.fixed_dictionaries(
    {},
    optional={
        "t": st.one_of(scalars, st.lists(st.one_of(st.floats(allow_nan=True), st.integers(-10, 10)), max_size=4)),
        "shape": st.one_of(scalars, st.lists(st.integers(-2, 6), max_size=5)),
        "dtype": st.one_of(st.sampled_from(DTYPES + ("float16", "object", "<U4")), scalars),
        "data": st.one_of(st.binary(max_size=600), scalars),
    },
)


def _check(modality: str, payload: bytes) -> None:
    try:
        times, arr = decode_sample(payload, modality, max_bytes=4096)
    except ValueError:  # ProtocolError is a ValueError
        return
    assert len(times) == arr.shape[0] >= 0
    assert all(math.isfinite(t) for t in times)
    assert arr.ndim == _NDIM[modality] + 1
    if modality == "imu":
        assert arr.shape[1] == 6


@settings(max_examples=150, deadline=None)
@given(modality=st.sampled_from(sorted(_NDIM)), payload=st.binary(max_size=300))
def test_zmq_sensor_decoder_on_arbitrary_bytes_returns_samples_or_refuses(modality, payload):
    _check(modality, payload)


@settings(max_examples=300, deadline=None)
@given(modality=st.sampled_from(sorted(_NDIM)), doc=maps)
def test_zmq_sensor_decoder_on_hostile_maps_returns_samples_or_refuses(modality, doc):
    _check(modality, msgpack.packb(doc, use_bin_type=True))


@settings(max_examples=200, deadline=None)
@given(
    meta=st.one_of(
        st.binary(max_size=40),
        st.builds(lambda d: json.dumps(d).encode(), st.fixed_dictionaries({}, optional={
            "dtype": st.sampled_from(["uint8", "uint16", "float32", 3]),
            "shape": st.one_of(st.lists(st.integers(-1, 9), max_size=4), st.integers(), st.none()),
        })),
    ),
    image=st.binary(max_size=300),
    extra=st.lists(st.binary(max_size=8), max_size=2),
)
def test_imagezmq_decoder_on_arbitrary_frames_gives_an_rgb_image_or_nothing(tmp_path_factory, meta, image, extra):
    root = tmp_path_factory.getbasetemp()
    spec = session_from_dict({"name": "rig", "streams": [{"id": "cam", "modality": "vision", "kind": "imagezmq",
                                                          "endpoint": "tcp://127.0.0.1:5999"}]}, root).streams[0]
    src = open_live_source(spec, SessionClock())
    out = src._decode([meta, image, *extra])
    if out is not None:
        img = np.asarray(out)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
