import subprocess
import sys

from lightning_modules.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("fit", "generate", "eval", "demo"):
        assert name in out


def test_unknown_command_is_one_line_error(capsys):
    assert main(["frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown command 'frobnicate'" in err[0]


def test_console_script_installed():
    proc = subprocess.run([sys.executable, "-m", "lightning_modules.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "prd generate" in proc.stdout
