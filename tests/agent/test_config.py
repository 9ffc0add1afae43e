"""agent.toml: the documented example parses, flags win over the file, bad values are named, and the
``[link]`` section is the MQTT link's tuning."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from edgepack.agent import config as config_module
from edgepack.agent.config import LinkSettings, load_config
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


def test_link_settings_and_link_options_stay_in_step() -> None:
    options = {f.name: f.default for f in dataclasses.fields(LinkOptions)}
    settings = LinkSettings().model_dump()
    assert settings == options, "agent/config.py LinkSettings and agent/link.py LinkOptions differ"


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
