"""The command line: help, info, placeholders that say so, errors as one line and exit 1."""

from __future__ import annotations

import subprocess
import sys

import pytest

from galaxalign_batch.cli import SUBCOMMANDS, main


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: galaxalign-batch " + name in capsys.readouterr().out


def test_info_runs_and_reports_core():
    out = subprocess.run([sys.executable, "-m", "galaxalign_batch", "info", "--json"], capture_output=True,
                         text=True, check=True).stdout
    import json

    info = json.loads(out)
    assert info["core"]["openmp"] > 0
    assert info["cpu_kernels"].startswith("x86-64-v")  # the level chosen at run time
    assert info["cpu_kernels"].split()[0] in info["cpu_levels_supported"]
    assert info["cpu_bf16_kernels"] in ("x86-64-v4 + AVX512-BF16", "none (bf16 upcast to float32)")
    assert info["core_threads"] >= 1


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
