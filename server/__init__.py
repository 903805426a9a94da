"""TermiDator's REST service (``python -m pipelines serve``) and its streaming client.

``server.app`` builds the FastAPI app: NDJSON ingest into the landing zone, jobs run
as separate ``python -m pipelines run`` processes, health and stats. ``server.client``
sends a dataset file to it in batches (``python -m pipelines stream FILE``).
"""
