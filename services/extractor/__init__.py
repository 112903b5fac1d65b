"""The extractor service: refusal (and sacred) directions of a loaded model.

``python -m services.extractor --model SOURCE`` serves ``ExtractorService``.
"""
