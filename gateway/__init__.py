"""layerline's OpenAI-compatible HTTP API: one more client of the broker, on AsyncClient.

python -m gateway --broker tcp://127.0.0.1:5555 --port 8000    (or: layerline serve ...)
"""
