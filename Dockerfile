# The serving image (FastAPI + TensorFlow) and the training image, from one Dockerfile.
#
#   TF_VARIANT=gpu (default): `.[gpu]`, i.e. tensorflow[and-cuda]; the CUDA libraries come as
#                             wheels, the driver from the NVIDIA container toolkit at run time.
#   TF_VARIANT=cpu:           `.[cpu]`, i.e. tensorflow-cpu (much smaller).
#
# Stages: requirements - the pinned requirement lists, from pyproject.toml
#         base    - virtualenv with the pinned dependencies, then the project itself
#         train   - base + the `train` extra; runs both training scripts (compose service `train`)
#         runtime - base + the shipped models/; the API server. Last stage, so the default target.
#
# The RUN --mount lines need BuildKit: `docker compose build` always uses it, as does
# `docker build` on Docker 23+ (buildx). See docs/containers.md.

ARG TF_VARIANT=gpu
# The base image, pinned to an exact release (Python 3.11.14, Debian 12 "bookworm").
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# The requirement lists, read from pyproject.toml. Only their content reaches the next stage, so
# an edit elsewhere in pyproject.toml (tool settings) does not reinstall TensorFlow.
FROM ${PYTHON_IMAGE} AS requirements
ARG TF_VARIANT
COPY pyproject.toml /tmp/pyproject.toml
RUN case "$TF_VARIANT" in cpu|gpu) ;; *) echo "TF_VARIANT must be cpu or gpu" >&2; exit 1 ;; esac \
 && python -c "import sys, tomllib; \
p = tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']; \
extra = p['optional-dependencies']; \
open('/tmp/requirements.txt', 'w').write('\n'.join(p['dependencies'] + extra[sys.argv[1]])); \
open('/tmp/requirements-train.txt', 'w').write('\n'.join(extra['train']))" "$TF_VARIANT"


FROM ${PYTHON_IMAGE} AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TF_CPP_MIN_LOG_LEVEL=2 \
    KERAS_HOME=/tmp/keras \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN groupadd --system --gid 10001 app \
 && useradd --system --no-log-init --uid 10001 --gid app --home-dir /nonexistent \
        --shell /usr/sbin/nologin app \
 && python -m venv /opt/venv

# Dependencies before the code, so that a code change does not reinstall TensorFlow. The pip
# cache mount spares downloads when they change. TensorFlow's C++ headers (~290 MB, only for
# building custom ops) are dropped.
COPY --from=requirements /tmp/requirements.txt /opt/venv/requirements.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install pip==26.3 \
 && pip install -r /opt/venv/requirements.txt \
 && rm -rf /opt/venv/lib/python3.11/site-packages/tensorflow/include

# The project itself (app, modelspec, training) into site-packages, from a bind mount of the
# build context: no copy of the sources stays in the image.
RUN --mount=type=bind,target=/tmp/src,rw \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --no-deps /tmp/src \
 && pip check

ENV MODEL_DIR=/app/models
WORKDIR /app


FROM base AS train
COPY --from=requirements /tmp/requirements-train.txt /opt/venv/requirements-train.txt
RUN --mount=type=cache,target=/root/.cache/pip \
    pip install -r /opt/venv/requirements-train.txt
ENV MPLCONFIGDIR=/tmp/matplotlib
USER 10001:10001
# MNIST: $MNIST_DIR (compose mounts the IDX files at /data/mnist), else Keras downloads it.
CMD ["sh", "-c", "python -m training.train_digits --model-dir \"$MODEL_DIR\" && python -m training.train_echo --model-dir \"$MODEL_DIR\""]


FROM base AS runtime
# Shipped models, owned by root and read-only for the service; MODEL_DIR may point elsewhere
# (a mounted volume) instead.
COPY models/ /app/models/
USER 10001:10001
EXPOSE 8000 8001
HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"]
# `python -m app` runs uvicorn with the server limits of app/core/config.py
# (docs/configuration.md). Exec form: it is PID 1 and gets SIGTERM itself; it stops accepting, lets
# in-flight requests finish for up to TIMEOUT_GRACEFUL_SHUTDOWN_S (15 s), then runs the app's
# shutdown. Give the container more than that to stop (compose: stop_grace_period 30s; docker
# run: --stop-timeout 30). The HEALTHCHECK above assumes PORT stays 8000; gRPC listens on
# GRPC_PORT (8001 by default).
ENV HOST=0.0.0.0 \
    PORT=8000
CMD ["python", "-m", "app"]
