"""agent.toml: the documented example parses, flags win over the file, bad values are named, the
``[link]`` section is the MQTT link's tuning, the ``agent run`` flags are derived from the config's fields
(one table), and a device without a configured id gets one from /etc/machine-id or joins no broker."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from edgepack.agent import config as config_module
from edgepack.agent.config import (
    AgentConfig,
    LinkSettings,
    derive_device_id,
    flag_specs,
    load_config,
    resolve_device_id,
)
from edgepack.agent.daemon import DaemonFlags, daemon_config, link_options
from edgepack.agent.link import LinkOptions
from edgepack.errors import ConfigError


def _documented_example() -> str:
    """The agent.toml in agent/config.py's docstring, as a user would copy it."""
    doc = config_module.__doc__ or ""
    block = doc.split("::", 1)[1].split("Precedence:", 1)[0]
    return "\n".join(line[4:] for line in block.splitlines())


def test_the_documented_example_parses(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(_documented_example())
    config = load_config(path)
    assert config.device_id == "cam-0042" and config.targets == ["jetson-orin"]
    assert config.labels == {"site": "plant-3", "line": "2"}
    assert (config.host, config.port) == ("127.0.0.1", 8000)
    assert config.broker.url == "mqtts://broker.example:8883" and config.runtime.threads == 2
    assert config.link.max_rate == 500 * 1024 and config.link.stall_s == 5.0


def test_link_options_are_the_link_settings() -> None:
    assert LinkOptions is LinkSettings, "the link's tuning is defined once, in agent/config.py"
    config = load_config(None)
    assert link_options(config) is config.link


def test_the_link_section_reaches_the_link(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('[link]\nmax_rate = "2M"\nstall_s = 2.5\nreceive_maximum = 4\nsession_expiry_s = 600\n')
    options = link_options(load_config(path))
    assert options == LinkOptions(max_rate=2 << 20, stall_s=2.5, receive_maximum=4, session_expiry_s=600)
    assert link_options(load_config(None)) == LinkOptions()


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "cam-1"\nlabels = { site = "a" }\n[link]\nmax_rate = "100k"\nstall_s = 9\n')
    config = daemon_config(path, DaemonFlags(max_rate="1M", session_expiry_s=60, labels=["line=2"]))
    assert config.device_id == "cam-1" and config.labels == {"site": "a", "line": "2"}
    assert (config.link.max_rate, config.link.stall_s, config.link.session_expiry_s) == (1 << 20, 9.0, 60)


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[link]\nmax_rate = "fast"\n', "link.max_rate"),
        ("[link]\nmax_rate = 10\n", "link.max_rate"),
        ("[link]\nstall_s = 0\n", "link.stall_s"),
        ("[link]\nreconnect_min_s = 10\nreconnect_max_s = 5\n", "reconnect_max_s (5) is below reconnect_min_s (10)"),
        ("[link]\nchunk_timeout = 3\n", "link.chunk_timeout"),
        ('listen = "8000"\n', "listen"),
        ("[runtime]\nthreads = 0\n", "runtime.threads"),
    ],
)
def test_a_bad_value_is_named(tmp_path: Path, toml: str, named: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=re.escape(named)) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_unreadable_or_malformed_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read agent config"):
        load_config(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("device_id = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(broken)


def test_link_deadlines_and_packet_size_are_derived() -> None:
    link = LinkSettings(deadline_min_s=60, deadline_rate="10k", max_chunk_size="1M")
    assert link.deadline_s(None) == 60 and link.deadline_s(10 * 1024 * 100) == 160
    assert LinkSettings(deadline_min_s=60, deadline_rate="10k", max_rate="4k").deadline_s(2048 * 10) == 70
    assert link.max_packet_size == (1 << 20) + (64 << 10)
    from edgepack import protocol

    assert LinkSettings.model_fields["max_chunk_size"].metadata, "bounded"
    with pytest.raises(ValueError, match="max_chunk_size"):
        LinkSettings(max_chunk_size=protocol.MAX_CHUNK_SIZE + 1)
    with pytest.raises(ValueError, match="max_chunk_size"):
        LinkSettings(max_chunk_size=protocol.MIN_CHUNK_SIZE - 1)


def test_every_flag_maps_to_a_field_and_back(tmp_path: Path) -> None:
    specs = flag_specs()
    names = [s.name for s in specs]
    assert len(set(names)) == len(names) and len({s.dest for s in specs}) == len(specs)
    # every flag's key is a real field, and a value given by flag lands there
    samples = {str: "x1", int: 7, float: 2.5, bool: False, Path: tmp_path / "p"}
    for spec in specs:
        value = [samples[spec.kind]] if spec.multiple else samples[spec.kind]
        overrides = DaemonFlags(**{spec.dest: value}).overrides()
        if spec.dest == "labels":
            continue  # merged with the file's in daemon_config
        assert list(overrides) == [spec.key], spec
        section, *rest = spec.key.split(".")
        field = (AgentConfig.model_fields[section].annotation.model_fields[rest[0]] if rest
                 else AgentConfig.model_fields[section])  # fmt: skip
        assert field.description == spec.help and spec.help
    with pytest.raises(TypeError, match="unknown daemon flag"):
        DaemonFlags(chunk_timeout=3)


def test_agent_run_offers_exactly_the_derived_flags() -> None:
    import typer.main

    from edgepack.cli import app

    group = typer.main.get_command(app).commands["agent"]  # type: ignore[attr-defined]
    run = group.commands["run"]
    offered = {opt for param in run.params for opt in (*param.opts, *param.secondary_opts)}
    wanted = {"--config"} | {part for s in flag_specs() for part in s.name.split("/")}
    assert offered - {"--help"} == wanted
    by_name = {p.name: p for p in run.params}
    assert by_name["token"].envvar == "EDGEPACK_TOKEN" and by_name["targets"].multiple


def test_flags_reach_the_config_through_the_table(tmp_path: Path) -> None:
    config = daemon_config(
        None,
        DaemonFlags(device_id="cam-9", state=tmp_path / "s", broker="mqtt://h", accelerators=False, targets=["x86"],
                    stall_s=1.5, max_rate="2M", keepalive=9),
    )  # fmt: skip
    assert (config.device_id, config.state_dir, config.broker.url, config.targets) == (
        "cam-9", tmp_path / "s", "mqtt://h", ["x86"],
    )  # fmt: skip
    assert config.runtime.allow_accelerators is False and config.broker.keepalive == 9
    assert (config.link.stall_s, config.link.max_rate) == (1.5, 2 << 20)


def test_the_device_id_comes_from_the_config_or_the_machine_id(tmp_path: Path, caplog) -> None:
    machine_id = tmp_path / "machine-id"
    machine_id.write_text("0123456789abcdef0123456789abcdef\n")
    expected = "edge-" + hashlib.sha256(b"0123456789abcdef0123456789abcdef").hexdigest()[:12]
    assert derive_device_id(machine_id) == expected
    with caplog.at_level("INFO"):
        config, source = resolve_device_id(load_config(None), machine_id)
    assert (config.device_id, source) == (expected, "machine-id")
    assert expected in caplog.text and str(machine_id) in caplog.text, "the log says which id and why"
    # the configured id wins; daemon_config resolves the same way
    assert resolve_device_id(load_config(None, {"device_id": "cam-1"}), machine_id)[0].device_id == "cam-1"
    assert daemon_config(None, DaemonFlags(), machine_id=machine_id).device_id == expected
    assert load_config(None).device_id is None, "no shared default id: two devices would knock each other off"


@pytest.mark.parametrize("content", [None, "", "uninitialized\n", "0" * 32])
def test_without_an_id_or_a_machine_id_none_is_made_up(tmp_path: Path, caplog, content: str | None) -> None:
    machine_id = tmp_path / "machine-id"
    if content is not None:
        machine_id.write_text(content)
    assert derive_device_id(machine_id) is None
    with caplog.at_level("WARNING"):
        config, source = resolve_device_id(load_config(None), machine_id)
    assert (config.device_id, source) == (None, "none")
    assert "--device-id" in caplog.text
