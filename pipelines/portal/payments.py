"""Writing a verified payment to mallwatt.payments and waiting for Kafka's acknowledgement.

The webhook answers 2xx only after the delivery callback reports success: a payment the broker
did not take is answered 503, and the provider's retry (same transaction id) is safe because
the worker claims each payment id once.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Protocol

from infra.kafka_security import kafka_config
from pipelines.money_input import produce_payment

ACK_TIMEOUT_S = 10.0


class PaymentNotAcknowledged(Exception):
    """Kafka did not acknowledge the payment (outage, timeout): answer 503, the provider retries."""


class PaymentSink(Protocol):
    async def send(self, payment: dict[str, Any]) -> int:
        """Produce and wait for the acknowledgement; returns the ack time (epoch ms)."""
        ...


class KafkaPaymentSink:
    """A confluent_kafka Producer (idempotent) polled by its own thread; each send awaits its
    delivery callback. message.timeout.ms bounds how long a produce may stay unacknowledged."""

    def __init__(self, bootstrap: str, partitions: int | None = None, timeout_s: float = ACK_TIMEOUT_S) -> None:
        from confluent_kafka import Producer

        self.partitions, self.timeout_s = partitions, timeout_s
        self.producer = Producer(kafka_config(bootstrap, **{"enable.idempotence": True, "linger.ms": 0,
                                  "message.timeout.ms": int(timeout_s * 1000)}))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="portal-producer", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    async def send(self, payment: dict[str, Any]) -> int:
        return await self._acked(lambda cb: produce_payment(self.producer, payment, self.partitions, on_delivery=cb))

    async def send_record(self, topic: str, key: str, value: bytes) -> int:
        """Any record (the alert preferences), acknowledged like a payment."""
        return await self._acked(lambda cb: self.producer.produce(topic, key=key.encode(), value=value,
                                                                  on_delivery=cb))

    async def _acked(self, produce: Any) -> int:
        import time

        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()

        def on_delivery(err: Any, _msg: Any) -> None:
            def settle() -> None:
                if done.done():
                    return
                if err is not None:
                    done.set_exception(PaymentNotAcknowledged(str(err)))
                else:
                    done.set_result(int(time.time() * 1000))
            loop.call_soon_threadsafe(settle)

        try:
            produce(on_delivery)
        except BufferError as exc:  # local queue full: the broker is away for long
            raise PaymentNotAcknowledged(f"producer queue full: {exc}") from exc
        try:
            return await asyncio.wait_for(done, self.timeout_s + 2)
        except TimeoutError as exc:
            raise PaymentNotAcknowledged("no acknowledgement in time") from exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.producer.flush(5)
