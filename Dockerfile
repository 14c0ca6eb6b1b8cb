# One image for the Ray head, the Ray workers, the MLflow server, the set-up steps, optuna-dashboard
# and the search driver (docker-compose.yml picks the command). Build: docker compose build
#
# Versions: the base image is PYTHON_IMAGE, pinned by digest in docker-compose.yml (x-base-images,
# the one place of the digests; compose passes it, `docker build` needs --build-arg PYTHON_IMAGE=...),
# and every package comes from constraints.txt (python scripts/lock.py), the pins scripts/venv.sh
# installs: an image built next month holds the Python patch version and the Ray of one built today,
# so it joins today's head (Ray refuses a node of another version).
# torch: pip takes torch / torchvision from PyPI, whose Linux x86_64 wheels bundle CUDA (GPU and
# CPU workers, several GB). Where the PyTorch CPU wheel index can be reached, CPU-only workers can
# use a much smaller image:
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu docker compose build
#
# The services run as the user lpt (uid/gid 10001). The entrypoint starts as root only to hand the
# secrets compose mounts under /run/secrets to that user (see scripts/container-entrypoint.sh).
ARG PYTHON_IMAGE

# The pins of torch, torchvision and what they install, cut from constraints.txt: the torch layer
# (several GB) is built again only when one of these lines changes, not with every other pin. A
# package torch starts to need that this list misses is installed unpinned here, then set to its
# pin by the install of constraints.txt below (tests/test_compose.py checks the list against the
# venv's torch).
FROM ${PYTHON_IMAGE} AS torch-pins
COPY constraints.txt /tmp/constraints.txt
RUN grep -E '^(torch|torchvision|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|typing-extensions|setuptools|numpy|pillow)==' \
    /tmp/constraints.txt > /tmp/torch-constraints.txt

FROM ${PYTHON_IMAGE}

ARG TORCH_INDEX_URL=
ARG LPT_UID=10001
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false

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
# (several GB), installed with their pins (torch-pins above). Then the project's dependencies, its
# "cluster" extra (the MLflow login app, the PostgreSQL driver) and its "dashboard" extra
# (optuna-dashboard) read from pyproject.toml, all pinned by constraints.txt. TorchCodec (image
# decoding) needs no system library: its wheel bundles libjpeg-turbo, libpng, libwebp and nvJPEG.
COPY --from=torch-pins /tmp/torch-constraints.txt /tmp/torch-constraints.txt
RUN pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} -c /tmp/torch-constraints.txt torch torchvision \
    && rm /tmp/torch-constraints.txt
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
    && python -c "import lpt_core, tune.trial.trainable, psycopg2, aiohttp_cors, flask_wtf, optuna_dashboard, psutil, pynvml, torchcodec.decoders" \
    && ray --version && mlflow --version

ENTRYPOINT ["lpt-entrypoint"]
CMD ["python", "tune/search.py", "--help"]
