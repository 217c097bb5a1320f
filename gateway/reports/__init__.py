"""Offline reports read from the gateway's request log (`specgate ab-report`); never imported by the gateway."""
