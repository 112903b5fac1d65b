#!/bin/sh
# Entrypoint of both abliterate images: prepare the data volume, then `exec` the
# command so that it runs as PID 1's direct replacement and receives SIGTERM
# from `docker stop` (the services drain their calls and exit cleanly).
#
# ABLITERATE_DATA_DIR (default /data) is the named volume: the Hugging Face
# cache (HF_HOME), exported models and the optimizer's direction blobs live
# there. HF_TOKEN, if set, is read by huggingface_hub from the environment;
# it is never written to disk (no `huggingface-cli login`).
set -eu

DATA_DIR="${ABLITERATE_DATA_DIR:-/data}"
export HF_HOME="${HF_HOME:-$DATA_DIR/huggingface}"
for dir in "$DATA_DIR" "$HF_HOME" "$DATA_DIR/exports"; do
    if ! mkdir -p "$dir" 2>/dev/null; then
        echo "entrypoint: cannot create $dir (is the volume writable by uid $(id -u)?)" >&2
        exit 1
    fi
done

if [ "$#" -eq 0 ]; then
    echo "usage: <image> COMMAND... (e.g. python -m abliterate_services.gateway, abliterate serve all --model M)" >&2
    exit 2
fi
exec "$@"
