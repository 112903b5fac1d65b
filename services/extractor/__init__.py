"""The extractor service: refusal (and sacred) directions of a loaded model.

``python -m abliterate_services.extractor --model SOURCE`` serves ``ExtractorService``.
"""
