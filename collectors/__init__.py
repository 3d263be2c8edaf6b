"""Modbus side of the collectors: register profiles, decoding, polling, relay, simulator."""
