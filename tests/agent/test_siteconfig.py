"""Issue 21 (5): the example site configuration is generated from the pydantic models (so it cannot
drift), ships as examples/site.toml, covers every section and key, and - every line uncommented - is a
valid configuration of the agent."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from scanside.agent.runtime.config import AgentConfig, load_config
from scanside.agent.runtime.siteconfig import example_site_toml

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "site.toml"


def every_key(model=AgentConfig, prefix=""):
    from scanside.agent.runtime.siteconfig import _submodel

    for name, field in model.model_fields.items():
        sub = _submodel(field.annotation)
        if sub is None:
            yield f"{prefix}{name}"
        else:
            yield from every_key(sub, f"{prefix}{name}.")


def uncomment(text: str) -> str:
    """Every commented `key = value` line and `[table]` header set, the descriptions left as comments."""
    out = []
    for line in text.splitlines():
        m = re.match(r"# ((\[[a-z_.]+\])|([a-z_0-9]+ = .*?))(\s+# .*)?$", line)
        out.append(m.group(1) if m else line)
    return "\n".join(out) + "\n"


def test_shipped_example_is_what_config_init_writes(tmp_path):
    assert EXAMPLE.read_text(encoding="utf-8") == example_site_toml(), \
        "examples/site.toml is stale: regenerate with `scanside config init --force examples/site.toml`"
    out = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "config", "init", str(tmp_path / "site.toml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "site.toml").read_text(encoding="utf-8") == EXAMPLE.read_text(encoding="utf-8")


def test_example_covers_every_section_and_key_with_its_environment_name():
    text = EXAMPLE.read_text(encoding="utf-8")
    no_value = [ln for ln in text.splitlines() if re.match(r"# [a-z_0-9]+ =\s+#", ln)]
    assert not no_value, f"keys without an example value: add them to scanside.agent.runtime.siteconfig.EXAMPLES: {no_value}"
    data = tomllib.loads(uncomment(text))
    keys = list(every_key())
    assert len(keys) > 70
    for dotted in keys:
        node = data
        for part in dotted.split("."):
            assert part in node, f"{dotted} missing from examples/site.toml"
            node = node[part]
        assert "SCANSIDE_" + dotted.upper().replace(".", "__") in text
    for section in ("dicom_output", "dicom_output.send", "cstore", "webhook", "api"):
        assert f"[{section}]" in text


def test_example_as_shipped_loads_and_every_line_uncommented_is_valid(tmp_path):
    assert load_config(EXAMPLE).model_dump() == load_config().model_dump()  # all commented: the defaults
    text = uncomment(EXAMPLE.read_text(encoding="utf-8"))
    site_profile = tmp_path / "site-profile.toml"
    site_profile.write_text("")  # the example names /etc/scanside/site-profile.toml, which the test cannot create
    text = text.replace('"/etc/scanside/site-profile.toml"', f'"{site_profile}"')
    (tmp_path / "all.toml").write_text(text, encoding="utf-8")
    config = load_config(tmp_path / "all.toml")
    assert config.dicom_output.send is not None and config.dicom_output.send.host == "pacs.example.org"
    assert str(config.watch.folder) == "/srv/scanner-export" and config.webhook.url.startswith("https://")


def test_a_wrong_key_in_the_example_is_refused_with_its_name(tmp_path):
    text = uncomment(EXAMPLE.read_text(encoding="utf-8")).replace("quiet_period_s = 10.0", "quiet_perod_s = 10.0", 1)
    (tmp_path / "typo.toml").write_text(text, encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "scanside.agent.cli", "config", "check", "--config", str(tmp_path / "typo.toml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "series.quiet_perod_s" in out.stderr, out.stderr
