"""Prompt sources of remote clients: files only under the configured root, never their contents in errors."""

from __future__ import annotations

import os

import pytest

from abliterate.core.prompts import PromptSetSpec, load_prompts
from abliterate.errors import InvalidArgument, NotFound


@pytest.fixture
def root(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    (folder / "a.txt").write_text("one\ntwo\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "b.json").write_text('["three"]')
    (folder / "secret.csv").write_text("root:x:0:0:root:/root:/bin/bash,other\nvalue,1\n")
    (tmp_path / "outside.txt").write_text("outside\n")
    os.symlink(tmp_path / "outside.txt", folder / "escape.txt")
    return folder


def test_files_under_the_root_are_read_relative_or_absolute(root):
    assert load_prompts("a.txt", file_root=root) == ["one", "two"]
    assert load_prompts("sub/b.json", file_root=root) == ["three"]
    assert load_prompts(str(root / "a.txt"), file_root=root) == ["one", "two"]
    assert load_prompts(f"text:{root / 'a.txt'}", file_root=root) == ["one", "two"]
    assert load_prompts("text:a.txt", file_root=root) == ["one", "two"]
    assert load_prompts("bundled:harmless_eval", file_root=root)  # bundled sets always


@pytest.mark.parametrize(
    "source",
    [
        "/etc/passwd",
        "text:/etc/passwd",
        "json:/etc/*",
        "../outside.txt",
        "sub/../../outside.txt",
        "text:../outside.txt",
    ],
)
def test_paths_outside_the_root_are_invalid_argument(root, source):
    with pytest.raises(InvalidArgument, match="outside|'\\.\\.'") as info:
        load_prompts(source, file_root=root)
    assert "root:x" not in str(info.value)


def test_a_symlink_cannot_lead_out_of_the_root(root):
    with pytest.raises(InvalidArgument, match="outside"):
        load_prompts("escape.txt", file_root=root)


def test_no_root_means_no_file_access(root):
    for source in ("text:/etc/passwd", str(root / "a.txt"), "./a.txt", "/etc/passwd"):
        with pytest.raises(InvalidArgument, match="reads no prompt files"):
            load_prompts(source, file_root="")
    assert load_prompts("bundled:harmless_eval", file_root="")


def test_a_missing_file_under_the_root_is_not_found(root):
    with pytest.raises(NotFound):
        load_prompts("nope.txt", file_root=root)


def test_errors_never_quote_a_server_file(root):
    with pytest.raises(InvalidArgument) as info:
        load_prompts("secret.csv", file_root=root)
    assert "root:x" not in str(info.value) and "bin/bash" not in str(info.value)
    assert "not shown" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        load_prompts(PromptSetSpec("secret.csv", column="nope"), file_root=root)
    assert "root:x" not in str(info.value)
    # The local CLI (no root) still lists the columns of its own file.
    with pytest.raises(InvalidArgument, match="root:x"):
        load_prompts(str(root / "secret.csv"))


@pytest.mark.parametrize("root_kind", ["none", "folder"])
def test_an_overlong_or_nul_source_is_invalid_argument(root, root_kind):
    file_root = None if root_kind == "none" else root
    with pytest.raises(InvalidArgument, match="longer than 255"):
        load_prompts("x" * 300, file_root=file_root)
    with pytest.raises(InvalidArgument, match="longer than 255"):
        load_prompts("/tmp/" + "y" * 256 + ".txt", file_root=file_root)
    with pytest.raises(InvalidArgument, match="NUL"):
        load_prompts("a\x00.txt", file_root=file_root)


def test_the_spec_itself_refuses_an_impossible_source():
    """The gateway builds the spec at SubmitJob: an over-long or NUL source fails there, not in the extractor."""
    with pytest.raises(InvalidArgument, match="longer than 255"):
        PromptSetSpec("z" * 256)
    with pytest.raises(InvalidArgument, match="NUL"):
        PromptSetSpec("bundled:\x00")
