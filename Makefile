# Developer targets. PYTHON defaults to the project venv.
PYTHON ?= .venv/bin/python

.PHONY: protos protos-check

# Regenerate abliterate/v1/*_pb2*.py[i] from protos/abliterate/v1/*.proto.
protos:
	$(PYTHON) scripts/gen_protos.py

# Fail when the committed stubs differ from fresh ones.
protos-check:
	$(PYTHON) scripts/gen_protos.py --check
