"""The `kubespan` command: config tools and generators, exit codes and messages."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from kubespan.cli import main
from kubespan.config import load_config
from kubespan.config.render import REDACTED


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_gen_cluster_gives_two_fresh_32_byte_keys(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["gen", "cluster"], capsys)
    assert code == 0
    first = yaml.safe_load(out)
    assert len(base64.b64decode(first["id"])) == 32
    assert len(base64.b64decode(first["secret"])) == 32
    _, again, _ = run(["gen", "cluster"], capsys)
    assert yaml.safe_load(again)["secret"] != first["secret"]


def test_gen_config_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, cluster, _ = run(["gen", "cluster"], capsys)
    (tmp_path / "cluster.yaml").write_text(cluster)
    code, out, _ = run(
        [
            "gen",
            "config",
            "--discovery",
            "https://d.example:3000",
            "--cluster",
            str(tmp_path / "cluster.yaml"),
        ],
        capsys,
    )
    assert code == 0
    (tmp_path / "node.yaml").write_text(out)
    config = load_config(tmp_path / "node.yaml")
    assert config.kubespan.enabled
    assert config.cluster.id == yaml.safe_load(cluster)["id"]
    assert config.cluster.discovery.service_endpoints == ("https://d.example:3000",)


def test_gen_config_refuses_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(["gen", "config", "--discovery", "d.example"], capsys)
    assert code == 2
    assert "http:// or https://" in err
    (tmp_path / "cluster.yaml").write_text("id: x\n")
    code, _, err = run(
        ["gen", "config", "--discovery", "http://d", "--cluster", str(tmp_path / "cluster.yaml")],
        capsys,
    )
    assert code == 2
    assert "kubespan gen cluster" in err


def test_validate_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("machine: {network: {kubespan: {enabled: false}}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("machine:\n  network:\n    kubespan:\n      mtu: 9\n")
    code, out, _ = run(["config", "validate", str(good)], capsys)
    assert (code, out.strip()) == (0, f"{good}: valid")
    code, out, err = run(["config", "validate", str(good), str(bad)], capsys)
    assert code == 1
    assert f"{bad}:4: machine.network.kubespan.mtu: must be at least 1280, not 9" in err
    code, _, err = run(["config", "validate", str(tmp_path / "missing.yaml")], capsys)
    assert code == 1
    assert "missing.yaml: cannot read" in err


def test_show_fills_defaults_and_redacts_the_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = run(["gen", "config", "--discovery", "http://192.0.2.1:3000"], capsys)
    secret = yaml.safe_load(out)["cluster"]["secret"]
    (tmp_path / "node.yaml").write_text(out)
    code, shown, _ = run(["config", "show", str(tmp_path / "node.yaml")], capsys)
    assert code == 0
    assert secret not in shown
    document = yaml.safe_load(shown)
    kubespan = document["machine"]["network"]["kubespan"]
    assert kubespan["mtu"] == 1420
    assert kubespan["listenPort"] == 51820
    assert kubespan["allowDownPeerBypass"] is False
    assert document["cluster"]["secret"] == REDACTED


def test_apply_stores_only_valid_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    good = tmp_path / "good.yaml"
    good.write_text("machine: {network: {kubespan: {enabled: false}}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("machine: {network: {kubespan: {enabled: maybe}}}\n")
    code, _, _ = run(["config", "apply", str(good), "--state-dir", str(state)], capsys)
    assert code == 0
    stored = state / "machineconfig.yaml"
    assert stored.read_bytes() == good.read_bytes()
    assert stored.stat().st_mode & 0o777 == 0o600
    code, _, err = run(["config", "apply", str(bad), "--state-dir", str(state)], capsys)
    assert code == 1
    assert "machine.network.kubespan.enabled: must be true or false" in err
    assert stored.read_bytes() == good.read_bytes()


def test_a_config_given_with_config_that_others_can_read_is_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """The packaged agent runs from /etc/kubespan/machineconfig.yaml: a copy of the example
    made with `cp` is mode 0644, and the file holds the cluster secret."""
    import argparse
    import logging

    from kubespan.cli import agent_config

    _, cluster, _ = run(["gen", "cluster"], capsys)
    (tmp_path / "cluster.yaml").write_text(cluster)
    argv = ["gen", "config", "--discovery", "https://d.example:3000"]
    _, out, _ = run([*argv, "--cluster", str(tmp_path / "cluster.yaml")], capsys)
    config = tmp_path / "machineconfig.yaml"
    config.write_text(out)
    arguments = argparse.Namespace(config=config)
    for mode, warned in ((0o644, True), (0o600, False)):
        config.chmod(mode)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            agent_config(arguments)
        assert any("can be read by other users" in r.message for r in caplog.records) is warned
