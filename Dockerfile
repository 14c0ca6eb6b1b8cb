# One image for the Ray head, the Ray workers, the MLflow server and the search driver
# (docker-compose.yml picks the command). Build: docker compose build
#
# torch: by default pip takes torch==2.14.1 / torchvision==0.29.1 from PyPI, whose Linux wheels
# bundle CUDA (runs on GPU and CPU workers, several GB). For CPU-only workers the CPU wheel index
# gives a much smaller image:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu docker compose build
FROM python:3.11-slim

ARG TORCH_INDEX_URL=
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_DISABLE_TELEMETRY=1

WORKDIR /app

# Dependencies first (a layer that survives source edits): the pinned torch pair, then the
# project's dependencies read from pyproject.toml, plus ray[default] (the dashboard's HTTP server
# and job API: without it port 8265 serves nothing) and psycopg2-binary (the MLflow server's
# PostgreSQL driver).
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.14.1 torchvision==0.29.1
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "ray[default]" psycopg2-binary \
    && rm /tmp/requirements.txt

# The project itself (tune/search.py runs from /app, the workers import the installed package).
COPY . .
RUN pip install --no-deps . \
    && mkdir -p /shared /data /mlartifacts \
    && python -c "import lpt_core, tune.trainable, psycopg2, aiohttp_cors" \
    && ray --version && mlflow --version

CMD ["python", "tune/search.py", "--help"]
