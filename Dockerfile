# One image for the MLflow server, its migration, the trainer and the model server.
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cushing ./cushing
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 cushing
COPY . .
USER cushing
