"""The subcommands that live in other modules: imported only when run, loud when they cannot be."""
from __future__ import annotations

import subprocess
import sys

import pytest

from scanside.agent import cli

# what building and parsing `scanside run` must not import (each is a whole subsystem or pydicom)
NOT_FOR_RUN = ("pydicom", "numpy", "scanside.simulator.protocols", "scanside.training.registry", "scanside.converters.calibrate",
               "scanside.engines.store", "scanside.agent.cli.demo")


def test_run_parser_imports_no_other_subcommand_module():
    code = ("import sys; from scanside.agent.cli import build_parser; argv = ['run', '--watch', 'x']; "
            "build_parser(argv).parse_args(argv); print('\\n'.join(sys.modules))")
    loaded = set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                text=True).stdout.split())
    assert "scanside.agent.runtime.config" in loaded  # the probe saw what `run` needs
    assert not loaded & set(NOT_FOR_RUN), sorted(loaded & set(NOT_FOR_RUN))


def test_the_chosen_subcommand_gets_its_real_parser():
    args = cli.build_parser(["--log-level", "info", "profiles", "list"]).parse_args(
        ["--log-level", "info", "profiles", "list"])
    assert callable(args.func)
    assert cli.chosen_command(["--log-level", "debug", "-q", "models", "list"]) == "models"
    assert cli.chosen_command(["--quiet"]) is None


def test_help_lists_every_subcommand_with_its_modules_own_summary(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--help"])
    assert stop.value.code == 0
    listing = capsys.readouterr().out
    for name, _module, _summary in cli.LAZY_COMMANDS:
        assert f"    {name} " in listing
    # the placeholders say what each module's own parser says (every module imported here)
    assert listing == cli.build_parser().format_help()


def test_a_subcommand_whose_module_fails_to_import_is_an_error_naming_it(monkeypatch, capsys):
    monkeypatch.setattr(cli, "LAZY_COMMANDS", (*cli.LAZY_COMMANDS, ("broken", "agent.no_such_module", "x")))
    assert cli.main(["broken"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "agent.no_such_module" in err and "unavailable" in err
    # a command line naming another command still works: only the chosen module is imported
    with pytest.raises(SystemExit) as stop:
        cli.main(["profiles", "--help"])
    assert stop.value.code == 0
