"""The `falcon` console script: lazy subcommands, clear messages for missing ones, `falcon convert`."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from falcon_core.cli import COMMANDS, Command, main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "falcon_core.cli", *args], capture_output=True, text=True, timeout=300
    )


def test_registered_commands():
    assert {name: c.target for name, c in COMMANDS.items()} == {
        "generate": "falcon_core.generate_cli:main",
        "serve": "deploy.cli:main",
        "bench": "bench.cli:main",
        "distill": "pipelines.distill:main",
        "cache": "pipelines.cache_hidden_states:main",
        "convert": "falcon_core.cli:convert",
    }


def test_importing_the_cli_imports_no_other_package():
    code = (
        "import sys, falcon_core.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'deploy', 'pipelines', 'bench', 'ray', 'torch'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_arguments_reach_the_command_and_its_exit_code_comes_back(tmp_path, monkeypatch, capsys):
    (tmp_path / "fake_cmd.py").write_text(
        textwrap.dedent(
            """
            def main(argv=None):
                print("got", argv)
                return 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = {"fake": Command("fake_cmd:main", "a fake command")}
    assert main(["fake", "--prompt", "hi there", "-n", "3"], commands=commands) == 3
    assert capsys.readouterr().out.strip() == "got ['--prompt', 'hi there', '-n', '3']"


def test_missing_module_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    (tmp_path / "needs_dep.py").write_text(
        "import no_such_dependency_xyz\n\ndef main(argv=None):\n    return 0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    commands = {
        "absent": Command("no_such_package_xyz.cli:main", "not written yet"),
        "dep": Command("needs_dep:main", "imports something missing"),
        "nofunc": Command("textwrap:no_such_function", "wrong function name"),
    }
    assert main(["absent"], commands=commands) == 2
    err = capsys.readouterr().err
    assert (
        err
        == "falcon absent: not available in this installation (module 'no_such_package_xyz.cli' is missing)\n"
    )
    assert main(["dep"], commands=commands) == 2
    assert (
        "falcon dep: needs the module 'no_such_dependency_xyz', which is not installed"
        in capsys.readouterr().err
    )
    assert main(["nofunc"], commands=commands) == 2
    assert "has no function 'no_such_function'" in capsys.readouterr().err


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice: 'frobnicate'" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_prints_the_folder(smollm2_path):
    result = run_cli("convert")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2_path)


def test_convert_unknown_spec(tmp_path):
    result = run_cli("convert", "no-such-model", "--cache-dir", str(tmp_path))
    assert result.returncode == 1
    assert "cannot resolve model spec 'no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr
