"""One command-line vocabulary (issue 17): an option that several commands take is spelled, typed and
defaulted the same everywhere, every command formats its help the same way, and a usage error exits
with status 2 in every command."""

from __future__ import annotations

import argparse

import pytest

from galaxalign_batch.cli import SUBCOMMANDS, _options, build_parser, main

# Options built by galaxalign_batch.cli._options; their dest names.
SHARED = ["store", "tiles", "bricks", "survey", "sources", "device", "seed", "stretch", "force", "force_unlock",
          "batch_rows", "threads", "resume", "no_resume", "angular_size", "address", "stretch_augment"]
# Documented differences (docs/cli.md): simulate --bricks N is how many bricks to make; embed --stretch
# (and evaluate --stretch) defaults to the model's own stretch, and embed/search --angular-size is what an RGB picture spans (no default; both from _options.add_picture_scale).
EXCEPTIONS = {("simulate", "bricks"), ("embed", "stretch"), ("evaluate", "stretch"), ("embed", "angular_size"), ("search", "angular_size")}


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _visible(p: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in p._actions if a.option_strings and a.help != argparse.SUPPRESS
            and not isinstance(a, argparse._HelpAction)]


def _signature(a: argparse.Action) -> tuple:
    return (a.option_strings[0], type(a).__name__, a.nargs, a.default,
            tuple(a.choices) if a.choices is not None else None, getattr(a.type, "__name__", a.type), a.metavar)


def test_every_command_is_registered_and_uses_the_one_help_formatter():
    commands = _commands()
    assert list(commands) == SUBCOMMANDS
    for name, p in commands.items():
        assert p.formatter_class is _options.HelpFormatter, name


@pytest.mark.parametrize("dest", SHARED)
def test_a_shared_option_is_the_same_everywhere(dest):
    seen = {}
    for name, p in _commands().items():
        for a in _visible(p):
            if a.dest == dest and (name, dest) not in EXCEPTIONS:
                seen[name] = _signature(a)
    assert seen, f"no command has --{dest.replace('_', '-')}"
    distinct = set(seen.values())
    assert len(distinct) == 1, f"--{dest.replace('_', '-')} differs between commands: {seen}"


def test_one_spelling_means_one_thing():
    """A visible option string names the same dest in every command (deprecated aliases are hidden)."""
    meaning: dict[str, set[str]] = {}
    for name, p in _commands().items():
        for a in _visible(p):
            for s in a.option_strings:
                meaning.setdefault(s, set()).add(a.dest)
    mixed = {s: d for s, d in meaning.items() if len(d) > 1}
    assert not mixed, f"option strings with different meanings in different commands: {mixed}"


def test_stretch_choices_are_the_preprocessing_stretches():
    from galaxalign_batch.preprocess.spec import STRETCHES

    assert set(_options.STRETCHES) == set(STRETCHES) - {"none"}


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_help_renders_without_empty_defaults(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default: None)" not in out and "(default: False)" not in out
    assert out.count("(default:") <= len(_visible(_commands()[name]))


# Each command called without what it needs: argparse's own usage error, or the command's UsageError.
USAGE_ERRORS = [
    ["simulate"], ["cutout"], ["pretrain"], ["pretrain", "--out", "x"], ["train"], ["train", "--data", "d"],
    ["evaluate"], ["verify"], ["classify"], ["search"], ["search", "--store", "s"], ["join"], ["report"],
    ["fewshot"], ["fewshot", "--store", "s"], ["label"], ["morphology", "--out", "t.csv"],
    ["morphology", "--store", "s", "--tiles", "t", "--out", "t.csv"], ["cutout", "--tiles", "t", "--out", "a.png"],
    ["embed", "--tiles", "t"],
    ["search", "--store", "s", "--text", "a spiral", "--symbol", "d.png"],
    ["search", "--store", "s", "--queries", "q.txt", "--plot", "g.png"],
    ["morphology", "--store", "s"], ["morphology", "--tiles", "t", "--regress", "m.parquet"],
    ["morphology", "--store", "s", "--regress", "m.parquet", "--out", "t.csv"],
    ["morphology", "--store", "s", "--out", "t.csv", "--targets", "sersic_n"],
    ["restore"], ["restore", "--tiles", "t", "--out", "d"], ["restore", "--model", "h.safetensors", "--out", "d"],
    ["detect"], ["detect", "--tiles", "t"], ["detect", "--tiles", "t", "--out", "c.fits"],
    ["detect", "--train", "--tiles", "t", "--out", "d.safetensors"],
    ["detect", "--train", "--tiles", "t", "--detector", "rcnn", "--model", "m", "--out", "d.safetensors"],
    ["detect", "--tiles", "t", "--model", "d.safetensors", "--out", "c.fits", "--steps", "3"],
    ["detect", "--tiles", "t", "--model", "d.safetensors", "--out", "c.fits", "--epochs", "3"],
    ["detect", "--train", "--tiles", "t", "--model", "m", "--out", "d.safetensors", "--steps", "3", "--epochs", "2"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a))
def test_a_usage_error_exits_2_in_every_command(argv, capsys, caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing a command might write lands in the checkout
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    assert code == 2, f"{argv}: exit {code}"
    said = capsys.readouterr().err + "".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert said.strip(), f"{argv}: exit 2 without saying why"


def test_deprecated_spellings_still_work_and_warn(caplog):
    commands = _commands()
    args = commands["label"].parse_args(["--store", "s", "--task", "t", "--head", "mlp"])
    assert args.kind == "mlp"
    args = commands["morphology"].parse_args(["--store", "s", "--out", "t.csv", "--catalog", "detect"])
    assert args.sources == "detect"
    args = commands["embed"].parse_args(["--catalog", "detect"])
    assert args.sources == "detect"
    args = commands["join"].parse_args(["--store", "s", "--catalog", "c.csv", "--out", "o.parquet", "--workers", "3"])
    assert args.threads == 3
    assert any("deprecated" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "d", "--out", "o", "--weights", "1,2"], "expected 3 non-negative numbers w_it,w_is,w_st, got '1,2'"),
    (["train", "--data", "d", "--out", "o", "--stage1-weights", "1,-1,0"], "expected 3 non-negative numbers"),
    (["pretrain", "--tiles", "t", "--out", "o", "--weights", "a,b"], "expected 2 numbers w_ii,w_ic, got 'a,b'"),
])
def test_loss_weights_are_parsed_in_one_place(argv, message, capsys):
    """``train --weights``/``--stage1-weights`` and ``pretrain --weights``: one parser (``loss_weights``)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
