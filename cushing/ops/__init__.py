"""Running the service: the production stack without Docker (PostgreSQL + `mlflow server` on loopback, locked
down for hosts with other accounts) and the launcher the docker-compose services run; `deploy/` holds the
database initialisation script compose mounts.

Owns: `stack/` (`local`, `postgres`, `server`, `credentials`, `processes`), `deploy/`. It imports nothing of the
package (it starts processes; the tests and the CLI drive it).
"""
