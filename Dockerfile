# syntax=docker/dockerfile:1
# dicom-appliance in a container (README "Running in production").
#
#   docker build -t dicom-appliance .
#   docker run --rm -v dicom-data:/data dicom-appliance migrate
#   docker run -d --init --stop-timeout 30 -v dicom-data:/data \
#       -p 8080:8080 -p 11112:11112 dicom-appliance
#
# The index must be migrated before `serve` starts (it refuses an index that
# is not, exit 2): run `migrate` as above, or set APPLIANCE_INDEX_AUTO_MIGRATE=true.

# Builder: wheels of the project and of everything it needs, with the
# postgres, azure and s3 extras, so that one image runs on every backend.
FROM python:3.11-slim AS builder
WORKDIR /src
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY dicomweb ./dicomweb
COPY dimse_bridge ./dimse_bridge
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".[postgres,azure,s3]"

# Runtime: the wheels installed (no build tools, no source), run by a user
# of its own.
FROM python:3.11-slim
RUN groupadd --system --gid 10001 appliance \
    && useradd --system --uid 10001 --gid appliance --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin appliance \
    && install -d -o appliance -g appliance -m 0750 /data
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels \
        "dicom-appliance[postgres,azure,s3]==0.1.0"

# The working directory is the volume: the default ./data/blobs and
# ./data/index.db land in it, and a config/appliance.toml in it is read
# without --config.
WORKDIR /data
VOLUME /data

# Both listeners on every interface of the container (the defaults bind
# 127.0.0.1, which nothing outside the container reaches).  Anonymous access
# is allowed on a loopback bind only (SPEC [auth]), so the image asks for API
# tokens: create one with `docker run ... dicom-appliance token create --role
# read` (README "Security"), or set APPLIANCE_AUTH_MODE=oidc and its keys.
# /health/* and /metrics stay open (auth.health_anonymous, metrics_anonymous).
ENV APPLIANCE_HTTP_HOST=0.0.0.0 \
    APPLIANCE_DIMSE_HOST=0.0.0.0 \
    APPLIANCE_AUTH_MODE=token

USER 10001:10001
# DICOMweb (http.port) and DIMSE (dimse.port)
EXPOSE 8080 11112

# /health/ready: index and storage reachable, DIMSE listening.  No curl in
# the slim image: Python's urllib (a 503 raises, so the check fails).  It
# follows APPLIANCE_HTTP_PORT, not a port set in a config file.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('APPLIANCE_HTTP_PORT', '8080') + '/health/ready', timeout=4)"]

# `serve` runs as PID 1 and stops cleanly on SIGTERM (docker stop): it gives
# its children up to 10 s, so give docker stop more (--stop-timeout 30).
ENTRYPOINT ["dicom-appliance"]
CMD ["serve"]
