"""Hand a study on: copy an Optuna study (every trial, its parameters, scores and attributes) between storages.

A storage is an SQLAlchemy URL (``postgresql+psycopg://...``, ``sqlite:///path``)
or the path of an SQLite file (the embedded run's ``abliterate-data/optuna.db``).
Copying the Postgres study of a compose deployment into a file dumps it; copying
that file into another deployment's storage loads it there. Optuna, no torch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from abliterate.errors import AlreadyExists, InvalidArgument, NotFound


@dataclass
class CopiedStudy:
    name: str
    n_trials: int


def storage_url(text: str, must_exist: bool) -> str:
    """``text`` as a storage URL: a URL as it is, a file path as ``sqlite:///`` its absolute path."""
    if "://" in text:
        return text
    path = os.path.abspath(os.path.expanduser(text))
    if must_exist and not os.path.isfile(path):
        raise NotFound(f"no study storage at {text} (a storage URL or an SQLite file)")
    if not must_exist:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    return f"sqlite:///{path}"


def _storage(url: str):
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy and driver errors vary
        raise InvalidArgument(f"cannot open the storage {url.split('@')[-1]}: {exc}") from None


def copy_study(source: str, destination: str, study: str | None = None, new_name: str | None = None) -> CopiedStudy:
    """Copy ``study`` (the only one when None) from ``source`` into ``destination`` as ``new_name`` (or its name).

    The destination must not hold a study of that name already: nothing is
    merged or overwritten.
    """
    import optuna

    from_storage = _storage(storage_url(source, must_exist=True))
    names = [summary.study_name for summary in optuna.get_all_study_summaries(from_storage, include_best_trial=False)]
    if study is None:
        if len(names) != 1:
            listed = ", ".join(sorted(names)) or "none"
            raise InvalidArgument(f"{source} holds {len(names)} studies ({listed}): name one with --study")
        study = names[0]
    elif study not in names:
        raise NotFound(f"{source} holds no study {study!r} (it holds: {', '.join(sorted(names)) or 'none'})")
    target = new_name or study
    to_storage = _storage(storage_url(destination, must_exist=False))
    if target in [summary.study_name for summary in optuna.get_all_study_summaries(to_storage, False)]:
        raise AlreadyExists(f"{destination} already holds a study {target!r}; copy it under another name (--as)")
    optuna.copy_study(from_study_name=study, from_storage=from_storage, to_storage=to_storage, to_study_name=target)
    copied = optuna.load_study(study_name=target, storage=to_storage)
    return CopiedStudy(target, len(copied.get_trials(deepcopy=False)))
