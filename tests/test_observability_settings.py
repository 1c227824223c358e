"""Every server setting is settable three ways (TOML config file, MATCALC_* variable, `matcalc serve`
flag derived from the setting) and documented with both names; the webhook and alert settings reach
the running parts (the dispatcher, the alert engine)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

from matcalc.server.cli import NAMED_FLAGS, add_serve_command, setting_flags  # noqa: E402
from matcalc.server.config import Settings, cli_flag, env_var, load_settings  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_serve_command(p.add_subparsers())
    return p.parse_args(["serve", *argv])


def test_webhook_and_alert_settings_from_flags_env_and_toml(tmp_path):
    toml = tmp_path / "matcalc.toml"
    toml.write_text('[server]\nwebhook_concurrency = 7\nalert_queue_backlog = 11\n'
                    'alert_webhook_urls = ["http://a.example/hook"]\nalert_rules_disabled = ["disk_free_low"]\n')
    env = {"MATCALC_WEBHOOK_TIMEOUT_S": "3.5", "MATCALC_ALERT_QUEUE_BACKLOG": "12"}
    args = parse("--webhook-max-attempts", "9", "--alert-webhook-urls", "http://b.example/x,http://c.example/y",
                 "--alert-webhook-urls", "http://d.example/z", "--metrics-public", "--alert-expected-gpus", "2")
    flags = setting_flags(args)
    s = load_settings({k: v for k, v in flags.items() if k != "config_file"}, env=env, config_file=toml)
    assert (s.webhook_concurrency, s.webhook_timeout_s, s.webhook_max_attempts) == (7, 3.5, 9)  # toml, env, flag
    assert s.alert_queue_backlog == 12  # the variable beats the file
    assert s.alert_webhook_urls == ["http://b.example/x", "http://c.example/y", "http://d.example/z"]  # flag wins
    assert s.alert_rules_disabled == ["disk_free_low"] and s.metrics_public is True and s.alert_expected_gpus == 2
    assert setting_flags(parse("--no-metrics-public"))["metrics_public"] is False
    with pytest.raises(SystemExit):
        parse("--webhook-concurrency", "many")
    with pytest.raises(ValueError, match="webhook_concurrency"):
        load_settings({"webhook_concurrency": 0}, env={})


def _rendered(page: str) -> str:
    """A docs page as mkdocs renders it (docs/hooks.py fills the generated tables)."""
    import sys

    sys.path.insert(0, str(DOCS))
    try:
        import hooks
    finally:
        sys.path.remove(str(DOCS))
    return hooks.on_page_markdown((DOCS / page).read_text())


def test_every_setting_has_a_flag_and_is_documented():
    p = argparse.ArgumentParser()
    add_serve_command(p.add_subparsers())
    serve = next(a for a in p._subparsers._group_actions[0].choices.values())  # noqa: SLF001
    flags = {opt for action in serve._actions for opt in action.option_strings}  # noqa: SLF001
    docs = _rendered("deployment.md") + (DOCS / "guide" / "server.md").read_text()
    missing = []
    for name in Settings.model_fields:
        if name not in NAMED_FLAGS:
            assert cli_flag(name) in flags, name
        if env_var(name) not in docs or (name not in NAMED_FLAGS and cli_flag(name) not in docs):
            missing.append(name)
    assert not missing, f"settings missing from docs/deployment.md or docs/guide/server.md: {missing}"


def test_settings_reach_the_dispatcher_and_alert_engine(tmp_path):
    from fastapi.testclient import TestClient

    from matcalc.server import create_app

    settings = Settings(db_url=f"sqlite:///{tmp_path / 's.db'}", workers=0, webhook_concurrency=3,
                        webhook_timeout_s=4, webhook_max_attempts=2, alert_queue_backlog=17, alert_interval_s=99)
    with TestClient(create_app(settings)) as c:
        obs = c.app.state.observability
        assert (obs.webhooks.concurrency, obs.webhooks.timeout_s, obs.webhooks.max_attempts) == (3, 4, 2)
        assert obs.alerts.rules["queue_backlog"].threshold == 17 and obs.alerts.interval_s == 99
        cfg = c.get("/api/v1/system/config").json()["data"]
        assert cfg["webhook_concurrency"] == 3 and cfg["alert_queue_backlog"] == 17


def test_settings_table_in_the_docs_is_the_generated_one():
    """The docs' settings table is rendered from the settings at build time (docs/hooks.py)."""
    from matcalc.server.cli import settings_table

    page = _rendered("deployment.md")
    assert settings_table() in page and "<!-- matcalc:" not in page


def test_docs_name_every_metric_and_alert_rule(tmp_path):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    from matcalc.server import create_app
    from matcalc.server.alerts import builtin_rules

    text = (DOCS / "guide" / "server.md").read_text()
    with TestClient(create_app(Settings(db_url=f"sqlite:///{tmp_path / 'm.db'}", workers=0))) as c:
        families = {f.name: f.type for f in text_string_to_metric_families(c.get("/metrics").text)}
    documented = set()
    for line in text.split("## Metrics", 1)[1].split("## Alerts", 1)[0].splitlines():
        if not line.startswith("| `matcalc_"):
            continue
        names = [n.strip().strip("`") for n in line.split("|")[1].split(",")]
        documented.add(names[0])
        for short in names[1:]:  # "`matcalc_gpu_memory_total_bytes`, `_used_bytes`"
            segments = short.strip("_").split("_")
            documented.add("_".join(names[0].split("_")[:-len(segments)] + segments))
    exposed = {name + "_total" if kind == "counter" else name for name, kind in families.items()
               if not name.endswith("_created")}
    assert exposed <= documented, f"metrics missing from docs/guide/server.md: {sorted(exposed - documented)}"
    for rule in builtin_rules():
        assert f"| `{rule}` |" in text, rule
