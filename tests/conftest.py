from __future__ import annotations

from collections.abc import Iterator

import pytest

# --- Kafka (owned by infra) ---------------------------------------------------------


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a running broker with the mallwatt topics provisioned.

    MALLWATT_KAFKA if set, else the shared dev broker on 127.0.0.1:19092 if it answers,
    else that dev broker is started here and stopped at session end (only then).
    """
    from infra import broker
    from infra.topics import provision_topics, wait_until_served

    config = broker.BrokerConfig.from_env()
    started = False
    if not config.external and broker.count_topics(config.bootstrap, timeout=5.0) is None:
        broker.start(config)
        started = True
    elif config.external:
        broker.wait_until_ready(config, timeout=30.0)
    provision_topics(config.bootstrap)
    wait_until_served(config.bootstrap)
    try:
        yield config.bootstrap
    finally:
        if started:
            broker.stop(config)
