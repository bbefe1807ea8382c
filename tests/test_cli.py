"""The CLI as its users meet it: help for every command, and a progress rate that is real."""

from __future__ import annotations

import argparse
import io
import time

from tqdm import tqdm

from cli.client import progress_bar
from cli.main import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {choice.dest: choice.help for choice in action._choices_actions}


def test_every_command_says_what_it_does_for_its_user() -> None:
    commands = _subcommands(build_parser())
    assert {"serve", "submit", "wait", "results", "keys", "train", "evaluate"} <= set(commands)
    missing = [name for name, text in commands.items() if not text]
    assert not missing, f"commands without help: {missing}"


def test_the_top_level_help_shows_how_to_start() -> None:
    text = build_parser().format_help()
    for step in ("cxr serve", "cxr submit", "cxr wait"):
        assert step in text
    assert "TensorFlow" not in text  # notes for developers belong in the code, not in --help


def test_the_wait_rate_counts_only_films_finished_while_watching() -> None:
    """90 of 100 films were done before `cxr wait` began; 10 more in ~0.2 s is ~50 films/s,
    not the 500/s a bar that counted all 100 would show."""
    bar = progress_bar(100, 90, lambda **kw: tqdm(file=io.StringIO(), **kw))
    time.sleep(0.2)
    bar.update(100 - bar.n)  # as `cxr wait` does: the poll says 100 finished
    rate = (
        bar.format_dict["rate"] or (bar.n - bar.format_dict["initial"]) / bar.format_dict["elapsed"]
    )
    bar.close()
    assert 10 <= rate <= 100


def test_pacs_options_become_the_pull_request_the_api_takes() -> None:
    from cli.client import pull_body

    assert pull_body(["1.2.3", "1.2.4"], None) == {"dicomweb": {"study_uids": ["1.2.3", "1.2.4"]}}
    assert pull_body(None, ["StudyDate=20260101-20260107", "ModalitiesInStudy=DX"]) == {
        "dicomweb": {"query": {"StudyDate": "20260101-20260107", "ModalitiesInStudy": "DX"}}
    }


def test_malformed_pacs_options_are_refused_before_any_request() -> None:
    import pytest

    from cli.client import ClientError, pull_body

    with pytest.raises(ClientError):
        pull_body(["1.2.3"], ["StudyDate=2026"])
    with pytest.raises(ClientError):
        pull_body(None, ["StudyDate"])
