"""`falcon bench learning-curve` refuses drafters whose card has no training history, naming the file."""

from __future__ import annotations

import json

from bench.learning_curve import main


def test_a_card_without_history_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "old-drafter"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"drafter": {"block_size": 2}, "card": {"training": {}}}))
    assert main(["--drafter", str(folder), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(folder / "config.json") in err and "no training history" in err
    (folder / "config.json").write_text("{not json")
    assert main(["--drafter", str(folder), "--out", str(tmp_path / "out")]) == 2
    assert "not a readable drafter config" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
