# TermiDator in one image: the pipelines, the notebooks (JupyterLab) and the REST service.
# docker-compose.yml builds it; alone: docker build -t termidator . && docker run --rm \
#   -e TERMIDATOR_DSN=postgresql://user:password@host:5432/db termidator
FROM python:3.11-slim

# CPU-only torch wheels for the emotion model (the default index serves CUDA builds, GBs
# larger). Set to "" to use PyPI alone.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL} \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TERMIDATOR_HOME=/var/lib/termidator

WORKDIR /app

# Dependencies first (setup.py names them), so that code edits do not reinstall them.
COPY setup.py pyproject.toml ./
COPY transforms/__init__.py transforms/
COPY connectors/__init__.py connectors/
COPY pipelines/__init__.py pipelines/
COPY samples/__init__.py samples/
COPY analysis/__init__.py analysis/
COPY training/__init__.py training/
COPY server/__init__.py server/
RUN pip install ".[serve,notebooks,dask]"

# The project itself, editable: `python -m pipelines notebook` serves /app/notebooks.
COPY . .
RUN pip install --no-deps -e ".[serve,notebooks,dask]" \
    && useradd --create-home --uid 1000 termidator \
    && mkdir -p "$TERMIDATOR_HOME" \
    && chown termidator "$TERMIDATOR_HOME"

USER termidator
EXPOSE 8000 8888

# The main job: ingest the bundled samples into $TERMIDATOR_DSN. Other commands:
#   python -m pipelines run reviews --input '/data/*.json.gz'
#   python -m pipelines notebook --ip 0.0.0.0 --port 8888 --no-browser
#   python -m pipelines serve --host 0.0.0.0 --port 8000
CMD ["python", "-m", "pipelines", "run"]
