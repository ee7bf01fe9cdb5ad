import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cmhsa import cli
from cmhsa.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def number_after(label, text):
    return float(re.search(rf"{label}\s+([0-9.e+-]+)", text).group(1))


@pytest.mark.parametrize("form", ["paper", "factorized", "tied"])
def test_verify_prints_heads_bound_and_errors(capsys, form):
    code, out, _ = run(capsys, "verify", "--kernel-size", "3", "--patch-size", "4", "--in-chans", "2",
                       "--out-chans", "3", "--image-size", "16", "20", "--form", form)
    assert code == 0
    assert f"form             {form}" in out
    assert "heads used       9 (lower bound for this kernel: 9)" in out
    assert number_after("max \\|error\\|", out) < 1e-9
    assert "interior" in out and "border" in out


def test_verify_without_null_key_shows_border_error(capsys):
    _, out, _ = run(capsys, "verify", "--kernel-size", "3", "--patch-size", "4", "--image-size", "16",
                    "--no-null-key")
    assert number_after("border", out) > 1e-3 > number_after("interior", out)


def test_verify_on_a_grid_without_interior_patches_says_so(capsys):
    """A 1x1 grid (P = image size) has only border patches: no interior error to print, rather than a 0."""
    code, out, _ = run(capsys, "verify", "--kernel-size", "3", "--patch-size", "8", "--image-size", "8")
    assert code == 0 and "grid             1x1 patches" in out
    assert "interior       none (no patch has all its offsets inside the grid)" in out
    assert number_after("border", out) < 1e-9


@pytest.mark.parametrize("form", ["paper", "factorized", "local"])
def test_verify_circular_padding_is_exact_without_a_null_key(capsys, form):
    """Circular padding wraps offsets around the grid: no border, so no null key is needed (3x3 grid, 5x5 kernel
    on P = 2: the reach of 2 patches aliases around the grid)."""
    code, out, _ = run(capsys, "verify", "--kernel-size", "5", "--patch-size", "2", "--in-chans", "2",
                       "--out-chans", "2", "--image-size", "6", "--padding-mode", "circular", "--no-null-key",
                       "--form", form)
    assert code == 0 and "padding_mode=circular" in out
    assert number_after("max \\|error\\|", out) < 1e-9
    assert "border         none (no border patches on this grid)" in out  # not an error of 0 at a border


def test_bounds_table(capsys):
    code, out, _ = run(capsys, "bounds", "--kernel-size", "3", "--patch-size", "1", "--in-chans", "2",
                       "--out-chans", "2")
    assert code == 0
    rows = re.findall(r"^\s+(\d+)\s+([0-9.e+-]+)", out, flags=re.M)
    assert [int(h) for h, _ in rows] == list(range(1, 10))
    assert "rank certificate (least heads that can be exact):             4" in out
    errors = [float(e) for _, e in rows]
    assert errors[2] > 1e-3 and errors[3] < 1e-10


def test_kernel_from_safetensors(tmp_path, capsys):
    w = torch.zeros(1, 1, 3, 3)
    w[0, 0, 1, 1] = 2.0  # a 1x1 kernel in disguise: one head suffices
    path = tmp_path / "k.safetensors"
    save_file({"conv.weight": w, "conv.bias": torch.ones(1)}, str(path))
    code, out, _ = run(capsys, "verify", "--weights", str(path), "--patch-size", "4", "--image-size", "8")
    assert code == 0 and "lower bound for this kernel: 1" in out
    assert number_after("max \\|error\\|", out) < 1e-9


def test_bad_input_exits_with_a_message(capsys, tmp_path):
    code, _, err = run(capsys, "verify", "--stride", "3", "--patch-size", "4", "--image-size", "16")
    assert code == 2 and "does not divide patch size" in err
    path = tmp_path / "two_kernels.safetensors"
    save_file({"a": torch.zeros(1, 1, 3, 3), "b": torch.zeros(1, 1, 3, 3)}, str(path))
    code, _, err = run(capsys, "verify", "--weights", str(path))
    assert code == 2 and "holds 2 4-d tensors" in err
    code, _, err = run(capsys, "verify", "--weights", str(tmp_path / "missing.safetensors"))
    assert code == 2 and "does not exist" in err


def test_version(capsys):
    import cmhsa
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"cmhsa {cmhsa.__version__} (torch {torch.__version__}")


def test_an_override_without_set_names_the_fix(capsys, tmp_path):
    for argv, overrides in [(["train", "phase1.epochs=3"], "phase1.epochs=3"),
                            (["pipeline", "--output", str(tmp_path), "data.img_size=32", "x=1"], "data.img_size=32 x=1")]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and f"config overrides go after --set: --set {overrides}" in err
    with pytest.raises(SystemExit):  # a stray flag is not an override
        main(["train", "--epochs", "3"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --epochs 3" in err and "--set" not in err
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("command", ["pipeline", "train"])
def test_print_config_shows_the_whole_config_a_run_would_use_and_runs_nothing(capsys, tmp_path, command):
    from cmhsa.config import load_config
    preset = Path(__file__).resolve().parent.parent / "configs" / "fmnist_tiny_midrun.yaml"
    argv = ["--config", str(preset), "--set", "data.train_subset=1000", "--output", str(tmp_path / "run")]
    assert main([command, *argv, "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "train_subset: 1000" in printed and "anneal_bias_to: null" in printed  # every key, defaults too
    (tmp_path / "printed.yaml").write_text(printed)  # and it is a config: run with it, it is the same run
    assert load_config(tmp_path / "printed.yaml") == load_config(preset, ["data.train_subset=1000",
                                                                          f"output={tmp_path / 'run'}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["printed.yaml"]  # nothing ran


def test_experiment_typos_name_the_fix(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parent.parent)  # the repository's root: configs/experiments/
    code, _, err = run(capsys, "experiment", "tabel1")
    assert code == 2 and "did you mean 'table1'?" in err and "converged_geometry" in err
    code, _, err = run(capsys, "experiment", "converged", "--cells", "conv_n200", "--results", str(tmp_path))
    assert code == 2 and "has no cell 'conv_n200'; did you mean 'conv_n2000'?" in err
    assert not any(tmp_path.iterdir())  # nothing ran
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "experiment", "table1")
    assert code == 2 and "run from the repository's root" in err and "--config" in err


@pytest.mark.parametrize("command,resumable", [("train", True), ("bounds", False)])
def test_ctrl_c_is_a_message_not_a_traceback(capsys, monkeypatch, command, resumable):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{command}", interrupted)
    code, _, err = run(capsys, command)
    assert code == 130 and err.startswith("interrupted") and ("resume" in err) == resumable


@pytest.mark.parametrize("command", ["verify", "bounds"])
@pytest.mark.parametrize("flags,names", [
    (["--dilation", "0"], "--dilation"),
    (["--dilation", "-1"], "--dilation"),
    (["--stride", "0"], "--stride"),
    (["--stride", "-2"], "--stride"),
    (["--patch-size", "0"], "--patch-size"),
    (["--patch-size", "-4"], "--patch-size"),
    (["--kernel-size", "0"], "--kernel-size"),
    (["--kernel-size", "-1"], "--kernel-size"),
    (["--kernel-size", "3", "0"], "--kernel-size"),
    (["--kernel-size", "1", "2", "3"], "--kernel-size"),
    (["--groups", "0"], "--groups"),
    (["--groups", "2"], "--groups"),
    (["--in-chans", "0"], "--in-chans"),
    (["--out-chans", "-3"], "--out-chans"),
])
def test_bad_conv_flags_give_one_line_and_exit_2(capsys, command, flags, names):
    code, out, err = run(capsys, command, "--patch-size", "4", *(["--image-size", "16"] * (command == "verify")),
                         *flags)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err and "Traceback" not in err


@pytest.mark.parametrize("flags,names", [
    (["--image-size", "0"], "--image-size"),
    (["--image-size", "-16"], "--image-size"),
    (["--image-size", "16", "0"], "--image-size"),
    (["--image-size", "16", "16", "16"], "--image-size"),
    (["--image-size", "18"], "--patch-size"),
    (["--image-size", "16", "18"], "--patch-size"),
    (["--bias-strength", "-1"], "--bias-strength"),
    (["--bias-strength", "nan"], "--bias-strength"),
    (["--bias-strength", "inf"], "--bias-strength"),
])
def test_bad_verify_flags_give_one_line_and_exit_2(capsys, flags, names):
    code, out, err = run(capsys, "verify", "--patch-size", "4", "--image-size", "16", *flags)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and names in err


def test_bad_flags_in_a_subprocess_print_no_traceback():
    out = subprocess.run([sys.executable, "-m", "cmhsa", "verify", "--dilation", "0"], capture_output=True,
                         text=True)
    assert out.returncode == 2 and out.stderr == "error: --dilation must be >= 1, got 0\n"


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "cmhsa", "verify", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--bias-strength" in out.stdout and "--no-null-key" in out.stdout


def test_every_option_of_every_command_says_what_it_does():
    """``cmhsa <command> --help`` explains each flag: none is listed bare."""
    import argparse

    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bare = [f"{name} {action.option_strings[-1]}" for name, parser in subcommands.choices.items()
            for action in parser._actions if action.option_strings and not action.help]
    assert not bare, f"options without help: {bare}"
