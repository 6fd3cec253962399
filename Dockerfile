# One image for the reward service, the pruner service and the trainer.
# CUDA runtime base for GPU machines; on PyPI the Linux torch wheel is the CUDA build.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH EPGRPO_CACHE_DIR=/cache
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first (cached layer), then the source; installed the way the README does.
COPY pyproject.toml README.md ./
COPY protos protos
COPY services services
COPY trainer trainer
RUN pip install torch==2.13.0 && pip install .

# Services bind 0.0.0.0 inside the container; compose maps ports explicitly.
EXPOSE 50051 50052
CMD ["epgrpo", "--help"]
