# One image for the gptqd API and its GPU workers: CUDA PyTorch, the project, a non-root user.
#
#   docker build -t gptqd .
#   docker build -t gptqd --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu130 .
#
# The CUDA runtime comes inside the torch wheels (nvidia-* packages), so a slim Python base is
# enough; the host needs only the NVIDIA driver and the NVIDIA container toolkit. Pick the
# wheel index that the host driver supports (see docs/deploy.md).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG GPTQD_UID=1000

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/gptqd \
    PATH=/opt/gptqd/bin:$PATH

RUN python -m venv /opt/gptqd

# 1. torch first, from the CUDA wheel index. The constraint file pins it for every later pip
#    call, so installing the project can never swap in another torch build.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && echo "torch==${TORCH_VERSION}" > /opt/gptqd/constraints.txt

# 2. the project's other dependencies, in their own layer so editing the source does not
#    reinstall them (read from pyproject.toml, the one list of dependencies).
WORKDIR /opt/src
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt -c /opt/gptqd/constraints.txt

# 3. the project itself; then fail the build if torch lost its CUDA build on the way, or came
#    without triton (the CUDA wheels bring it: without it the solver's column loop runs
#    kernel launch by kernel launch, several times slower, worker/gptq/columnkernel.py)
COPY app ./app
COPY worker ./worker
RUN pip install -c /opt/gptqd/constraints.txt . \
 && python -c "import torch, triton, app.settings, worker.gptq; assert torch.version.cuda, 'torch is a CPU build'; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

# Data (job store, artifacts, uploaded datasets) and the Hugging Face cache live on volumes
# owned by the unprivileged user; named volumes inherit this ownership on first use.
RUN useradd --create-home --uid "${GPTQD_UID}" --user-group gptqd \
 && mkdir -p /data /cache/huggingface \
 && chown gptqd:gptqd /data /cache/huggingface
ENV GPTQD_DATA_DIR=/data \
    HF_HOME=/cache/huggingface
VOLUME ["/data", "/cache/huggingface"]

USER ${GPTQD_UID}
WORKDIR /home/gptqd
EXPOSE 8000

# The API answers /healthz; the worker service in docker-compose.yml replaces this check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=5)"]

CMD ["gptqd", "serve", "--host", "0.0.0.0", "--port", "8000"]
