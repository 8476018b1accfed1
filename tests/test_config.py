"""Configuration from FLYTE_* environment variables: flyte_gevent.config and Pack.from_env.

The variables the Go client reads keep their names and formats
(flyte-api.md §2.2); every bad value is a one-line ConfigError naming the
variable and the value (never a token's).
"""

import dataclasses

import pytest

from flyte_gevent import Command, ConfigError, Event, EventDef, Pack, PackDef, config
from flyte_gevent.config import from_environ, parse_labels

API = "http://flyte:8080"


def read(**environ):
    """The settings for *environ* (FLYTE_API defaults to a valid URL)."""
    environ.setdefault("FLYTE_API", API)
    return from_environ({k: v for k, v in environ.items() if v is not None})


def config_error(**environ):
    with pytest.raises(ConfigError) as caught:
        read(**environ)
    return caught.value


# --- the API URL ---------------------------------------------------------------------------------------------

def test_flyte_api_wins_over_flyte_api_url():
    assert read(FLYTE_API="http://a:8080", FLYTE_API_URL="http://b:8080")["api"] == "http://a:8080"


@pytest.mark.parametrize("flyte_api", [None, "", "   "])
def test_flyte_api_url_is_used_when_flyte_api_is_unset_or_blank(flyte_api):
    assert read(FLYTE_API=flyte_api, FLYTE_API_URL="http://b:8080")["api"] == "http://b:8080"


def test_a_missing_api_url_names_both_variables():
    with pytest.raises(ConfigError) as caught:
        from_environ({"FLYTE_LABELS": "a=1"})
    message = str(caught.value)
    assert message.startswith("FLYTE_API or FLYTE_API_URL is not set")
    assert caught.value.name == "FLYTE_API"


def test_the_url_is_trimmed():
    assert read(FLYTE_API="  https://flyte-api:8443/  ")["api"] == "https://flyte-api:8443/"


@pytest.mark.parametrize("variable, value, reason", [
    ("FLYTE_API", "flyte:8080", "expected an http:// or https:// URL with a host"),
    ("FLYTE_API", "ftp://flyte", "expected an http:// or https:// URL with a host"),
    ("FLYTE_API", "http://", "expected an http:// or https:// URL with a host"),
    ("FLYTE_API", "/v1", "expected an http:// or https:// URL with a host"),
    ("FLYTE_API", "http://flyte:99999", "the port is not a number between 0 and 65535"),
    ("FLYTE_API", "http://flyte:port", "the port is not a number between 0 and 65535"),
    ("FLYTE_API_URL", "flyte", "expected an http:// or https:// URL with a host"),
])
def test_a_malformed_url_names_the_variable_and_the_value(variable, value, reason):
    environ = {variable: value}
    if variable == "FLYTE_API_URL":
        environ["FLYTE_API"] = None
    error = config_error(**environ)
    assert str(error) == f"{variable}={value!r}: {reason}"
    assert error.name == variable


def test_url_credentials_are_not_echoed_in_errors():
    error = config_error(FLYTE_API="http://user:s3cret@flyte:99999")
    assert "s3cret" not in str(error)
    assert str(error) == "FLYTE_API='http://***@flyte:99999': the port is not a number between 0 and 65535"


# --- FLYTE_LABELS (Go format, flyte-api.md §2.2) ------------------------------------------------------------

@pytest.mark.parametrize("text, labels", [
    ("one=1,two =   2 ,  three   =3", {"one": "1", "two": "2", "three": "3"}),
    ("a=b=c", {"a": "b=c"}),
    ("env=dev, team = a", {"env": "dev", "team": "a"}),
    ("a=1,a=2", {"a": "2"}),
    ("empty=", {"empty": ""}),
])
def test_labels_follow_the_go_format(text, labels):
    assert parse_labels(text) == labels
    assert read(FLYTE_LABELS=text)["labels"] == labels


@pytest.mark.parametrize("text", [None, "", "   "])
def test_no_labels_when_unset_or_blank(text):
    assert not read(FLYTE_LABELS=text)["labels"]


@pytest.mark.parametrize("text, reason", [
    ("one: 1, two: 2", "item 1 ('one: 1') is not key=value"),
    ("a=1,", "item 2 ('') is not key=value"),
    ("a=1,,b=2", "item 2 ('') is not key=value"),
    ("=1", "item 1 ('=1') is not key=value"),
    ("a=1, b", "item 2 ('b') is not key=value"),
])
def test_malformed_labels_name_flyte_labels_and_the_bad_value(text, reason):
    error = config_error(FLYTE_LABELS=text)
    assert str(error) == f"FLYTE_LABELS={text!r}: {reason}"
    assert error.name == "FLYTE_LABELS"


# --- FLYTE_API_TIMEOUT ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [(None, 10.0), ("", 10.0), ("3", 3.0), (" 2.5 ", 2.5), ("0.1", 0.1)])
def test_timeout_is_positive_seconds_with_a_default_of_10(text, seconds):
    assert read(FLYTE_API_TIMEOUT=text)["timeout"] == seconds


@pytest.mark.parametrize("text, reason", [
    ("abc", "expected a number of seconds"),
    ("10s", "expected a number of seconds"),
    ("-1", "expected a positive number of seconds"),
    ("0", "expected a positive number of seconds"),
    ("inf", "expected a positive number of seconds"),
    ("nan", "expected a positive number of seconds"),
])
def test_a_bad_timeout_names_the_variable(text, reason):
    error = config_error(FLYTE_API_TIMEOUT=text)
    assert str(error) == f"FLYTE_API_TIMEOUT={text!r}: {reason}"
    assert error.name == "FLYTE_API_TIMEOUT"


# --- FLYTE_JWT ---------------------------------------------------------------------------------------------------

def test_jwt_is_read_and_trimmed():
    assert read(FLYTE_JWT=" abc.def.ghi\n")["jwt"] == "abc.def.ghi"
    assert read()["jwt"] is None


def test_the_jwt_is_never_echoed_in_a_config_error():
    secret = "eyJhbGciOi.s3cr3t.sig"
    errors = [config_error(FLYTE_JWT=secret, FLYTE_API_TIMEOUT="abc"),
              config_error(FLYTE_JWT=secret, FLYTE_LABELS="nope")]
    with pytest.raises(ConfigError) as caught:
        from_environ({"FLYTE_JWT": secret})
    errors.append(caught.value)
    with pytest.raises(ConfigError) as caught:
        Pack.from_env(PackDef("P"), environ={"FLYTE_JWT": secret, "FLYTE_API": "nope"})
    errors.append(caught.value)
    assert [str(e) for e in errors if "s3cr3t" in str(e)] == []


def test_a_secret_setting_that_fails_to_parse_is_redacted():
    def refuse(text):
        raise ValueError("not a token")

    setting = dataclasses.replace(config.setting("jwt"), parse=refuse)
    with pytest.raises(ConfigError) as caught:
        config.read(setting, "s3cr3t", "FLYTE_JWT")
    assert str(caught.value) == "FLYTE_JWT=<redacted>: not a token"


# --- FLYTE_HEALTH_PORT -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, port", [(None, 8090), ("", 8090), ("0", 0), ("off", None), ("OFF", None),
                                        ("none", None), ("8091", 8091), ("65535", 65535)])
def test_health_port_defaults_to_8090_with_0_for_any_and_off(text, port):
    assert read(FLYTE_HEALTH_PORT=text)["health_port"] == port


@pytest.mark.parametrize("text, reason", [
    ("abc", "expected a port number (0 for any free port) or 'off'"),
    ("8090.5", "expected a port number (0 for any free port) or 'off'"),
    ("-1", "expected a port number between 0 and 65535"),
    ("70000", "expected a port number between 0 and 65535"),
])
def test_a_bad_health_port_names_the_variable(text, reason):
    error = config_error(FLYTE_HEALTH_PORT=text)
    assert str(error) == f"FLYTE_HEALTH_PORT={text!r}: {reason}"
    assert error.name == "FLYTE_HEALTH_PORT"


# --- every error, one line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("environ", [
    {"FLYTE_API": None},
    {"FLYTE_API": "flyte\n:8080"},
    {"FLYTE_API": "http://flyte:8080\nx:port"},
    {"FLYTE_LABELS": "a=1,\nb"},
    {"FLYTE_LABELS": "one: 1,\ntwo: 2"},
    {"FLYTE_API_TIMEOUT": "1\n2"},
    {"FLYTE_HEALTH_PORT": "80\n90"},
    {"FLYTE_GEVENT_MAX_IN_FLIGHT": "0"},
    {"FLYTE_GEVENT_POLLING_INTERVAL": "soon"},
    {"FLYTE_API_INSECURE": "maybe"},
    {"FLYTE_GEVENT_LOG_LEVEL": "loud"},
])
def test_every_config_error_is_a_single_line(environ):
    error = config_error(**environ)
    assert "\n" not in str(error) and "\r" not in str(error)
    assert error.name is not None and error.name in str(error)


# --- Pack.from_env -----------------------------------------------------------------------------------------------

DONE = EventDef("Done")


def do(input):
    return Event(DONE, input)


def demo_def():
    return PackDef("Demo", commands=[Command("Do", do, [DONE])], labels={"team": "a"})


@pytest.fixture
def started():
    """Start a pack and make sure it is stopped after the test."""
    packs = []

    def start(pack):
        packs.append(pack)
        pack.start(timeout=5)
        return pack

    yield start
    for pack in packs:
        pack.stop(grace_period=0)


def test_from_env_registers_with_flyte_labels_merged_into_the_definition(flyte_api, started):
    # Go bug 2.11-1: NewDefaultPack reads FLYTE_LABELS but registers without them.
    pack_def = demo_def()
    pack = started(Pack.from_env(pack_def, environ={
        "FLYTE_API": flyte_api.url, "FLYTE_LABELS": "env=dev, team = b", "FLYTE_HEALTH_PORT": "off",
        "FLYTE_GEVENT_POLLING_INTERVAL": "0.5"}))
    registered = flyte_api.wait_for_pack("Demo.env.dev.team.b", timeout=2)
    assert registered.labels == {"env": "dev", "team": "b"}
    assert pack.pack_id == "Demo.env.dev.team.b"
    assert pack_def.labels == {"team": "a"}  # the caller's definition is left alone

    # Actions addressed with the environment's labels reach the pack.
    aid = flyte_api.enqueue("Demo", "Do", {"n": 1}, labels={"env": "dev"})
    assert flyte_api.wait_for_result(aid, timeout=3).payload == {"n": 1}


def test_from_env_without_flyte_labels_keeps_the_definitions_labels(flyte_api, started):
    pack = started(Pack.from_env(demo_def(), environ={"FLYTE_API": flyte_api.url, "FLYTE_HEALTH_PORT": "off"}))
    assert pack.pack_id == "Demo.team.a"
    assert list(flyte_api.packs) == ["Demo.team.a"]


def test_from_env_configures_the_client_and_the_pack(flyte_api, started, tmp_path):
    flyte_api.accepted_tokens = {"abc.def.ghi"}
    pack = Pack.from_env(demo_def(), environ={
        "FLYTE_API_URL": flyte_api.url, "FLYTE_API_TIMEOUT": "3", "FLYTE_JWT": "abc.def.ghi",
        "FLYTE_HEALTH_PORT": "0", "FLYTE_GEVENT_POLLING_INTERVAL": "0.5", "FLYTE_GEVENT_MAX_IN_FLIGHT": "7",
        "FLYTE_GEVENT_GRACE_PERIOD": "1.5", "FLYTE_GEVENT_HEALTH_HOST": "127.0.0.1"})
    assert (pack.client.url, pack.client.timeout) == (flyte_api.url, 3.0)
    assert (pack.polling_interval, pack.max_in_flight, pack.grace_period) == (0.5, 7, 1.5)
    started(pack)
    assert pack.health_port not in (None, 0, 8090)
    assert {r.headers.get("authorization") for r in flyte_api.requests} == {"Bearer abc.def.ghi"}


def test_from_env_overrides_win_over_the_environment(flyte_api, started):
    pack = Pack.from_env(demo_def(), environ={
        "FLYTE_API": "http://nowhere.invalid:1", "FLYTE_API_TIMEOUT": "30", "FLYTE_LABELS": "env=prod",
        "FLYTE_HEALTH_PORT": "8090"},
        api=flyte_api.url, timeout=2.0, labels={"env": "test"}, health_port=None, polling_interval=0.5,
        grace_period=0.5, flush_timeout=1.0)
    assert (pack.client.url, pack.client.timeout) == (flyte_api.url, 2.0)
    assert (pack.health_port, pack.grace_period, pack.flush_timeout) == (None, 0.5, 1.0)
    started(pack)
    assert list(flyte_api.packs) == ["Demo.env.test.team.a"]


def test_from_env_reads_os_environ_by_default(flyte_api, monkeypatch):
    monkeypatch.setenv("FLYTE_API", flyte_api.url)
    monkeypatch.setenv("FLYTE_LABELS", "zone=eu")
    monkeypatch.setenv("FLYTE_GEVENT_ALLOW_UNPATCHED", "1")
    pack = Pack.from_env(demo_def(), health_port=None)
    assert pack.client.url == flyte_api.url
    assert pack.pack_def.labels == {"team": "a", "zone": "eu"}
    assert pack.allow_unpatched is True


@pytest.mark.parametrize("environ, variable", [
    ({}, "FLYTE_API"),
    ({"FLYTE_API": API, "FLYTE_LABELS": "a=1,"}, "FLYTE_LABELS"),
    ({"FLYTE_API": API, "FLYTE_API_TIMEOUT": "0"}, "FLYTE_API_TIMEOUT"),
    ({"FLYTE_API": API, "FLYTE_HEALTH_PORT": "http"}, "FLYTE_HEALTH_PORT"),
    ({"FLYTE_API": API, "FLYTE_GEVENT_MAX_IN_FLIGHT": "-3"}, "FLYTE_GEVENT_MAX_IN_FLIGHT"),
])
def test_from_env_raises_a_config_error_naming_the_variable(environ, variable):
    with pytest.raises(ConfigError) as caught:
        Pack.from_env(demo_def(), environ=environ)
    assert caught.value.name == variable
    assert variable in str(caught.value)


@pytest.mark.parametrize("text, characters", [
    ("env=dev test", "' '"),
    ("team/x=a", "'/'"),
    ("env=a?b", "'?'"),
    ("k=50%", "'%'"),
    ("ünï=cødé", "'ü', 'ï', 'ø', 'é'"),
    ("env=dev\tx, z=\u00a0", "'\\t'"),
])
def test_labels_that_would_break_the_pack_links_are_refused_naming_the_characters(text, characters):
    with pytest.raises(ConfigError) as caught:
        config.from_environ({"FLYTE_API": "http://flyte:8080", "FLYTE_LABELS": text}, names={"labels"})
    item = text.split(",")[0].strip()
    assert str(caught.value) == (
        f"FLYTE_LABELS={text!r}: item 1 ({item!r}) holds {characters}, outside the characters Flyte can put into "
        "links unescaped (ASCII letters, digits and ._~!$&'()*+,;=:@-)")
    assert caught.value.name == "FLYTE_LABELS"


def test_shutdown_and_event_knobs_come_from_the_environment(flyte_api):
    pack = Pack.from_env(PackDef("Knobs"), {
        "FLYTE_API": flyte_api.url, "FLYTE_HEALTH_PORT": "off", "FLYTE_GEVENT_GRACE_PERIOD": "0",
        "FLYTE_GEVENT_FLUSH_TIMEOUT": "2.5", "FLYTE_GEVENT_EVENT_DEADLINE": "7", "FLYTE_GEVENT_EVENT_BUFFER": "3"})
    assert (pack.grace_period, pack.flush_timeout, pack.event_deadline) == (0.0, 2.5, 7.0)
    assert pack._events.maxsize == 3
    with pytest.raises(ConfigError) as caught:
        config.from_environ({"FLYTE_GEVENT_EVENT_BUFFER": "0"}, names={"event_buffer"})
    assert str(caught.value) == "FLYTE_GEVENT_EVENT_BUFFER='0': expected a whole number of at least 1"
