# tauopt worker / dashboard image.
#   CPU (default): torch's CPU build, ~1 GB smaller than PyPI's CUDA build.
#   GPU:  --build-arg TORCH_INDEX_URL=https://pypi.org/simple  (PyPI's torch carries CUDA)
#   Offline or cached: --build-arg TORCH_FIND_LINKS=/wheels with the folder mounted at build
#   (podman build -v /path/to/wheels:/wheels:ro ...): torch comes from that wheelhouse, at
#   whatever version it holds (its small dependencies come from PyPI).
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_FIND_LINKS=
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY constraints.txt ./
# torch first, from the chosen build; the project install then keeps that torch (pinned to it).
RUN set -e; \
    if [ -n "$TORCH_FIND_LINKS" ]; then \
        pip install "$TORCH_FIND_LINKS"/torch-*.whl; \
    else \
        pip install -c constraints.txt --index-url "$TORCH_INDEX_URL" \
            --extra-index-url https://pypi.org/simple torch; \
    fi; \
    python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
        > /tmp/torch-pin.txt
COPY pyproject.toml README.md ./
COPY models ./models
COPY engine ./engine
COPY storage ./storage
COPY study ./study
COPY tauopt ./tauopt
RUN pip install -c /tmp/torch-pin.txt . && useradd --create-home tauopt \
    && mkdir -p /data /artifacts && chown tauopt /data /artifacts
USER tauopt
ENV TAUOPT_DATA=/data TAUOPT_ARTIFACTS=/artifacts
ENTRYPOINT ["tauopt"]
CMD ["--help"]
