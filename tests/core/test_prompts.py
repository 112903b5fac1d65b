"""Tests for abliterate.core.prompts: bundled sets, local files, datasets sources, errors.

Fast and offline: Hub access is replaced by a fake ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from abliterate.core.prompts import AUTO_COLUMNS, PromptSetSpec, bundled_sets, load_prompts
from abliterate.errors import InvalidArgument, NotFound

DATA_DIR = Path(__file__).resolve().parents[2] / "abliterate" / "data"

# name -> (min rows, max rows)
BUNDLED_SIZES = {
    "harmful_train": (150, 200),
    "harmful_eval": (90, 130),
    "harmless_train": (150, 200),
    "harmless_eval": (90, 130),
    "capability": (70, 100),
    "baseline_text": (70, 100),
}
HARMFUL_CATEGORIES = {
    "cybercrime",
    "weapons",
    "drugs",
    "fraud",
    "harassment",
    "violence",
    "self-harm",
    "privacy",
    "misinformation",
    "theft",
}

ROWS = [f"prompt number {i}" for i in range(30)]


def _raw(name: str) -> list[dict]:
    return json.loads((DATA_DIR / f"{name}.json").read_text(encoding="utf-8"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list) -> Path:
    return _write(path, "".join(json.dumps(r) + "\n" for r in rows))


# --------------------------------------------------------------------------- bundled sets


def test_bundled_sets_lists_the_shipped_files():
    assert bundled_sets() == sorted(BUNDLED_SIZES)


@pytest.mark.parametrize("name", sorted(BUNDLED_SIZES))
def test_bundled_set_loads_with_expected_size_and_no_duplicates(name):
    prompts = load_prompts(f"bundled:{name}")
    low, high = BUNDLED_SIZES[name]
    assert low <= len(prompts) <= high
    assert all(isinstance(p, str) and p == p.strip() and len(p) >= 10 for p in prompts)
    lowered = [p.lower() for p in prompts]
    assert len(set(lowered)) == len(lowered), [p for p, n in Counter(lowered).items() if n > 1]
    rows = _raw(name)
    assert len(rows) == len(prompts)
    for row in rows:
        assert set(row) == {"prompt", "category"}
        assert isinstance(row["category"], str) and row["category"]
    # The default column detection picks "prompt", in file order.
    assert prompts == [row["prompt"].strip() for row in rows]


@pytest.mark.parametrize("kind", ["harmful", "harmless"])
def test_train_and_eval_are_disjoint(kind):
    train = {p.lower() for p in load_prompts(f"bundled:{kind}_train")}
    evaluation = {p.lower() for p in load_prompts(f"bundled:{kind}_eval")}
    assert not train & evaluation


def test_no_prompt_is_shared_between_any_two_bundled_sets():
    seen: dict[str, str] = {}
    for name in BUNDLED_SIZES:
        for prompt in load_prompts(f"bundled:{name}"):
            key = prompt.lower()
            assert key not in seen, f"{prompt!r} is in both {seen[key]} and {name}"
            seen[key] = name


@pytest.mark.parametrize("name", ["harmful_train", "harmful_eval"])
def test_harmful_sets_spread_evenly_over_categories(name):
    counts = Counter(row["category"] for row in _raw(name))
    assert len(counts) >= 8
    assert set(counts) <= HARMFUL_CATEGORIES
    assert max(counts.values()) - min(counts.values()) <= 2


def test_harmless_and_capability_sets_have_topic_categories():
    for name in ("harmless_train", "harmless_eval", "capability"):
        counts = Counter(row["category"] for row in _raw(name))
        assert len(counts) >= 6, name
        assert not set(counts) & HARMFUL_CATEGORIES
    assert {"law", "medicine", "history", "geography"} <= {r["category"] for r in _raw("capability")}
    assert all(p.endswith("?") for p in load_prompts("bundled:capability"))


def test_baseline_text_is_plain_prose():
    rows = _raw("baseline_text")
    assert {row["category"] for row in rows} == {"prose"}
    for row in rows:
        text = row["prompt"]
        assert text.endswith("."), text
        assert "?" not in text, text


def test_bundled_slice_and_limit():
    full = load_prompts("bundled:harmful_train")
    assert load_prompts(PromptSetSpec("bundled:harmful_train", split="train[:5]")) == full[:5]
    assert load_prompts(PromptSetSpec("bundled:harmful_train", split="train[2:4]")) == full[2:4]
    assert load_prompts(PromptSetSpec("bundled:harmful_train", limit=7)) == full[:7]


def test_bundled_prefix_is_balanced_across_categories():
    rows = _raw("harmful_train")[:20]
    assert len({row["category"] for row in rows}) == 10


def test_loading_bundled_and_json_does_not_import_datasets(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps(["a prompt"]))
    code = (
        "import sys\n"
        "from abliterate.core.prompts import load_prompts\n"
        "load_prompts('bundled:harmless_eval')\n"
        f"load_prompts({str(path)!r})\n"
        "assert 'datasets' not in sys.modules, 'datasets was imported'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------- local files


def test_json_list_of_strings_strips_and_drops_blanks(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps(["  first  ", "", "   ", "second\n"]))
    assert load_prompts(str(path)) == ["first", "second"]


def test_json_list_of_objects_with_column(tmp_path):
    rows = [{"q": f"question {i}", "text": f"other {i}"} for i in range(3)]
    path = _write(tmp_path / "p.json", json.dumps(rows))
    assert load_prompts(PromptSetSpec(str(path), column="q")) == [f"question {i}" for i in range(3)]
    # Auto detection takes the first of AUTO_COLUMNS present ("text" here).
    assert load_prompts(str(path)) == [f"other {i}" for i in range(3)]


@pytest.mark.parametrize("column", AUTO_COLUMNS)
def test_auto_column_detection_finds_each_known_name(tmp_path, column):
    path = _write(tmp_path / "p.json", json.dumps([{"id": 1, column: "hello"}]))
    assert load_prompts(str(path)) == ["hello"]


def test_auto_column_detection_order(tmp_path):
    # Drop the highest-priority column each round: the next one must win.
    order = ["text", "prompt", "instruction", "question", "goal"]
    for i, expected in enumerate(order):
        row = {"zzz": "other", **{name: f"value of {name}" for name in reversed(order[i:])}}
        path = _write(tmp_path / f"p{i}.json", json.dumps([row]))
        assert load_prompts(str(path)) == [f"value of {expected}"]


def test_jsonl_objects_and_strings(tmp_path):
    objects = _jsonl(tmp_path / "o.jsonl", [{"instruction": f"do {i}"} for i in range(4)])
    assert load_prompts(str(objects)) == [f"do {i}" for i in range(4)]
    strings = _write(tmp_path / "s.jsonl", '"alpha"\n\n"  beta "\n')
    assert load_prompts(str(strings)) == ["alpha", "beta"]


def test_csv_with_column(tmp_path):
    path = tmp_path / "p.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "body", "label"])
        writer.writerow([1, "Hello, world", "x"])
        writer.writerow([2, 'Say "hi"\non two lines', "y"])
    assert load_prompts(PromptSetSpec(str(path), column="body")) == [
        "Hello, world",
        'Say "hi"\non two lines',
    ]


def test_csv_auto_column(tmp_path):
    path = _write(tmp_path / "p.csv", "goal,target\nfirst goal,t1\nsecond goal,t2\n")
    assert load_prompts(str(path)) == ["first goal", "second goal"]


def test_txt_one_prompt_per_line(tmp_path):
    path = _write(tmp_path / "p.txt", "line one\n\n   \n  line two  \r\nline three")
    assert load_prompts(str(path)) == ["line one", "line two", "line three"]


def test_json_file_holding_json_lines_is_accepted(tmp_path):
    path = _write(tmp_path / "p.json", '{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts(str(path)) == ["a", "b"]


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("train[:5]", ROWS[:5]),
        ("train[2:4]", ROWS[2:4]),
        ("test[25:]", ROWS[25:]),
        ("train[3:6]+train[:2]", ROWS[3:6] + ROWS[:2]),
        ("train[-3:]", ROWS[-3:]),
        ("train[:10%]", ROWS[:3]),
        ("train", ROWS),
    ],
)
def test_split_slice_applies_to_local_files(tmp_path, split, expected):
    path = _write(tmp_path / "p.json", json.dumps(ROWS))
    assert load_prompts(PromptSetSpec(str(path), split=split)) == expected


def test_limit_applies_after_slice(tmp_path):
    path = _write(tmp_path / "p.txt", "\n".join(ROWS))
    assert load_prompts(PromptSetSpec(str(path), limit=4)) == ROWS[:4]
    assert load_prompts(PromptSetSpec(str(path), split="train[10:20]", limit=3)) == ROWS[10:13]
    assert load_prompts(PromptSetSpec(str(path), limit=1000)) == ROWS


def test_limit_counts_prompts_not_blank_rows(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps(["", "a", "  ", "b", "c"]))
    assert load_prompts(PromptSetSpec(str(path), limit=2)) == ["a", "b"]


# --------------------------------------------------------------------------- datasets sources

datasets = pytest.importorskip("datasets")


def _dataset(n: int = 12, column: str = "prompt"):
    return datasets.Dataset.from_dict({column: [f"ds prompt {i}" for i in range(n)], "n": list(range(n))})


def test_dataset_save_to_disk_directory(tmp_path):
    _dataset().save_to_disk(str(tmp_path / "ds"))
    assert load_prompts(str(tmp_path / "ds")) == [f"ds prompt {i}" for i in range(12)]
    spec = PromptSetSpec(str(tmp_path / "ds"), split="train[3:5]")
    assert load_prompts(spec) == ["ds prompt 3", "ds prompt 4"]
    assert load_prompts(PromptSetSpec(str(tmp_path / "ds"), limit=2)) == ["ds prompt 0", "ds prompt 1"]


def test_dataset_dict_directory_with_split(tmp_path):
    dd = datasets.DatasetDict(
        {
            "train": _dataset(5),
            "test": datasets.Dataset.from_dict({"question": [f"test q {i}" for i in range(6)]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(PromptSetSpec(str(tmp_path / "dd"), split="test")) == [f"test q {i}" for i in range(6)]
    assert load_prompts(PromptSetSpec(str(tmp_path / "dd"), split="test[1:3]")) == ["test q 1", "test q 2"]
    # No split: "train" is the default.
    assert load_prompts(str(tmp_path / "dd")) == [f"ds prompt {i}" for i in range(5)]


def test_dataset_dict_unknown_split(tmp_path):
    datasets.DatasetDict({"train": _dataset(2), "test": _dataset(2)}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(InvalidArgument) as info:
        load_prompts(PromptSetSpec(str(tmp_path / "dd"), split="validation"))
    message = str(info.value)
    assert "validation" in message and "train" in message and "test" in message


def test_directory_of_data_files(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    _jsonl(folder / "train.jsonl", [{"prompt": f"file prompt {i}"} for i in range(6)])
    assert load_prompts(str(folder)) == [f"file prompt {i}" for i in range(6)]
    assert load_prompts(PromptSetSpec(str(folder), split="train[4:]")) == ["file prompt 4", "file prompt 5"]


def test_streaming_local_jsonl_through_json_builder(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "p.jsonl", [{"text": f"row {i}"} for i in range(50)])
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    spec = PromptSetSpec(f"json:{path}", split="train[10:20]", streaming=True)
    assert load_prompts(spec) == [f"row {i}" for i in range(10, 20)]
    ((args, kwargs),) = calls
    assert args[0] == "json"
    assert kwargs["data_files"] == str(path)
    assert kwargs["split"] == "train"
    assert kwargs["streaming"] is True
    # limit while streaming, and the non-streaming builder path.
    assert load_prompts(PromptSetSpec(f"json:{path}", streaming=True, limit=3)) == ["row 0", "row 1", "row 2"]
    assert load_prompts(PromptSetSpec(f"json:{path}", split="train[48:]")) == ["row 48", "row 49"]


def test_streaming_reads_only_the_rows_it_needs(monkeypatch):
    consumed: list[int] = []

    def rows():
        for i in range(1000):
            consumed.append(i)
            yield {"prompt": f"hub row {i}"}

    def fake_load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
        assert (path, name, split, streaming) == ("org/big-set", "default", "train", True)
        return datasets.IterableDataset.from_generator(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = PromptSetSpec("org/big-set", config="default", split="train[5:8]", streaming=True)
    assert load_prompts(spec) == ["hub row 5", "hub row 6", "hub row 7"]
    assert len(consumed) <= 10


def test_streaming_rejects_negative_or_percent_bounds(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"text": "x"}])
    for split in ("train[-5:]", "train[:10%]"):
        with pytest.raises(InvalidArgument, match="stream"):
            load_prompts(PromptSetSpec(f"json:{path}", split=split, streaming=True))


def test_hub_dataset_non_streaming(monkeypatch):
    seen = {}

    def fake_load_dataset(path, name=None, *, split=None, streaming=False, **kwargs):
        seen.update(path=path, name=name, split=split, streaming=streaming)
        return datasets.Dataset.from_dict({"instruction": [f"hub {i}" for i in range(10)]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    # The split, slice included, goes to datasets as it is: datasets does the slicing.
    assert load_prompts(PromptSetSpec("someone/instructions", split="test[7:]")) == [f"hub {i}" for i in range(10)]
    assert seen == {"path": "someone/instructions", "name": None, "split": "test[7:]", "streaming": False}


def test_builder_split_is_sliced_by_datasets(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"text": f"row {i}"} for i in range(40)])
    assert load_prompts(PromptSetSpec(f"json:{path}", split="train[:10%]")) == [f"row {i}" for i in range(4)]
    assert load_prompts(PromptSetSpec(f"json:{path}", split="train[-2:]")) == ["row 38", "row 39"]
    with pytest.raises(InvalidArgument, match="no data"):
        load_prompts(PromptSetSpec(f"json:{path}", split="train[100:164]"))
    with pytest.raises(InvalidArgument, match="validation"):
        load_prompts(PromptSetSpec(f"json:{path}", split="validation[:3]"))


# --------------------------------------------------------------------------- errors


def test_missing_file_is_not_found(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(NotFound) as info:
        load_prompts(str(missing))
    assert str(missing) in str(info.value)
    with pytest.raises(NotFound, match="gone.txt"):
        load_prompts("./gone.txt")


def test_missing_builder_data_file_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="absent.jsonl"):
        load_prompts(f"json:{tmp_path / 'absent.jsonl'}")


def test_unknown_bundled_name_lists_the_bundled_sets():
    with pytest.raises(NotFound) as info:
        load_prompts("bundled:harmfull")
    message = str(info.value)
    assert "harmfull" in message
    for name in BUNDLED_SIZES:
        assert name in message


def test_unknown_column_lists_available_columns(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps([{"body": "x", "label": "y"}]))
    with pytest.raises(InvalidArgument) as info:
        load_prompts(PromptSetSpec(str(path), column="prompt_text"))
    message = str(info.value)
    assert "prompt_text" in message and "body" in message and "label" in message


def test_unknown_column_in_csv_and_dataset(tmp_path):
    csv_path = _write(tmp_path / "p.csv", "alpha,beta\n1,2\n")
    with pytest.raises(InvalidArgument, match="alpha, beta"):
        load_prompts(PromptSetSpec(str(csv_path), column="gamma"))
    _dataset(3).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InvalidArgument) as info:
        load_prompts(PromptSetSpec(str(tmp_path / "ds"), column="gamma"))
    assert "gamma" in str(info.value) and "prompt" in str(info.value) and "n" in str(info.value)


def test_no_auto_column_names_what_was_tried(tmp_path):
    path = _write(tmp_path / "p.jsonl", json.dumps({"body": "x"}) + "\n")
    with pytest.raises(InvalidArgument) as info:
        load_prompts(str(path))
    assert "body" in str(info.value) and "instruction" in str(info.value)


def test_row_missing_the_column(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps([{"prompt": "a"}, {"other": "b"}]))
    with pytest.raises(InvalidArgument, match="row 1"):
        load_prompts(str(path))


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.json", "[]"),
        ("blank.json", json.dumps(["", "   ", "\n"])),
        ("blank.txt", "\n   \n\n"),
        ("empty.jsonl", ""),
        ("header_only.csv", "prompt\n"),
    ],
)
def test_empty_sets_are_invalid(tmp_path, name, content):
    path = _write(tmp_path / name, content)
    with pytest.raises(InvalidArgument) as info:
        load_prompts(str(path))
    assert "is empty" in str(info.value) or "empty" in str(info.value)
    assert name in str(info.value)


def test_empty_after_slicing(tmp_path):
    path = _write(tmp_path / "p.json", json.dumps(ROWS))
    with pytest.raises(InvalidArgument, match=r"prompt set .*p\.json.* is empty"):
        load_prompts(PromptSetSpec(str(path), split="train[100:164]"))
    with pytest.raises(InvalidArgument, match="is empty"):
        load_prompts(PromptSetSpec("bundled:capability", split="train[5:5]"))


@pytest.mark.parametrize(
    ("name", "content", "kind"),
    [
        ("num.json", json.dumps(["ok", 42]), "int"),
        ("none.jsonl", '"ok"\nnull\n', "NoneType"),
        ("obj.json", json.dumps([{"prompt": ["a", "list"]}]), "list"),
        ("nested.json", json.dumps([["a"]]), "list"),
    ],
)
def test_non_string_entries_are_invalid(tmp_path, name, content, kind):
    path = _write(tmp_path / name, content)
    with pytest.raises(InvalidArgument) as info:
        load_prompts(str(path))
    assert name in str(info.value) and kind in str(info.value)


def test_non_string_dataset_column_is_invalid(tmp_path):
    datasets.Dataset.from_dict({"prompt": [1, 2, 3]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(InvalidArgument, match="int"):
        load_prompts(str(tmp_path / "ds"))


def test_malformed_files(tmp_path):
    bad_json = _write(tmp_path / "bad.json", '["unterminated')
    with pytest.raises(InvalidArgument, match="bad.json"):
        load_prompts(str(bad_json))
    not_list = _write(tmp_path / "dict.json", json.dumps({"prompt": "x"}))
    with pytest.raises(InvalidArgument, match="list"):
        load_prompts(str(not_list))
    bad_jsonl = _write(tmp_path / "bad.jsonl", '{"prompt": "a"}\n{oops\n')
    with pytest.raises(InvalidArgument, match="line 2"):
        load_prompts(str(bad_jsonl))
    unknown = _write(tmp_path / "p.xml", "<x/>")
    with pytest.raises(InvalidArgument, match=r"\.xml"):
        load_prompts(str(unknown))


@pytest.mark.parametrize("split", ["train[1:2:3]", "train[a:b]", "train[", "tr ain", "", "[3:6]", "train[:5](nearest)"])
def test_bad_split_syntax(split):
    with pytest.raises(InvalidArgument, match="split"):
        PromptSetSpec("bundled:capability", split=split)


@pytest.mark.parametrize("limit", [0, -1, True, 2.5])
def test_bad_limit(limit):
    with pytest.raises(InvalidArgument, match="limit"):
        PromptSetSpec("bundled:capability", limit=limit)


def test_empty_source():
    with pytest.raises(InvalidArgument):
        load_prompts("   ")


def _raise(exc: Exception):
    def fake_load_dataset(*args, **kwargs):
        raise exc

    return fake_load_dataset


def test_hub_dataset_not_found_is_a_clear_error(monkeypatch):
    from datasets.exceptions import DatasetNotFoundError

    monkeypatch.setattr(
        datasets, "load_dataset", _raise(DatasetNotFoundError("Dataset 'nobody/nothing' doesn't exist on the Hub"))
    )
    with pytest.raises(NotFound) as info:
        load_prompts("nobody/nothing")
    assert "nobody/nothing" in str(info.value)
    assert "Traceback" not in str(info.value)


@pytest.mark.parametrize("streaming", [False, True])
def test_hub_unreachable_is_a_clear_error(monkeypatch, streaming):
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        _raise(ConnectionError("Couldn't reach 'org/set' on the Hub (LocalEntryNotFoundError)")),
    )
    with pytest.raises(NotFound) as info:
        load_prompts(PromptSetSpec("org/set", streaming=streaming))
    assert "'org/set'" in str(info.value) and "Hub" in str(info.value)


def test_hub_unknown_split_and_config(monkeypatch):
    monkeypatch.setattr(
        datasets, "load_dataset", _raise(ValueError("Unknown split \"valid\". Should be one of ['train']."))
    )
    with pytest.raises(InvalidArgument) as info:
        load_prompts(PromptSetSpec("org/set", split="valid[:10]"))
    assert "valid" in str(info.value) and "org/set" in str(info.value)
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        _raise(ValueError("Config name is missing. Please pick one among the available configs")),
    )
    with pytest.raises(InvalidArgument, match="config") as info:
        load_prompts("org/multi")
    assert "org/multi" in str(info.value)


def test_hub_error_while_streaming_is_mapped(monkeypatch):
    def broken_rows():
        yield {"prompt": "first"}
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.IterableDataset.from_generator(broken_rows),
    )
    with pytest.raises(NotFound, match="org/flaky"):
        load_prompts(PromptSetSpec("org/flaky", streaming=True))
