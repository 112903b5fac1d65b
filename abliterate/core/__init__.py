"""The math core: torch and transformers, never grpc.

Modules, one concept each: ``loading`` (model + tokenizer), ``chat`` (prompt
formatting), ``modules`` (which matrices get edited), ``prompts`` (prompt
sets), ``batching`` (auto batch size), ``residuals``, ``directions``,
``ablation`` (edit + exact reset), ``refusals`` (marker detection),
``generation`` (greedy decoding with early stop), ``scoring`` (KL, refusal
counts, the trial API), ``export``.
"""
