"""The README's Python examples run as printed and its `pka-rec` commands parse (so they cannot drift
from the API)."""

from __future__ import annotations

import os
import re
import shlex

import torch

from pka_ext.rec import Recommender
from pka_ext.rec.cli import build_parser, main as cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_blocks(language: str) -> list[str]:
    """The README's fenced code blocks of one language, in order."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        return re.findall(rf"^```{language}\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_op_module_and_padding_examples_run():
    quickstart, padding, _, _ = readme_blocks("python")
    ns: dict = {}
    exec(compile(quickstart, "README quickstart", "exec"), ns)
    B, T = ns["B"], ns["T"]
    assert ns["out"].shape == (B, 2, T, 32) and ns["q"].grad is not None
    keep = torch.arange(T) >= T - ns["lengths"][:, None]
    assert torch.all(ns["y"][~keep] == 0)
    exec(compile(padding, "README padding example", "exec"), ns)
    h, lengths = ns["h"], ns["lengths"]
    assert h.shape == (2, 4, 64) and lengths.tolist() == [3, 1]
    assert torch.all(h[0, 3:] == 0) and torch.all(h[1, 1:] == 0) and torch.all(h[0, :3] != 0)


def test_recommender_example_runs(tmp_path, monkeypatch):
    _, _, recommender, _ = readme_blocks("python")
    monkeypatch.chdir(tmp_path)
    # The README trains runs/psa with the synthetic data first; a small run of the same command.
    cli_main(["train", "--format", "synthetic", "--model", "psa", "--epochs", "1", "--max-len", "20",
              "--hidden", "16", "--no-progress", "--out", "runs/psa"])
    ns: dict = {}
    calls = recommender.split("rec.recommend(")
    assert len(calls) == 3
    example = "top = rec.recommend(".join(calls[:2]) + "scored = rec.recommend(" + calls[2]
    exec(compile(example, "README recommender", "exec"), ns)  # keeping both results
    assert len(ns["top"]) == 10 and not {"12", "7", "99"} & set(ns["top"])
    assert [item for item, _ in ns["scored"]] == ns["top"][:3]
    logits = ns["users"][0] @ ns["items"].T
    unseen = [ns["ids"][i] for i in logits.argsort()[::-1] if ns["ids"][i] not in {"12", "7", "99"}]
    assert unseen[:3] == ns["top"][:3]


def test_training_from_python_example_runs(tmp_path, monkeypatch):
    *_, training = readme_blocks("python")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(training, "README training from Python", "exec"), ns)
    assert ns["data"].num_users == 300 and ns["data"].num_events == 6000
    assert ns["metrics"]["dataset"] == "mine" and ns["metrics"]["epochs_run"] == 2
    rec = Recommender.load("runs/mine-py/checkpoint.pt")
    assert len(rec.recommend(["i3", "i7"], k=5)) == 5


def test_cli_examples_parse():
    """Every `pka-rec ...` command in the README's shell blocks is accepted by the parser."""
    shell = "".join(readme_blocks("bash"))
    commands = [shlex.split(c, comments=True)
                for c in shell.replace("\\\n", " ").splitlines() if c.startswith("pka-rec ")]
    assert len(commands) >= 7
    for command in commands:
        args = build_parser().parse_args(command[1:])
        assert callable(args.fn), command
