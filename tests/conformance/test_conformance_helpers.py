"""The testing helpers on each server: a wait that times out says why no pack takes the action, on the fake from its
own records and on the real server from ``GET /v1/packs``."""

import pytest
import requests

from flyte_gevent.testing import FakeFlyteApi


def late(server, aid):
    with pytest.raises(AssertionError) as failure:
        server.wait_for_result(aid, timeout=0.2)
    return str(failure.value)


def register(server, name, labels):
    body = {"name": name, "labels": labels, "commands": [{"name": "Echo", "events": ["Done"]}],
            "events": [{"name": "Done"}]}
    assert requests.post(server.url + "/v1/packs", json=body, timeout=5).status_code == 201


def test_a_late_result_says_which_rule_keeps_packs_from_taking_the_action(server, unique):
    name = f"Nobody{unique}"
    aid = server.enqueue(name, "Echo", labels={"run": unique})
    message = late(server, aid)
    assert f"{aid} ('Echo' for {name!r} {{'run': {unique!r}}}) is NEW" in message
    assert f"no pack named {name!r} is registered" in message

    register(server, name, {"run": "other"})
    assert (f"a pack named {name!r} is registered, but its labels do not include the action's {{'run': {unique!r}}}: "
            f"'{name}.run.other' has {{'run': 'other'}}") in late(server, aid)

    register(server, name, {"run": unique, "zone": "eu"})  # more labels than the action's: it fits
    fitting = f"{name}.run.{unique}.zone.eu"
    message = late(server, aid)
    assert f"pack {fitting!r} would take it, but was not seen during this wait (last seen " in message
    assert f"s ago): is it running, and pointed at {server.url}?" in message
    if isinstance(server, FakeFlyteApi):
        assert server.action(aid).state == "NEW"
    for pack_id in (f"{name}.run.other", fitting):
        server.delete_pack(pack_id)
