# One image for the reward service, the pruner service and the trainer (compose.yaml).
# CUDA runtime base for GPU machines; on PyPI the Linux torch wheel is the CUDA build.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH EPGRPO_CACHE_DIR=/cache
# libgl1/libglib2.0: opencv-python (needed by the OCR reward's rapidocr) loads them at import.
# Not version-pinned: the base image pins the distribution, and Ubuntu replaces old patch
# versions in its archive, so pins would break rebuilds.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
# Installed the way the README does (torch pinned first, then the project). torch gets its own
# layer: it is by far the largest and changes least often.
RUN pip install torch==2.13.0
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
COPY trainer trainer
# Experiment profiles (compose --env-file deploy/<name>.env) refer to these trainer configs.
COPY deploy deploy
RUN pip install torch==2.13.0 && pip install .

# gRPC: reward 50051, pruner 50052; Prometheus /metrics 9090 (compose sets EPGRPO_METRICS_PORT).
EXPOSE 50051 50052 9090
CMD ["epgrpo", "--help"]
