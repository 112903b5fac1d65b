"""The evaluator service: scores trials, generates, chats and exports for ablation parameters.

``python -m abliterate_services.evaluator --model SOURCE`` serves ``EvaluatorService``;
the state and the work live in ``session.EvaluatorSession``.
"""
