-- Run once by the postgres image on an empty data volume (docker-entrypoint-initdb.d):
-- one database for the Prefect server, one for the MLflow backend store, both owned by
-- POSTGRES_USER (the user the entrypoint runs this script as).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
