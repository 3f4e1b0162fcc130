# One image for the MLflow server, its migration, the trainer and the model server.
FROM python:3.11-slim
# gcc: torch.compile (`compile=...`) builds Triton's launchers and Inductor's CPU kernels at run time
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cushing ./cushing
RUN pip install --no-cache-dir . && useradd --create-home --uid 1000 cushing \
 && mkdir -p /home/cushing/.cache/cushing && chown -R cushing:cushing /home/cushing/.cache
# (the trainer's cache volume mounts there; an empty named volume takes this folder's owner)
COPY . .
USER cushing
