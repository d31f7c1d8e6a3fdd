"""Configuration: built-in defaults, the public keys, and errors that name the key and the file."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from relay import config


def test_defaults_need_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(config.ENV_CONFIG, raising=False)
    s = config.load(None)
    assert str(s.smtp.listen) == "127.0.0.1:2525"
    assert s.smtp.hostname == "relay.localdomain"
    assert s.smtp.max_message_size == 26_214_400
    assert ipaddress.ip_network("::1/128") in s.smtp.trusted_networks
    assert s.upstream.host is None and s.upstream.port == 25 and s.upstream.tls == "none"
    assert s.database.url == f"sqlite:///{tmp_path}/var/relay.db"
    assert s.paths.outbox == tmp_path / "var" / "outbox"
    assert str(s.http.listen) == "127.0.0.1:9101"
    assert s.delivery.queue_lifetime == 5 * 86400


def test_file_from_env_and_relative_paths(tmp_path, monkeypatch):
    cfg = tmp_path / "etc" / "relay.toml"
    cfg.parent.mkdir()
    cfg.write_text('[upstream]\nhost = "mx.example"\ntls = "starttls"\nusername = "u"\npassword = "p"\n'
                   '[paths]\nskins = "../brand/skins"\n[smtp]\nlisten = "[::1]:2526"\n')
    monkeypatch.setenv(config.ENV_CONFIG, str(cfg))
    s = config.load(None)
    assert s.upstream.host == "mx.example" and s.upstream.tls == "starttls"
    assert s.paths.skins == (tmp_path / "brand" / "skins").resolve()
    assert s.smtp.listen.host == "::1" and s.smtp.listen.port == 2526
    assert s.database.url == f"sqlite:///{cfg.parent}/var/relay.db"


@pytest.mark.parametrize(
    "toml, key, words",
    [
        ('[smtp]\nlisen = "127.0.0.1:25"\n', "smtp.lisen", "unknown key"),
        ("[smpt]\n", "smpt", "unknown key"),
        ('[upstream]\ntls = "ssl"\n', "upstream.tls", "none, starttls, implicit"),
        ('[smtp]\nmax_message_size = "big"\n', "smtp.max_message_size", "an integer"),
        ('[smtp]\ntrusted_networks = ["10.0.0.300/8"]\n', "smtp.trusted_networks", "not a network"),
        ('[smtp]\nlisten = "127.0.0.1:99999"\n', "smtp.listen", "out of range"),
        ('[delivery]\nretry_base = -1\n', "delivery.retry_base", "positive"),
        ('[[delivery.reply_rules]]\naction = "defer"\nmatch = "("\n', "delivery.reply_rules[0].match",
         "regular expression"),
        ('[upstream]\nusername = "u"\n', "upstream.username", "go together"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path, toml, key, words):
    cfg = tmp_path / "relay.toml"
    cfg.write_text(toml)
    with pytest.raises(config.ConfigError) as e:
        config.load(cfg)
    assert e.value.key == key
    assert str(cfg) in str(e.value) and words in str(e.value)


def test_invalid_toml_names_file_and_line(tmp_path):
    cfg = tmp_path / "relay.toml"
    cfg.write_text("[smtp]\nlisten = \n")
    with pytest.raises(config.ConfigError) as e:
        config.load(cfg)
    assert str(cfg) in str(e.value) and "line 2" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(config.ConfigError) as e:
        config.load(tmp_path / "nope.toml")
    assert "nope.toml" in str(e.value)


def test_reply_rules_apply(tmp_path):
    s = config.from_mapping({"delivery": {"reply_rules": [{"code": 421, "action": "defer"},
                                                          {"match": "rate.?limit", "action": "defer"}]}},
                            "<t>", Path(tmp_path))
    from relay.delivery.retry import DEFER, FAIL, SENT, Reply, classify, next_delay

    d = s.delivery
    assert classify(Reply(550, "5.7.1 Rate limit exceeded"), d) == DEFER
    assert classify(Reply(550, "5.1.1 unknown user"), d) == FAIL
    assert classify(Reply(250, "ok"), d) == SENT
    assert [next_delay(n, d) for n in (1, 2, 3)] == [300, 600, 1200]
    assert next_delay(50, d) == d.retry_max
