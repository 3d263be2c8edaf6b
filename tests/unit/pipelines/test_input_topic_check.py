"""infra.topics.check_input_topics with a stand-in admin client: what it refuses, what it
only logs (the broker test, tests/integration/test_broker.py, runs it on a real broker)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from infra.topics import InputTopicError, check_input_topics


class FakeAdmin:
    def __init__(self, policies: dict[str, str | None | Exception]) -> None:
        self.policies = policies

    def describe_configs(self, resources: list[Any], request_timeout: float) -> dict[Any, Future[Any]]:
        out: dict[Any, Future[Any]] = {}
        for res in resources:
            fut: Future[Any] = Future()
            policy = self.policies[res.name]
            if isinstance(policy, Exception):
                fut.set_exception(policy)
            else:
                fut.set_result({} if policy is None else {"cleanup.policy": SimpleNamespace(value=policy)})
            out[res] = fut
        return out


def test_delete_policy_passes() -> None:
    admin = FakeAdmin({"a": "delete", "b": None})
    assert check_input_topics("unused:1", ["a", "b"], admin=admin) == []


@pytest.mark.parametrize("policy", ["compact", "compact,delete", "delete,compact"])
def test_compaction_is_refused_by_name(policy: str) -> None:
    admin = FakeAdmin({"mallwatt.readings": "delete", "mallwatt.payments": policy})
    with pytest.raises(InputTopicError, match=f"mallwatt.payments has cleanup.policy={policy}"):
        check_input_topics("unused:1", ["mallwatt.readings", "mallwatt.payments"], admin=admin)


def test_unreadable_settings_are_reported_not_refused(caplog: pytest.LogCaptureFixture) -> None:
    denied = KafkaException(KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED))
    admin = FakeAdmin({"mallwatt.readings": denied, "mallwatt.payments": "delete"})
    assert check_input_topics("unused:1", ["mallwatt.readings", "mallwatt.payments"], admin=admin) == [
        "mallwatt.readings"]
    assert "mallwatt.readings: settings not readable" in caplog.text
