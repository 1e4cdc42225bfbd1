# Orchestration image: Airflow 3 + providers (pinned by requirements/airflow.lock) + this library's light modules.
FROM apache/airflow:3.3.2-python3.11
COPY requirements/airflow.lock /tmp/airflow.lock
RUN pip install --no-cache-dir -r /tmp/airflow.lock psycopg2-binary==2.9.10
COPY --chown=airflow:root pyproject.toml README.md /opt/helical-workflow/
COPY --chown=airflow:root src /opt/helical-workflow/src
RUN pip install --no-cache-dir --no-deps /opt/helical-workflow
