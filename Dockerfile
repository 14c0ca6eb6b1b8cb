# One image for the Ray head, the Ray workers, the MLflow server and the search driver
# (docker-compose.yml picks the command). Build: docker compose build
#
# Versions: constraints.txt (python scripts/lock.py), the same pins scripts/venv.sh installs, so an
# image built next month joins a head built today (Ray requires one version on every node).
# torch: pip takes torch / torchvision from PyPI, whose Linux x86_64 wheels bundle CUDA (GPU and
# CPU workers, several GB). Where the PyTorch CPU wheel index can be reached, CPU-only workers can
# use a much smaller image:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu docker compose build
#
# The services run as the user lpt (uid/gid 10001). The entrypoint starts as root only to hand the
# secrets compose mounts under /run/secrets to that user (see scripts/container-entrypoint.sh).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=
ARG LPT_UID=10001
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_DISABLE_TELEMETRY=1

# tini: PID 1 (reaps Ray's processes) under the service user. The volumes' mount points belong to
# that user, so the named volumes compose creates on them do too. MLflow reads the login of the
# driver and the workers from ~/.mlflow/credentials: a link to the secret the entrypoint installs.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "$LPT_UID" lpt \
    && useradd --uid "$LPT_UID" --gid "$LPT_UID" --create-home --shell /bin/sh lpt \
    && mkdir -p /app /data /shared /mlartifacts /run/lpt-secrets /home/lpt/.mlflow \
    && ln -s /run/lpt-secrets/mlflow_credentials /home/lpt/.mlflow/credentials \
    && chown lpt:lpt /shared /mlartifacts /run/lpt-secrets /home/lpt/.mlflow \
    && chmod 700 /run/lpt-secrets

WORKDIR /app

# Dependencies first (layers that survive source edits). torch and torchvision are the big layer
# (several GB): it depends only on their two pins below (tests/test_compose.py checks that they
# equal constraints.txt's), so a change of any other dependency does not download them again.
# Then the project's dependencies, its "cluster" extra (the MLflow login app, the PostgreSQL
# driver) and its "dashboard" extra (optuna-dashboard) read from pyproject.toml, all pinned by
# constraints.txt (torch's own pins included).
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} \
    "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"
COPY constraints.txt pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['cluster'] + p['optional-dependencies']['dashboard']))" \
    > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (tune/search.py runs from /app, the workers import the installed package).
COPY . .
RUN pip install --no-deps --no-build-isolation . \
    && install -m 755 scripts/container-entrypoint.sh /usr/local/bin/lpt-entrypoint \
    && pip check \
    && python -c "import lpt_core, tune.trainable, psycopg2, aiohttp_cors, flask_wtf, optuna_dashboard" \
    && ray --version && mlflow --version

ENTRYPOINT ["lpt-entrypoint"]
CMD ["python", "tune/search.py", "--help"]
