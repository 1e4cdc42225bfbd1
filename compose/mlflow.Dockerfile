# The MLflow release of requirements/kernel.lock: the clients (notebooks, kernel image) speak its API
FROM ghcr.io/mlflow/mlflow:v3.17.2
# /mlartifacts owned by the server's user: an empty named volume mounted there takes this ownership
RUN pip install --no-cache-dir psycopg2-binary==2.9.10 \
    && mkdir -p /mlartifacts && chown 1000:1000 /mlartifacts
USER 1000
