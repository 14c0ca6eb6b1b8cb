# System packages the slow tests use (sourced by scripts/test.sh): PostgreSQL (MLflow's backend
# store, as in docker-compose.yml), docker-compose v1 (its config parser), the Docker engine with
# iptables and debootstrap (tests/test_docker.py starts dockerd and builds stand-in base images),
# Chromium and its driver (the MLflow UI browser test). Installed with apt when missing and root.
# The project itself needs no system package: TorchCodec's image decoders bundle libjpeg-turbo,
# libpng, libwebp and nvJPEG in its wheel (FFmpeg is only for its video decoders, unused here).
need=()
command -v pg_ctlcluster >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v dockerd >/dev/null 2>&1 || need+=(docker.io)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages for the tests: ${need[*]} ..." >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
      || echo "warning: could not install ${need[*]}; the tests that need them will say so" >&2
  else
    echo "note: ${need[*]} missing and not root: the tests that need them will skip with the reason" >&2
  fi
fi
