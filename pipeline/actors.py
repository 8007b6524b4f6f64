"""The Ray actors of the graph, one module each: a session actor per session
(:mod:`pipeline.session_actor`, whose process also reads the session's streams), the encoder
replicas (:mod:`pipeline.encoder_actor`) and the publisher (:mod:`pipeline.publisher_actor`).
The driver (:mod:`pipeline.run`) starts them; the rules they follow are plain classes
(:mod:`pipeline.ordering`, :mod:`pipeline.admission`, :mod:`pipeline.dispatch`,
:mod:`pipeline.stats`, :mod:`pipeline.align`, :mod:`pipeline.batching`).
"""

from pipeline.encoder_actor import EncoderActor
from pipeline.publisher_actor import PublisherActor, PublisherRestartedError
from pipeline.session_actor import AlignerActor

__all__ = ["AlignerActor", "EncoderActor", "PublisherActor", "PublisherRestartedError"]
