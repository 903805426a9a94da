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
    packages=["pipelines", "transforms", "connectors"],
    package_data={
        "connectors": ["sql/*.sql"],
        "pipelines": ["samples/*"],
    },
    install_requires=[
        "apache-beam==2.77.0",
        "beam-postgres==0.5.0",
        "psycopg[binary]>=3.2,<4",
        "pgserver>=0.1.4",
        "orjson>=3.10",
        "pandas>=2.2",
    ],
    extras_require={
        "test": ["pytest>=8", "black>=24"],
    },
    entry_points={"console_scripts": ["termidator=pipelines.__main__:main"]},
)
