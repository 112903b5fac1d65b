"""Originals read back from the model's safetensors files: resets stay bit-exact without a copy in memory."""

import pytest
import torch

from abliterate.core.ablation import ablator_for
from abliterate.core.loading import load_model
from abliterate.params import AblationParams
from abliterate.specs import ModelSpec
from tests.tiny import make_model, make_tokenizer


@pytest.fixture(scope="module", params=["single", "sharded"])
def folder(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    tokenizer = make_tokenizer()
    model = make_model("llama", tokenizer, layers=2, seed=8)
    # A 40 KB shard limit splits the tiny model into several files with an index.
    model.save_pretrained(path, max_shard_size="40KB" if request.param == "sharded" else "5GB")
    tokenizer.save_pretrained(path)
    return path


def _edit_and_reset(lm):
    ablator = ablator_for(lm)
    before = {name: p.detach().clone() for name, p in lm.model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    refusal = torch.nn.functional.normalize(torch.randn(lm.n_layers + 1, lm.hidden_size, generator=generator), dim=1)
    assert ablator.apply(AblationParams.uniform(1.0, lm.n_layers, weight=0.8), refusal) > 0
    changed = [name for name, p in lm.model.named_parameters() if not torch.equal(p, before[name])]
    ablator.reset()
    restored = all(torch.equal(p, before[name]) for name, p in lm.model.named_parameters())
    return ablator, changed, restored


def test_a_float32_folder_needs_no_copies_and_resets_bit_exactly(folder):
    lm = load_model(ModelSpec(source=str(folder), dtype="float32"))
    ablator, changed, restored = _edit_and_reset(lm)
    assert changed and restored
    assert ablator.cached_bytes() == 0 and len(ablator._file_backed) == len(changed)
    # A second edit and reset read the originals back again.
    ablator, changed_again, restored_again = _edit_and_reset(lm)
    assert changed_again == changed and restored_again


def test_weights_that_differ_from_the_files_are_copied(folder):
    lm = load_model(ModelSpec(source=str(folder), dtype="bfloat16"))  # cast on loading: not the files' bits
    ablator, changed, restored = _edit_and_reset(lm)
    assert changed and restored
    assert not ablator._file_backed and ablator.cached_bytes() > 0


def test_a_weight_file_rewritten_after_loading_is_refused_not_read(tmp_path):
    import os

    from abliterate.core.weight_files import WeightFiles
    from abliterate.errors import FailedPrecondition

    tokenizer = make_tokenizer()
    make_model("llama", tokenizer, layers=1, seed=8).save_pretrained(tmp_path)
    files = WeightFiles.open(str(tmp_path))
    name = next(iter(files._files_by_name))
    assert files.read(name) is not None
    make_model("llama", tokenizer, layers=1, seed=9).save_pretrained(tmp_path)  # other weights, same names
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))  # even a same-size rewrite gets a new time
    with pytest.raises(FailedPrecondition, match="changed on disk"):
        files.read(name)
    assert WeightFiles.open(str(tmp_path / "missing")) is None
