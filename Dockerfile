# One image for every role (api, worker, sweeper, migrate); the command picks the role.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api api
COPY worker worker
COPY shared shared
COPY ml ml
COPY cli cli
COPY migrations migrations
COPY alembic.ini ./
COPY models models
RUN pip install -e . && useradd --create-home cxr && mkdir -p /data && chown cxr /data
USER cxr
EXPOSE 8000
CMD ["cxr", "api"]
