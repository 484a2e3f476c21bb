"""layerline's benchmark harness: `python -m bench` (see docs/performance.md).

It starts real broker and stage processes on loopback, drives them with the client library,
and measures, in the same run, the baselines that the figures are judged against:
transformers' monolithic `generate` and a raw pyzmq round trip.
"""
