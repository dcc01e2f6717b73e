"""docs/cli.md is generated from the commands' help (docs/gen_cli.py): it must say what the CLI says."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gen():
    spec = importlib.util.spec_from_file_location("gen_cli", ROOT / "docs" / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_the_commands_help():
    gen = _gen()
    text = gen.render()
    assert (ROOT / "docs" / "cli.md").read_text() == text, "docs/cli.md is out of date: run python docs/gen_cli.py"
    for cmd in ("prune", "eval", "finetune", "export", "inspect", "bench", "check", "run", "sweep", "demo",
                "profiles validate"):
        assert f"## chita-edge {cmd}\n" in text
    assert "| `--gradual-start` |" in text and "| `--qat` |" in text  # options come from the live CLI


def test_cli_reference_check_fails_on_a_stale_file(tmp_path, monkeypatch):
    gen = _gen()
    stale = tmp_path / "cli.md"
    stale.write_text(gen.render().replace("| `--gradual-start` |", "| `--start` |"))
    monkeypatch.setattr(gen, "DOC", stale)
    monkeypatch.setattr("sys.argv", ["gen_cli.py", "--check"])
    assert gen.main() == 1
    monkeypatch.setattr("sys.argv", ["gen_cli.py"])
    assert gen.main() == 0 and stale.read_text() == gen.render()
    monkeypatch.setattr("sys.argv", ["gen_cli.py", "--check"])
    assert gen.main() == 0
