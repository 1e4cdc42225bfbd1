-- second database for MLflow next to Airflow's
CREATE DATABASE mlflow;
