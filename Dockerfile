# tauopt worker / dashboard image. CPU and GPU alike: PyPI's torch wheel carries CUDA and
# falls back to the CPU when no GPU is reserved.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY models ./models
COPY storage ./storage
COPY study ./study
COPY engine ./engine
COPY tauopt ./tauopt
RUN pip install . && useradd --create-home tauopt && mkdir -p /data /artifacts \
    && chown tauopt /data /artifacts
USER tauopt
ENV TAUOPT_DATA=/data TAUOPT_ARTIFACTS=/artifacts
ENTRYPOINT ["tauopt"]
CMD ["--help"]
