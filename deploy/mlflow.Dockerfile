# A small MLflow tracking server image for deploy/mlflow-server.yaml: MLflow 3.17.2 (the
# client version ray_dpo pins) with the PostgreSQL and S3 drivers its stores need.
#
#   docker build -f deploy/mlflow.Dockerfile -t REGISTRY/ray-dpo-mlflow:3.17.2 deploy
# Pin the base by digest for bit-for-bit rebuilds (docker buildx imagetools inspect ...).
FROM python:3.11-slim-bookworm

RUN pip install --no-cache-dir --disable-pip-version-check \
        "mlflow==3.17.2" "psycopg2-binary==2.9.13" "boto3==1.44.5" \
    && useradd --uid 1000 --create-home mlflow
USER 1000
ENV MLFLOW_DISABLE_TELEMETRY=true
EXPOSE 5000
ENTRYPOINT ["mlflow", "server"]
