# gblr-compress on CPU: docker run --rm -v "$PWD:/data" IMAGE /data/model.pt --budget 0.3 -o /data/model.onnx
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
# CPU-only torch first, from its own index, so the project install does not pull a CUDA build.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY gblr_compress ./gblr_compress
RUN pip install .
# The sample models stay importable for --factory samples.models:... from any directory.
COPY samples/__init__.py samples/models.py samples/make_samples.py ./samples/
ENV PYTHONPATH=/app

WORKDIR /data
ENTRYPOINT ["gblr-compress"]
CMD ["--help"]
